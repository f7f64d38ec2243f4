"""A gateway and one `--fake-token-rate` worker as real processes on loopback (no model
compute: the worker emits one token per running request every 1/rate s), for tests of the
HTTP surface under hostile input. Only the processes started here are ever signalled."""

from __future__ import annotations

import json
import select
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mell.common.tiny_model import ensure_tiny_model

PY = sys.executable


@dataclass
class FakeCluster:
    url: str
    admin_url: str
    admin_token: str
    data_dir: Path
    headers: dict[str, str] = field(default_factory=dict)  # sent with every `post`
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def gateway_pid(self) -> int:
        return self.procs[0].pid

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def long_context_copy(data_dir: Path, name: str, max_model_len: int) -> Path:
    """A copy of mell-tiny whose config claims a context of `max_model_len` tokens."""
    tiny = ensure_tiny_model(data_dir / "models" / "mell-tiny")
    copy = data_dir / "models" / name
    shutil.copytree(tiny, copy, dirs_exist_ok=True)
    config = json.loads((copy / "config.json").read_text())
    config["max_position_embeddings"] = max_model_len
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def start_fake_cluster(
    data_dir: Path,
    *gateway_args: str,
    api_key: str = "",
    rate: float = 50.0,
    timeout_s: float = 60.0,
) -> FakeCluster:
    """Gateway serving mell-tiny (plus `gateway_args`), one fake worker for mell-tiny; returns
    once a completion goes through."""
    data_dir.mkdir(parents=True, exist_ok=True)
    ensure_tiny_model(data_dir / "models" / "mell-tiny")
    gw = subprocess.Popen(
        [
            PY,
            "-m",
            "mell.gateway.main",
            "--port",
            "0",
            "--admin-port",
            "0",
            "--worker-endpoint",
            "tcp://127.0.0.1:0",
            "--data-dir",
            str(data_dir),
            "--model",
            "mell-tiny",
            *(["--api-key", api_key] if api_key else []),
            *gateway_args,
        ],
        stdout=subprocess.PIPE,
        stderr=open(data_dir / "gateway.log", "wb"),  # noqa: SIM115
    )
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    cluster = FakeCluster("", "", "", data_dir, headers, [gw])
    try:
        assert gw.stdout is not None
        ready, _, _ = select.select([gw.stdout], [], [], timeout_s)
        line = gw.stdout.readline() if ready else b""
        if not line:
            raise RuntimeError(f"gateway did not start: {(data_dir / 'gateway.log').read_text()}")
        addrs = json.loads(line)
        cluster.url, cluster.admin_url = addrs["http"], addrs["admin"]
        cluster.admin_token = (data_dir / "admin.token").read_text().strip()
        worker = subprocess.Popen(
            [
                PY,
                "-m",
                "mell.workerd.main",
                "--gateway",
                addrs["workers"],
                "--model",
                "mell-tiny",
                "--worker-id",
                "w0",
                "--data-dir",
                str(data_dir),
                "--fake-token-rate",
                str(rate),
                "--num-kv-blocks",
                "100000",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(data_dir / "w0.log", "wb"),  # noqa: SIM115
        )
        cluster.procs.append(worker)
        _wait_served(cluster, timeout_s)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_served(cluster: FakeCluster, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, _ = post(cluster, "/v1/completions", {"prompt": "hi", "max_tokens": 1})
        if status == 200:
            return
        time.sleep(0.2)
    raise RuntimeError("the fake cluster never served a completion")


def post(
    cluster: FakeCluster, path: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """POST JSON (or raw bytes) to the gateway; (status, decoded body or raw bytes)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        cluster.url + path,
        data=data,
        headers={"Content-Type": "application/json", **cluster.headers, **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, _decoded(response.read())
    except urllib.error.HTTPError as err:
        return err.code, _decoded(err.read())


def _decoded(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")
