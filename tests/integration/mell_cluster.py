"""Helpers of the serving integration tests: a `mellctl up` cluster and SSE parsing.

Every process a test starts is recorded by pid and only those are ever signalled.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp


@dataclass
class LocalCluster:
    url: str
    data_dir: Path
    proc: subprocess.Popen[bytes]
    pids: dict[str, int] = field(default_factory=dict)  # child name -> pid

    def kill_child(self, name: str, sig: int = signal.SIGKILL) -> None:
        os.kill(self.pids[name], sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.pids.values():  # anything mellctl could not stop
            if _is_ours(pid):
                os.kill(pid, signal.SIGKILL)

    def gateway_log(self) -> list[dict[str, Any]]:
        lines = (self.data_dir / "logs" / "gateway.log").read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]


MELLCTL = [sys.executable, "-m", "mell.gateway.mellctl.main"]  # the CLI, as a command line


def start_cluster(data_dir: Path, *args: str, timeout_s: float = 150.0) -> LocalCluster:
    data_dir.mkdir(parents=True, exist_ok=True)
    cmd = [*MELLCTL, "up", "--data-dir", str(data_dir), *args]
    err = open(data_dir / "mellctl.err", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
    err.close()
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    line = proc.stdout.readline().decode() if ready else ""
    if "http://" not in line:
        proc.kill()
        proc.wait()
        raise RuntimeError(
            f"mellctl up did not start: {line!r} {(data_dir / 'mellctl.err').read_text()}"
        )
    url = next(w for w in line.split() if w.startswith("http://"))
    state = json.loads((data_dir / "up.json").read_text())
    pids = {c["name"]: c["pid"] for c in state["children"]}
    return LocalCluster(url, data_dir, proc, pids)


def _is_ours(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"mell." in cmdline


def get_json(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def post_json(url: str, body: Any, timeout_s: float = 120.0) -> Any:
    """POST `body` as JSON; the decoded reply (an HTTP error raises)."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, 0.0 when absent."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + ("{" if labels else " ")) and (not want or want in line):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_until(predicate: Any, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


async def sse_events(response: aiohttp.ClientResponse) -> list[bytes]:
    """The `data:` payloads of an SSE response, in order, `[DONE]` included."""
    events = []
    buffer = b""
    async for chunk in response.content.iter_any():
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            assert event.startswith(b"data: "), event
            events.append(event[6:])
    assert buffer == b""
    return events
