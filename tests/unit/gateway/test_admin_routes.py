"""The admin API in-process (aiohttp test server), its token file, and mellctl's rendering and
target resolution."""

from __future__ import annotations

import argparse
import asyncio
import json
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from mell.common import events as ev
from mell.common.config import GatewayConfig
from mell.common.workers import RequestLoad, WorkerIdentity, WorkerLoad
from mell.gateway.admin.event_feed import EventFeed
from mell.gateway.admin.routes import build_admin_app
from mell.gateway.admin.token import ensure_token, read_url, write_url
from mell.gateway.api.served_models import ModelRegistry
from mell.gateway.cluster.dispatcher import Dispatcher
from mell.gateway.cluster.metrics import Metrics
from mell.gateway.cluster.state import ClusterState
from mell.gateway.cluster.view import ClusterView
from mell.gateway.cluster.worker_link import WorkerLink
from mell.gateway.cluster.worker_port import WorkerPort
from mell.gateway.context import GatewayContext
from mell.gateway.mellctl.admin import render_requests, render_status
from mell.gateway.mellctl.client import Unreachable, resolve
from mell.gateway.policy.base import make_policy
from mell.transport.secret import ClusterSecret

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")
TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

SECRET = ClusterSecret(b"test-cluster-secret-0123456789")


def joined(wid: str) -> ev.WorkerJoined:
    return ev.WorkerJoined(
        identity=WorkerIdentity(
            worker_id=wid,
            boot_id="b",
            model="mell-tiny",
            capacity_blocks=64,
            block_size=16,
            max_model_len=256,
            data_address="",
        )
    )


@pytest.fixture
async def client() -> AsyncIterator[tuple[TestClient, GatewayContext]]:
    config = GatewayConfig()
    state = ClusterState(ClusterView(["mell-tiny"]))
    feed = EventFeed()
    state.add_append_hook(feed.publish)
    link = WorkerLink(config, state, WorkerPort("tcp://127.0.0.1:0", SECRET))
    policy = make_policy("least-loaded")
    dispatcher = Dispatcher(state, policy, link.send, Metrics(state.view), 10)
    ctx = GatewayContext(config, ModelRegistry([]), state, link, dispatcher,
                         Metrics(state.view), policy, feed=feed)  # fmt: skip
    for wid in ("w0", "w1"):
        state.record(joined(wid), source=wid)
        state.record(ev.WorkerActivated(worker_id=wid), source=wid)
    state.record(ev.RequestPlaced(request_id="r1", model="mell-tiny", worker_id="w0",
                                  num_prompt_tokens=30, max_tokens=50, num_blocks=2))  # fmt: skip
    state.record(
        ev.LoadReported(
            worker_id="w0",
            load=WorkerLoad(
                num_running=1,
                num_waiting=0,
                num_total_blocks=64,
                num_free_blocks=61,
                num_preemptions_total=0,
                requests=[RequestLoad("r1", 3, 40)],
            ),
        ),
        source="w0",
    )
    async with TestClient(TestServer(build_admin_app(ctx, TOKEN))) as c:
        yield c, ctx
    link.close()


async def test_every_route_needs_the_token(client: tuple[TestClient, GatewayContext]) -> None:
    c, _ = client
    for path in ("/status", "/workers", "/requests", "/events"):
        response = await c.get("/admin/v1" + path)
        assert response.status == 401
    response = await c.get("/admin/v1/status", headers={"Authorization": "Bearer nope"})
    assert response.status == 401 and (await response.json())["error"]["code"] == 401


