"""Two models on three workers, API keys, and workers that die: `mellctl up` on loopback.

w0 and w2 serve mell-tiny, w1 serves tiny-b (a second tiny checkpoint). Killing a worker mid-
stream moves its streams to the other worker of their model (they finish, no error event); the
gateway keeps serving through the others and /health reports the loss; a model left without
workers is answered 503 at once.
"""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import aiohttp
import openai
import pytest
from mell_cluster import LocalCluster, get_json, metric, start_cluster, wait_until

from mell.common.tiny_model import write_tiny_model

pytestmark = pytest.mark.slow
KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    root = tmp_path_factory.mktemp("failures")
    tiny_b = write_tiny_model(root / "tiny-b", seed=1)
    c = start_cluster(
        root / "data",
        "--workers",
        "3",
        "--model",
        "mell-tiny",
        "--model",
        str(tiny_b),
        "--worker-timeout",
        "1",
        "--api-key",
        KEY,
        "--device",
        "cpu",
    )
    yield c
    c.stop()


@pytest.fixture(scope="module")
def client(cluster: LocalCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key=KEY, max_retries=0)


def test_api_key_required(cluster: LocalCluster) -> None:
    status, body = get_json(cluster.url + "/v1/models")
    assert status == 401 and body["error"]["code"] == 401
    status, body = get_json(cluster.url + "/v1/models", {"Authorization": "Bearer wrong"})
    assert status == 401 and body["error"]["type"] == "AuthenticationError"
    assert get_json(cluster.url + "/v1/models", AUTH)[0] == 200
    assert get_json(cluster.url + "/health")[0] == 200  # health needs no key
    for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [5, 6]})):
        assert _post(cluster.url + path, body)[0] == 401
        assert _post(cluster.url + path, body, {"Authorization": "Bearer wrong"})[0] == 401
        assert _post(cluster.url + path, body, AUTH)[0] == 200


def _post(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_two_models_routed_by_model(client: openai.OpenAI, cluster: LocalCluster) -> None:
    assert sorted(m.id for m in client.models.list()) == ["mell-tiny", "tiny-b"]
    outputs = {}
    for model in ("mell-tiny", "tiny-b"):
        r = client.completions.create(
            model=model,
            prompt="Same prompt for both",
            max_tokens=16,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert r.model == model
        outputs[model] = (r.id, r.choices[0].text)
    placed = {
        e["request_id"]: e["worker_id"]
        for e in cluster.gateway_log()
        if e["event"] == "request_placed"
    }
    assert placed[outputs["tiny-b"][0]] == "w1"
    assert placed[outputs["mell-tiny"][0]] in ("w0", "w2")
    assert outputs["mell-tiny"][1] != outputs["tiny-b"][1]  # different weights


async def _open_stream(session: aiohttp.ClientSession, url: str, i: int) -> tuple[str, Any]:
    body = {
        "model": "mell-tiny",
        "prompt": f"stream {i}",
        "max_tokens": 1900,
        "ignore_eos": True,
        "stream": True,
    }
    r = await session.post(url + "/v1/completions", json=body, headers=AUTH)
    assert r.status == 200
    first = await r.content.readuntil(b"\n\n")
    return json.loads(first[6:])["id"], r


async def _rest(response: aiohttp.ClientResponse) -> list[bytes]:
    data = await response.read()
    return [e[6:] for e in data.split(b"\n\n") if e]


async def test_kill_worker_mid_stream(cluster: LocalCluster, client: openai.OpenAI) -> None:
    async with aiohttp.ClientSession() as s:
        streams = await asyncio.gather(*(_open_stream(s, cluster.url, i) for i in range(4)))
        placed = {
            e["request_id"]: e["worker_id"]
            for e in cluster.gateway_log()
            if e["event"] == "request_placed"
        }
        victim = placed[streams[0][0]]  # w0 or w2, whichever holds the first stream
        cluster.kill_child(f"worker {victim}", signal.SIGSTOP)  # frozen mid-stream, then killed
        doomed = {rid for rid, _ in streams if placed[rid] == victim}
        assert len(doomed) < 4  # equal capacities: least-loaded spread them over w0 and w2
        cluster.kill_child(f"worker {victim}")
        ends = await asyncio.gather(*(_rest(r) for _, r in streams))
    for events in ends:  # the doomed ones resumed on the other worker of mell-tiny
        assert events[-1] == b"[DONE]"
        last = json.loads(events[-2])
        assert last["choices"][0]["finish_reason"] == "length", last
    resumed = [e for e in cluster.gateway_log() if e["event"] == "request_resumed"]
    assert {e["request_id"] for e in resumed} == doomed
    again = client.completions.create(model="mell-tiny", prompt="still there?", max_tokens=4)
    assert again.choices[0].finish_reason in ("length", "stop")
    status, health = get_json(cluster.url + "/health")
    assert status == 200  # w2 still serves mell-tiny
    assert [w["worker_id"] for w in health["lost_workers"]] == [victim]
    assert health["models"]["mell-tiny"] == {"joining": 0, "active": 1, "draining": 0, "lost": 1}


def test_model_without_workers_is_503(cluster: LocalCluster, client: openai.OpenAI) -> None:
    cluster.kill_child("worker w1")
    wait_until(lambda: get_json(cluster.url + "/health")[0] == 503, 10, "health 503")
    status, health = get_json(cluster.url + "/health")
    assert status == 503 and health["models"]["tiny-b"]["active"] == 0
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model="tiny-b", prompt="anyone?", max_tokens=4)
    assert info.value.status_code == 503
    assert info.value.response.headers["Retry-After"]
    assert info.value.body["type"] == "ServiceUnavailableError"  # type: ignore[index]
    ok = client.completions.create(model="mell-tiny", prompt="fine", max_tokens=2)
    assert ok.usage is not None and ok.usage.completion_tokens >= 1
    import urllib.request

    with urllib.request.urlopen(cluster.url + "/metrics") as r:
        text = r.read().decode()
    assert metric(text, "mell:active_workers", model_name="tiny-b") == 0
    assert metric(text, "mell:active_workers", model_name="mell-tiny") == 1
