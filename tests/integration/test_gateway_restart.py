"""Crash test: kill -9 the gateway while streams run, start it again on the same data directory
and worker endpoint.

After the restart the gateway replays its journal, the workers say hello again listing what they
hold, and every request whose client died with the old gateway is aborted on its worker: within
the reconcile deadline the view agrees with the workers' own load reports (no request, no KV
block held) and the journal checks clean. Real processes: one gateway, two mell-tiny workers.
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
from mell_cluster import get_json, wait_until

from mell.gateway.admin_token import read_token
from mell.gateway.mellctl.main import main as mellctl
from mell.gateway.recovery import RESTART_REASON

pytestmark = pytest.mark.slow
RECONCILE_S = 3.0


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
               "--worker-timeout", "2", "--reconcile-timeout", str(RECONCILE_S)]  # fmt: skip
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


async def test_kill_9_and_restart_the_gateway(procs: Processes) -> None:
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

    await asyncio.to_thread(wait_until, holding, 10, "load reports of the streams")
    procs.stop("gateway", signal.SIGKILL)
    await asyncio.wait_for(asyncio.gather(*streams), 30)
    assert all(c[0] < 1000 for c in counters)  # no stream had finished

    second = procs.gateway()
    assert second["workers"] == first["workers"]
    recovered = _admin(second, data_dir, "/status")
    assert recovered["totals"]["workers"] == 2  # the view came back from the journal
    await asyncio.to_thread(
        wait_until, lambda: _quiet(second, data_dir), RECONCILE_S + 10, "reconciled workers"
    )
    for r in running:  # each dead request was recorded aborted for the restart
        trail = _admin_lines(second, data_dir, f"/events?tail=50&request={r['request_id']}")
        assert trail[-1]["type"] == "RequestAborted" and trail[-1]["reason"] == RESTART_REASON
    log = [json.loads(x) for x in (data_dir / "gateway.log").read_text().splitlines()
           if x.startswith("{")]  # fmt: skip
    assert any(e.get("event") == "journal_replayed" and e["workers"] == 2 for e in log)

    # Still serving after the restart.
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
        [sys.executable, "-m", "mell.gateway.mellctl.main", "events", "--journal",
         str(data_dir / "journal"), "--json"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return [json.loads(line) for line in out.stdout.splitlines()]