async def test_status_workers_requests(client: tuple[TestClient, GatewayContext]) -> None:
    c, _ = client
    body = await (await c.get("/admin/v1/status", headers=AUTH)).json()
    assert body["totals"]["workers"] == 2 and body["totals"]["requests"] == 1
    assert body["releasable"] == ["w1"]
    [pool] = body["models"]
    assert pool["used_blocks"] == 3 and pool["capacity_blocks"] == 128
    text = render_status(body)
    assert max(len(line) for line in text.splitlines()) <= 100 and "releasable workers: w1" in text
    w0 = await (await c.get("/admin/v1/workers/w0", headers=AUTH)).json()
    assert w0["requests"] == {"r1": 3} and w0["kv_usage"] == round(3 / 64, 4)
    assert (await c.get("/admin/v1/workers/zz", headers=AUTH)).status == 404
    requests = (await (await c.get("/admin/v1/requests?worker=w0", headers=AUTH)).json())[
        "requests"
    ]
    assert [(r["request_id"], r["num_tokens"], r["streaming"]) for r in requests] == [
        ("r1", 40, False)
    ]
    assert "gone" in render_requests(requests)
    none = await (await c.get("/admin/v1/requests?worker=w1", headers=AUTH)).json()
    assert none == {"requests": []}


async def test_events_tail_filter_and_follow(client: tuple[TestClient, GatewayContext]) -> None:
    c, ctx = client
    response = await c.get("/admin/v1/events?tail=2&worker=w0", headers=AUTH)
    lines = [json.loads(x) for x in (await response.text()).splitlines()]
    assert [e["type"] for e in lines] == ["RequestPlaced", "LoadReported"]
    response = await c.get("/admin/v1/events?request=r1", headers=AUTH)
    assert len((await response.text()).splitlines()) == 2
    assert (await c.get("/admin/v1/events?tail=x", headers=AUTH)).status == 400

    response = await c.get("/admin/v1/events?tail=0&follow=1&request=r1", headers=AUTH)
    ctx.state.record(ev.WorkerDrainStarted(worker_id="w1"))  # not about r1: filtered out
    ctx.state.record(ev.RequestAdmitted(request_id="r1", worker_id="w0"))
    line = await asyncio.wait_for(response.content.readline(), 5)
    assert json.loads(line)["type"] == "RequestAdmitted"
    response.close()


async def test_drain_of_an_unknown_worker_is_404(client: tuple[TestClient, GatewayContext]) -> None:
    c, _ = client
    response = await c.post("/admin/v1/workers/ghost/drain", headers=AUTH)
    assert response.status == 404 and "ghost" in (await response.json())["error"]["message"]


def test_token_file_is_private_and_stable(tmp_path: Path) -> None:
    token = ensure_token(tmp_path / "data")
    path = tmp_path / "data" / "admin.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(token) >= 32
    assert ensure_token(tmp_path / "data") == token
    write_url(tmp_path / "data", "http://127.0.0.1:9")
    assert read_url(tmp_path / "data") == "http://127.0.0.1:9"


def _args(**kw: object) -> argparse.Namespace:
    return argparse.Namespace(**({"url": None, "token": None, "data_dir": None} | kw))


def test_target_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MELL_ADMIN_URL", raising=False)
    monkeypatch.delenv("MELL_ADMIN_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MELLCTL_CONFIG", str(tmp_path / "none.toml"))
    data = tmp_path / "d"
    token = ensure_token(data)
    write_url(data, "http://127.0.0.1:5/")
    target = resolve(_args(data_dir=str(data)))
    assert (target.url, target.token) == ("http://127.0.0.1:5", token)
    assert resolve(_args(data_dir=str(data), url="http://x:1", token="t")).token == "t"
    with pytest.raises(Unreachable):
        resolve(_args(data_dir=str(tmp_path / "empty")))
    config = tmp_path / "mellctl.toml"
    config.write_text(f'url = "http://h:2"\ntoken_file = "{data / "admin.token"}"\n')
    monkeypatch.setenv("MELLCTL_CONFIG", str(config))
    assert resolve(_args()) == type(target)("http://h:2", token)


async def test_followers_end_when_the_feed_closes(
    client: tuple[TestClient, GatewayContext],
) -> None:
    c, ctx = client
    response = await c.get("/admin/v1/events?tail=0&follow=1", headers=AUTH)
    await asyncio.sleep(0.05)
    ctx.feed.close()  # what the admin app's on_shutdown does
    assert await asyncio.wait_for(response.content.read(), 5) == b""
