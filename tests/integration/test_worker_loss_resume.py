"""A worker killed with -9 under 12 running streams loses none of them: `mellctl up` on loopback.

Three workers serve mell-tiny. The same 12 streamed requests (6 greedy, 6 seeded at
temperature 0.9) run once undisturbed, then again while the worker holding most of them is
killed mid-stream: each of its requests resumes on another worker from its tokens (prompt and
the tokens already delivered, prefilled again), and every client gets exactly the output of
the undisturbed run, with no error event, gap or duplicate.

Before that, two intruders try to join the same cluster as real processes: one with another
cluster's secret, one with the id of a live worker. Each exits 2 with one error line, and the
cluster is unchanged.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import aiohttp
import pytest
from mell_cluster import LocalCluster, get_json, metric, start_cluster

from mell.transport.secret import ClusterSecret

pytestmark = pytest.mark.slow
NUM_STREAMS = 12
MAX_TOKENS = 160


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = start_cluster(
        tmp_path_factory.mktemp("resume") / "data",
        "--workers",
        "3",
        "--model",
        "mell-tiny",
        "--worker-timeout",
        "10",  # the loss must be seen from the closed connection, not from silence
        "--device",
        "cpu",
    )
    yield c
    c.stop()


def _intrude(cluster: LocalCluster, worker_id: str, secret_file: str) -> tuple[int, list[str]]:
    """Run a worker process against the cluster; its exit code and its error lines."""
    [endpoint] = [e["workers"] for e in cluster.gateway_log() if "workers" in e][-1:]
    cmd = [sys.executable, "-m", "mell.workerd.main", "--gateway", endpoint]
    cmd += ["--worker-id", worker_id, "--data-dir", str(cluster.data_dir), "--device", "cpu"]
    cmd += ["--cluster-secret-file", secret_file, "--num-kv-blocks", "64"]
    done = subprocess.run(cmd, capture_output=True, timeout=120)
    errors = [line for line in done.stderr.decode().splitlines() if '"error"' in line]
    return done.returncode, errors


def test_intruders_are_refused_and_exit_2(cluster: LocalCluster, tmp_path) -> None:
    wrong = tmp_path / "other.secret"
    ClusterSecret.create_or_load(wrong)
    assert wrong.stat().st_mode & 0o777 == 0o600
    assert (cluster.data_dir / "cluster.secret").stat().st_mode & 0o777 == 0o600
    code, errors = _intrude(cluster, "intruder", str(wrong))
    assert code == 2 and len(errors) == 1 and "secret" in errors[0], errors
    code, errors = _intrude(cluster, "w0", str(cluster.data_dir / "cluster.secret"))
    assert code == 2 and len(errors) == 1 and "held by a live worker" in errors[0], errors
    refused = [e for e in cluster.gateway_log() if e["event"] == "worker_refused"]
    assert [e["worker_id"] for e in refused] == ["intruder", "w0"]
    status, health = get_json(cluster.url + "/health")
    assert status == 200 and health["models"]["mell-tiny"]["active"] == 3
    assert health["lost_workers"] == []


def _body(i: int) -> dict[str, Any]:
    seeded = i % 2 == 1
    return {
        "model": "mell-tiny",
        "prompt": f"Request number {i} tells a story about",
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.9 if seeded else 0.0,
        "top_p": 0.95 if seeded else 1.0,
        **({"seed": 1000 + i} if seeded else {}),
    }


class Reader:
    """One streamed request: its id, its text so far, how it ended."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.request_id = ""
        self.text = ""
        self.num_chunks = 0
        self.events: list[dict[str, Any]] = []
        self.done = False

    async def read(self, until_chunks: int | None = None) -> None:
        """Read events (up to `until_chunks` text chunks, or to the end)."""
        while not self.done and (until_chunks is None or self.num_chunks < until_chunks):
            event = await self.response.content.readuntil(b"\n\n")
            assert event.startswith(b"data: "), event
            data = event[6:].strip()
            if data == b"[DONE]":
                self.done = True
                break
            parsed = json.loads(data)
            self.events.append(parsed)
            assert "error" not in parsed, parsed
            self.request_id = parsed["id"]
            for choice in parsed.get("choices", []):
                self.text += choice.get("text", "")
                self.num_chunks += 1

    def outcome(self) -> tuple[str, str | None, int]:
        finish = [c["finish_reason"] for e in self.events for c in e.get("choices", [])]
        usage = [e["usage"] for e in self.events if e.get("usage")]
        return self.text, finish[-1], usage[-1]["completion_tokens"]


async def _open(session: aiohttp.ClientSession, url: str, i: int) -> Reader:
    response = await session.post(url + "/v1/completions", json=_body(i))
    assert response.status == 200, await response.text()
    return Reader(response)


Outcome = tuple[str, str | None, int]  # text, finish reason, completion tokens


async def _run(cluster: LocalCluster, kill: bool) -> tuple[list[Outcome], set[str], float]:
    """The 12 streams' outcomes; with `kill`, the ids of the requests the victim held and
    when it was killed (unix s)."""
    timeout = aiohttp.ClientTimeout(total=240)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        readers = await asyncio.gather(*(_open(session, cluster.url, i) for i in range(12)))
        doomed: set[str] = set()
        killed_at = 0.0
        if kill:
            await asyncio.gather(*(r.read(until_chunks=3) for r in readers))
            placed = {
                e["request_id"]: e["worker_id"]
                for e in cluster.gateway_log()
                if e["event"] == "request_placed"
            }
            held = Counter(placed[r.request_id] for r in readers)
            victim = held.most_common(1)[0][0]
            assert all(not r.done for r in readers)  # all mid-stream
            cluster.kill_child(f"worker {victim}")  # SIGKILL
            killed_at = time.time()
            doomed = {r.request_id for r in readers if placed[r.request_id] == victim}
        await asyncio.gather(*(r.read() for r in readers))
    return [r.outcome() for r in readers], doomed, killed_at


def test_kill_9_of_a_worker_loses_no_stream(cluster: LocalCluster) -> None:
    reference, _, _ = asyncio.run(asyncio.wait_for(_run(cluster, kill=False), 240))
    assert all(r[1] == "length" and r[2] == MAX_TOKENS for r in reference)
    assert len({r[0] for r in reference}) > NUM_STREAMS // 2  # seeds and prompts differ
    killed_at = time.monotonic()
    outcomes, doomed, killed_at_unix = asyncio.run(asyncio.wait_for(_run(cluster, kill=True), 240))
    assert outcomes == reference  # same text, finish reason and token count, for every client
    log = cluster.gateway_log()
    resumed = [e for e in log if e["event"] == "request_resumed"]
    assert {e["request_id"] for e in resumed} == doomed and len(resumed) >= 3
    [victim] = {e["lost_worker_id"] for e in resumed}
    assert all(e["num_output_tokens"] >= 3 for e in resumed)
    lost = [e for e in log if e["event"] == "worker_lost" and e["worker_id"] == victim]
    assert [e["reason"] for e in lost] == ["connection closed"]  # not the 10 s silence
    seen_at = datetime.fromisoformat(lost[0]["timestamp"]).timestamp()
    assert seen_at - killed_at_unix < 0.5  # a fraction of a second
    with urllib.request.urlopen(cluster.url + "/metrics") as r:
        text = r.read().decode()
    assert metric(text, "mell:requests_resumed_total", model_name="mell-tiny") == len(resumed)
    assert time.monotonic() - killed_at < 240
