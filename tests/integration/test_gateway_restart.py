"""Crash test: kill -9 the gateway while streams run, start it again on the same data directory
and worker endpoint.

After the restart the gateway replays its journal, the workers say hello again listing what they
hold, and every request whose client died with the old gateway is aborted on its worker: within
the reconcile deadline the view agrees with the workers' own load reports (no request, no KV
block held) and the journal checks clean. Real processes: one gateway, two mell-tiny workers.

The machine is shared (the suite runs beside other work), so nothing here depends on a worker
being quick: a worker that says hello only after the deadline is declared lost there, and its
requests are still recorded aborted at the deadline; the test polls for the outcome, whichever
path the workers took, with margins far above the deadlines.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from mell_cluster import MELLCTL, get_json, wait_until

from mell.gateway.admin.token import read_token
from mell.gateway.cluster.recovery import RESTART_REASON
from mell.gateway.mellctl.main import main as mellctl

pytestmark = pytest.mark.slow
RECONCILE_S = 3.0
WORKER_TIMEOUT_S = 5.0  # a loaded machine can stall a worker's loop (its heartbeats) for seconds
SETTLE_S = 30.0  # polling margin beyond the deadlines


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """The processes this test starts; only these are ever signalled."""

    def __init__(self, data_dir: Path, endpoint: str) -> None:
        self.data_dir = data_dir
        self.endpoint = endpoint
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def gateway(self) -> dict[str, str]:
        cmd = [sys.executable, "-m", "mell.gateway.main", "--port", "0", "--admin-port", "0",
               "--worker-endpoint", self.endpoint, "--data-dir", str(self.data_dir),
               "--worker-timeout", str(WORKER_TIMEOUT_S),
               "--reconcile-timeout", str(RECONCILE_S)]  # fmt: skip
        log = open(self.data_dir / "gateway.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log)
        log.close()
        self.procs["gateway"] = proc
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if ready else b""
        assert line, (self.data_dir / "gateway.log").read_text()[-2000:]
        return json.loads(line)

    def worker(self, worker_id: str) -> None:
        cmd = [sys.executable, "-m", "mell.workerd.main", "--gateway", self.endpoint,
               "--model", "mell-tiny", "--worker-id", worker_id, "--data-dir",
               str(self.data_dir), "--device", "cpu", "--num-kv-blocks", "128"]  # fmt: skip
        log = open(self.data_dir / f"{worker_id}.log", "ab")  # noqa: SIM115
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.procs[worker_id] = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=log, env=env
        )
        log.close()

    def send(self, name: str, sig: int) -> None:
        if self.procs[name].poll() is None:
            self.procs[name].send_signal(sig)

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> int:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def stop_all(self) -> None:
        for name in ("gateway", *sorted(n for n in self.procs if n != "gateway")):
            self.stop(name, signal.SIGKILL if name == "gateway" else signal.SIGTERM)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    p = Processes(tmp_path, f"tcp://127.0.0.1:{_free_port()}")
    yield p
    p.stop_all()


def _admin(addresses: dict[str, str], data_dir: Path, path: str) -> Any:
    auth = {"Authorization": f"Bearer {read_token(data_dir / 'admin.token')}"}
    status, body = get_json(addresses["admin"] + "/admin/v1" + path, auth)
    assert status == 200, body
    return body


async def _stream(url: str, started: asyncio.Event, counter: list[int]) -> None:
    body = {"model": "mell-tiny", "prompt": "tell me a long story", "max_tokens": 1000,
            "stream": True, "ignore_eos": True}  # fmt: skip
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            async with session.post(url + "/v1/completions", json=body) as response:
                async for _chunk in response.content.iter_any():
                    counter[0] += 1
                    if counter[0] >= 4:
                        started.set()
        except aiohttp.ClientError:
            pass  # the gateway was killed under it


def _admin_lines(addresses: dict[str, str], data_dir: Path, path: str) -> list[Any]:
    import urllib.request

    token = read_token(data_dir / "admin.token")
    request = urllib.request.Request(
        addresses["admin"] + "/admin/v1" + path, headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return [json.loads(line) for line in response.read().splitlines() if line.strip()]


def _quiet(addresses: dict[str, str], data_dir: Path) -> bool:
    """Every worker back and active, holding nothing, and the view holding nothing either."""
    workers = _admin(addresses, data_dir, "/workers")["workers"]
    requests = _admin(addresses, data_dir, "/requests")["requests"]
    return (
        len(workers) == 2
        and all(w["state"] == "active" for w in workers)
        and all(w["num_running"] == w["num_waiting"] == w["used_blocks"] == 0 for w in workers)
        and all(w["num_requests"] == 0 for w in workers)
        and requests == []
    )


def _last_events(addresses: dict[str, str], data_dir: Path, request_ids: list[str]) -> list[Any]:
    """Each request's last recorded event, load reports aside (they are the workers' view: one
    made before the worker took the abort can be recorded after it)."""
    path = "/events?tail=1000&request="
    trails = [_admin_lines(addresses, data_dir, path + rid) for rid in request_ids]
    own = [[e for e in trail if e["type"] != "LoadReported"] for trail in trails]
    return [events[-1] if events else {} for events in own]


def _ended_for_the_restart(events: list[Any]) -> bool:
    return all(e.get("type") == "RequestAborted" and e["reason"] == RESTART_REASON for e in events)


def _reconciled(addresses: dict[str, str], data_dir: Path, request_ids: list[str]) -> bool:
    """Quiet, and each of the dead requests recorded aborted for the restart (on hello, or at
    the deadline when its worker was declared lost before it said hello)."""
    if not _quiet(addresses, data_dir):
        return False
    return _ended_for_the_restart(_last_events(addresses, data_dir, request_ids))


async def _streams_running(procs: Processes) -> tuple[dict[str, str], list[Any], list[Any]]:
    """A gateway and two workers serving four long streams that hold KV on both workers:
    (the gateway's addresses, the requests as the admin API lists them, the stream tasks)."""
    data_dir = procs.data_dir
    first = procs.gateway()
    procs.worker("w0")
    procs.worker("w1")
    wait_until(
        lambda: _admin(first, data_dir, "/status")["totals"]["active"] == 2, 90, "workers active"
    )

    counters = [[0] for _ in range(4)]
    events = [asyncio.Event() for _ in counters]
    streams = [
        asyncio.create_task(_stream(first["http"], e, c))
        for e, c in zip(events, counters, strict=True)
    ]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
    running = _admin(first, data_dir, "/requests")["requests"]
    assert len(running) == 4 and {r["worker_id"] for r in running} == {"w0", "w1"}

    def holding() -> bool:  # the workers report KV held for the streams
        workers = _admin(first, data_dir, "/workers")["workers"]
        return all(w["used_blocks"] > 0 and w["num_running"] > 0 for w in workers)

    await asyncio.to_thread(wait_until, holding, SETTLE_S, "load reports of the streams")
    return first, running, list(zip(streams, counters, strict=True))


async def _kill_gateway(procs: Processes, streams: list[Any]) -> None:
    procs.stop("gateway", signal.SIGKILL)
    await asyncio.wait_for(asyncio.gather(*(task for task, _ in streams)), 30)
    assert all(counter[0] < 1000 for _, counter in streams)  # no stream had finished


async def _still_serving_and_journal_clean(
    procs: Processes, second: dict[str, str], running: list[Any]
) -> None:
    data_dir = procs.data_dir
    status, body = await asyncio.to_thread(
        _complete, second["http"], {"model": "mell-tiny", "prompt": "hi", "max_tokens": 4}
    )
    assert status == 200 and body["choices"][0]["finish_reason"] in ("length", "stop")

    assert procs.stop("gateway") == 0
    assert mellctl(["journal", "check", str(data_dir / "journal")]) == 0
    trail = _journal_events(data_dir)
    aborted = {e["request_id"] for e in trail if e.get("type") == "RequestAborted"
               and e.get("reason") == RESTART_REASON}  # fmt: skip
    assert aborted == {r["request_id"] for r in running}


async def test_kill_9_and_restart_the_gateway(procs: Processes) -> None:
    data_dir = procs.data_dir
    first, running, streams = await _streams_running(procs)
    await _kill_gateway(procs, streams)

    second = procs.gateway()
    assert second["workers"] == first["workers"]
    totals = _admin(second, data_dir, "/status")["totals"]
    # The view came back from the journal: both workers (one already lost if the deadline
    # passed before it said hello, on a loaded machine).
    assert totals["workers"] + totals["lost"] == 2
    ids = [r["request_id"] for r in running]
    await asyncio.to_thread(
        wait_until, lambda: _reconciled(second, data_dir, ids), RECONCILE_S + SETTLE_S, "reconcile"
    )
    for event in _last_events(second, data_dir, ids):  # each recorded aborted for the restart
        assert event["type"] == "RequestAborted" and event["reason"] == RESTART_REASON
    log = [json.loads(x) for x in (data_dir / "gateway.log").read_text().splitlines()
           if x.startswith("{")]  # fmt: skip
    assert any(e.get("event") == "journal_replayed" and e["workers"] == 2 for e in log)
    await _still_serving_and_journal_clean(procs, second, running)


async def test_workers_silent_past_the_deadline_are_lost_and_their_requests_still_ended(
    procs: Processes,
) -> None:
    """The race a loaded machine runs: workers that cannot say hello before the reconcile
    deadline (frozen here) are declared lost, and the requests they held are still recorded
    aborted for the restart; woken, the workers rejoin and drop them."""
    data_dir = procs.data_dir
    _, running, streams = await _streams_running(procs)
    ids = [r["request_id"] for r in running]
    try:
        for name in ("w0", "w1"):
            procs.send(name, signal.SIGSTOP)
        await _kill_gateway(procs, streams)
        second = procs.gateway()

        def lost_and_ended() -> bool:
            totals = _admin(second, data_dir, "/status")["totals"]
            ended = _ended_for_the_restart(_last_events(second, data_dir, ids))
            return totals["lost"] == 2 and totals["requests"] == 0 and ended

        await asyncio.to_thread(
            wait_until, lost_and_ended, RECONCILE_S + SETTLE_S, "lost workers, ended requests"
        )
    finally:
        for name in ("w0", "w1"):
            procs.send(name, signal.SIGCONT)
    await asyncio.to_thread(
        wait_until, lambda: _reconciled(second, data_dir, ids), SETTLE_S, "rejoined workers"
    )
    await _still_serving_and_journal_clean(procs, second, running)


def _complete(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    import urllib.request

    request = urllib.request.Request(
        url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, json.loads(response.read())


def _journal_events(data_dir: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        [*MELLCTL, "events", "--journal",
         str(data_dir / "journal"), "--json"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return [json.loads(line) for line in out.stdout.splitlines()]
