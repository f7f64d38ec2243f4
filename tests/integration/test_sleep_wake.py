"""Sleep and wake on a live `mellctl up` cluster of real workers (mell-tiny on CPU): the worker
process's resident set (/proc/PID/statm) falls by the KV bytes it gives back and comes back when
it wakes; requests sent to sleeping workers complete; `mellctl status` and `/metrics` show it;
bad admin input is one error line; and `--sleep-after` puts the idle workers that the pool does
not need to sleep by itself.

3500 KV blocks of mell-tiny are 27 MiB per layer: under the worker's 32 MiB mmap threshold
(`workerd/heap.py`), so the KV lives in the C heap, which keeps freed memory unless trimmed.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mell_cluster import MELLCTL, LocalCluster, metric, post_json, start_cluster, wait_until

pytestmark = pytest.mark.slow

NUM_KV_BLOCKS = 3500


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = start_cluster(
        tmp_path_factory.mktemp("sleep") / "data",
        "--workers", "2", "--device", "cpu", "--num-kv-blocks", str(NUM_KV_BLOCKS),
        "--min-step-ms", "20",  # a 400-token request runs for 8 s
    )  # fmt: skip
    yield c
    c.stop()


def ctl(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MELLCTL, *args, "--data-dir", str(cluster.data_dir)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def status(cluster: LocalCluster) -> Any:
    result = ctl(cluster, "status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def worker(cluster: LocalCluster, worker_id: str) -> dict[str, Any]:
    return next(w for w in status(cluster)["workers"] if w["worker_id"] == worker_id)


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def complete(url: str, max_tokens: int, out: list[Any]) -> threading.Thread:
    def run() -> None:
        body = {"model": "mell-tiny", "prompt": "hello there", "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True}  # fmt: skip
        out.append(post_json(url + "/v1/completions", body))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def metrics(cluster: LocalCluster) -> str:
    with urllib.request.urlopen(cluster.url + "/metrics", timeout=10) as response:
        return str(response.read().decode())


def test_sleep_gives_the_kv_back_and_requests_wake_the_workers(cluster: LocalCluster) -> None:
    pids = {w: cluster.pids[f"worker {w}"] for w in ("w0", "w1")}
    awake = {w: rss(pid) for w, pid in pids.items()}
    wait_until(lambda: all(worker(cluster, w)["kv_pool_mapped_bytes"] for w in pids), 10, "reports")
    mapped = {w: worker(cluster, w)["kv_pool_mapped_bytes"] for w in pids}  # (no budget: all)
    assert "KV MEM" in ctl(cluster, "workers").stdout
    for w in ("w0", "w1"):
        result = ctl(cluster, "sleep", w)
        assert result.returncode == 0, result.stderr
        assert "asleep" in result.stdout and "MiB given back" in result.stdout
    rows = {w: worker(cluster, w) for w in pids}
    released = {w: rows[w]["kv_bytes_released"] for w in pids}
    assert all(r["sleeping"] for r in rows.values())
    assert mapped == released and all(r["kv_pool_mapped_bytes"] == 0 for r in rows.values())
    assert all(b >= NUM_KV_BLOCKS * 16 * 1024 for b in released.values()), released
    for w, pid in pids.items():  # the memory has left the process
        assert awake[w] - rss(pid) >= 0.9 * released[w], (w, awake[w], rss(pid), released[w])
    asleep = {w: rss(pid) for w, pid in pids.items()}

    table = ctl(cluster, "status").stdout
    assert "sleeping workers: w0, w1" in table and "MiB of KV memory given back" in table
    text = metrics(cluster)
    assert metric(text, "mell:worker_sleeping", worker="w1") == 1.0
    assert metric(text, "mell:kv_bytes_released", model_name="mell-tiny") == sum(released.values())
    assert metric(text, "mell:kv_pool_mapped_bytes", model_name="mell-tiny") == 0
    assert metric(text, "mell:kv_pool_cap_blocks", model_name="mell-tiny") == 2 * NUM_KV_BLOCKS

    # Requests placed on sleeping workers wake them and complete: none is lost.
    outs: list[Any] = []
    threads = [complete(cluster.url, 8, outs) for _ in range(6)]
    for t in threads:
        t.join(120)
    assert len(outs) == 6
    assert all(len(o["choices"][0]["text"]) > 0 for o in outs)
    assert all(o["usage"]["completion_tokens"] == 8 for o in outs)
    assert len({o["choices"][0]["text"] for o in outs}) == 1  # greedy: the same tokens
    woken = [w for w in pids if not worker(cluster, w)["sleeping"]]
    assert woken  # the placements woke at least the workers they went to
    for w in woken:
        assert rss(pids[w]) - asleep[w] >= 0.9 * released[w]  # the KV is back
    for w in pids:
        assert ctl(cluster, "wake", w).returncode == 0
    assert not status(cluster)["sleeping"]
    text = metrics(cluster)
    assert metric(text, "mell:worker_sleeping", worker="w0") == 0.0
    assert metric(text, "mell:worker_kv_pool_mapped_bytes", worker="w0") == mapped["w0"]


def test_bad_sleep_requests_get_one_error_line(cluster: LocalCluster) -> None:
    result = ctl(cluster, "sleep", "nosuch")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["mellctl: error: 404: no live worker 'nosuch'"], (
        result.stderr
    )
    outs: list[Any] = []
    thread = complete(cluster.url, 400, outs)
    wait_until(lambda: status(cluster)["totals"]["requests"] == 1, 20, "a request in flight")
    [busy] = [w["worker_id"] for w in status(cluster)["workers"] if w["num_requests"]]
    result = ctl(cluster, "sleep", busy)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "409" in lines[0] and "holds 1 requests" in lines[0], lines
    assert "Traceback" not in result.stderr
    assert not worker(cluster, busy)["sleeping"]
    thread.join(120)
    assert outs and outs[0]["usage"]["completion_tokens"] == 400


def test_idle_workers_the_pool_does_not_need_fall_asleep(tmp_path: Path) -> None:
    c = start_cluster(
        tmp_path / "data",
        "--workers", "3", "--fake-token-rate", "200", "--num-kv-blocks", "64",
        "--sleep-after", "0.5",
    )  # fmt: skip
    try:
        # The pool keeps one worker awake: two of the three fall asleep, never the third.
        wait_until(lambda: len(status(c)["sleeping"]) == 2, 20, "two workers asleep")
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            assert len(status(c)["sleeping"]) == 2
        outs: list[Any] = []
        threads = [complete(c.url, 5, outs) for _ in range(4)]
        for t in threads:
            t.join(60)
        assert len(outs) == 4 and all(o["usage"]["completion_tokens"] == 5 for o in outs)
        # Idle again: the workers the requests woke (if any) fall asleep again, but one.
        wait_until(lambda: len(status(c)["sleeping"]) == 2, 20, "two workers asleep again")
        slept = [e for e in c.gateway_log() if e.get("event") == "worker_put_to_sleep"]
        assert len(slept) >= 2
    finally:
        c.stop()
