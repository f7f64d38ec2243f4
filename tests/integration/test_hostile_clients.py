"""The gateway against hostile clients (issue 14): real gateway and fake-rate worker processes.

Each test here failed on the code before the fix: a 500 for deep JSON and for non-UTF-8 bytes in
Authorization, a 200 then an error line for `tail=10**24`, a 10 MB prompt read, tokenized on the
event loop (every stream stalled for seconds) and the gateway's RSS 1 GB higher.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from fake_cluster import FakeCluster, long_context_copy, post, rss_bytes, start_fake_cluster

from mell.common.tiny_model import ensure_tiny_model

pytestmark = pytest.mark.slow
KEY = "k3y"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG_LEN = 400_000  # tiny-long's context: a 4 MB prompt passes the size bound, then is too long


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeCluster]:
    data_dir = tmp_path_factory.mktemp("hostile")
    long_model = long_context_copy(data_dir, "tiny-long", LONG_LEN)
    c = start_fake_cluster(data_dir, "--model", str(long_model), api_key=KEY)
    yield c
    c.stop()


def _raw_post(cluster: FakeCluster, path: str, body: bytes, headers: list[tuple[bytes, bytes]]):
    host, port = cluster.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", path)
    for name, value in [(b"Content-Type", b"application/json"), *headers]:
        conn.putheader(name, value)
    conn.putheader(b"Content-Length", str(len(body)).encode())
    conn.endheaders(body)
    response = conn.getresponse()
    out = response.status, response.read()
    conn.close()
    return out


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_json_nested_1000_deep_is_a_400(cluster: FakeCluster, path: str) -> None:
    deep = b"[" * 1000 + b"]" * 1000
    text = b'"messages":[]' if "chat" in path else b'"prompt":"a"'
    body = b'{"model":"mell-tiny",' + text + b',"guided_json":' + deep + b"}"
    status, answer = post(cluster, path, body, AUTH)
    assert status == 400, answer
    assert "nested too deeply" in answer["error"]["message"]


def test_non_utf8_authorization_is_a_401(cluster: FakeCluster) -> None:
    body = json.dumps({"prompt": "hi", "max_tokens": 1}).encode()
    status, raw = _raw_post(
        cluster, "/v1/completions", body, [(b"Authorization", b"Bearer \xff\xfe")]
    )
    assert status == 401, raw
    host, port = cluster.admin_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.putrequest("GET", "/admin/v1/workers")
    conn.putheader(b"Authorization", b"Bearer \xc3\x28")
    conn.endheaders()
    assert conn.getresponse().status == 401
    conn.close()


@pytest.mark.parametrize("tail", [str(10**24), "1" * 5000, "x"])
def test_events_tail_out_of_range_is_a_400_before_the_body(cluster: FakeCluster, tail: str) -> None:
    request = urllib.request.Request(
        f"{cluster.admin_url}/admin/v1/events?tail={tail}",
        headers={"Authorization": f"Bearer {cluster.admin_token}"},
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 400
    assert "tail" in json.loads(info.value.read())["error"]["message"]


def test_10_mb_body_is_refused_at_once(cluster: FakeCluster) -> None:
    rss_before = rss_bytes(cluster.gateway_pid)
    prompt = "All work and no play makes Jack a dull boy. " * 240_000  # 10.5 MB
    start = time.monotonic()
    status, answer = post(
        cluster, "/v1/completions", {"model": "mell-tiny", "prompt": prompt}, AUTH
    )
    elapsed = time.monotonic() - start
    assert status == 400, answer  # by its size: mell-tiny's context holds 53,248 characters
    assert "10560000 characters" in answer["error"]["message"]
    assert elapsed < 2.0
    assert rss_bytes(cluster.gateway_pid) - rss_before < 100 << 20


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_prompt_longer_than_the_context_can_hold_is_a_400_before_tokenizing(
    cluster: FakeCluster, path: str
) -> None:
    prompt = "x" * 60_000  # mell-tiny: 2048 tokens of at most 13 bytes each, x2 = 53,248 chars
    body: dict[str, object] = {"model": "mell-tiny"}
    if "chat" in path:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    status, answer = post(cluster, path, body, AUTH)
    assert status == 400, answer
    assert "characters" in answer["error"]["message"]


async def _stream_gaps(url: str, stop: asyncio.Event) -> float:
    """The largest gap between two chunks of one stream, while `stop` is not set."""
    body = {"model": "mell-tiny", "prompt": "go", "max_tokens": 2000, "stream": True,
            "ignore_eos": True}  # fmt: skip
    largest = 0.0
    async with (
        aiohttp.ClientSession(headers=AUTH) as session,
        session.post(url + "/v1/completions", json=body) as response,
    ):
        assert response.status == 200
        last = time.monotonic()
        async for _ in response.content.iter_any():
            now = time.monotonic()
            largest = max(largest, now - last)
            last = now
            if stop.is_set():
                break
    return largest


async def test_long_prompt_is_tokenized_off_the_event_loop(cluster: FakeCluster) -> None:
    """A 4 MB prompt to a model whose context could hold it by size: tokenized in full (2M+
    tokens, seconds of CPU), then refused for its length; running streams see no stall."""
    prompt = "All work and no play makes Jack a dull boy. " * 95_000  # 4.2 MB
    stop = asyncio.Event()
    streams = [asyncio.create_task(_stream_gaps(cluster.url, stop)) for _ in range(8)]
    await asyncio.sleep(1.0)
    rss_before = rss_bytes(cluster.gateway_pid)
    async with aiohttp.ClientSession(headers=AUTH) as session:
        start = time.monotonic()
        body = {"model": "tiny-long", "prompt": prompt, "max_tokens": 1}
        async with session.post(cluster.url + "/v1/completions", json=body) as response:
            answer = await response.json()
        took = time.monotonic() - start
    rss_after = rss_bytes(cluster.gateway_pid)
    await asyncio.sleep(0.5)
    stop.set()
    gaps = await asyncio.gather(*streams)
    assert response.status == 400, answer
    assert "maximum context length is 400000 tokens" in answer["error"]["message"]
    assert took > 0.5  # it was really tokenized
    assert max(gaps) < 0.5, (max(gaps), took)  # 50 tokens/s: one every 20 ms
    assert rss_after - rss_before < 200 << 20


def test_in_flight_back_to_zero(cluster: FakeCluster) -> None:
    with urllib.request.urlopen(cluster.url + "/load", timeout=10) as response:
        assert json.loads(response.read())["server_load"] == 0


def test_bad_checkpoints_are_one_line_errors(tmp_path: Path) -> None:
    tiny = ensure_tiny_model(tmp_path / "models" / "mell-tiny")
    cases = {}
    for name, damage in (("notjson", "config"), ("notok", "tokenizer")):
        copy = tmp_path / name
        shutil.copytree(tiny, copy)
        if damage == "config":
            (copy / "config.json").write_bytes(b"\xff{not json")
        else:
            (copy / "tokenizer.json").unlink()
        cases[name] = copy
    for name, copy in cases.items():
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "mell.gateway.main",
                "--port",
                "0",
                "--admin-port",
                "0",
                "--worker-endpoint",
                "tcp://127.0.0.1:0",
                "--data-dir",
                str(tmp_path / name / "d"),
                "--model",
                str(copy),
            ],
            capture_output=True,
            timeout=60,
        )
        err = proc.stderr.decode()
        assert proc.returncode == 2, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert str(copy) in err
