"""Bad flags, files and endpoints get one line on stderr and the documented exit code, never a
traceback (issue 14): `mell-gateway` 2 bad configuration, 1 cannot listen; `mell-workerd` 2 bad
flags; `mellctl` 1 on failure, 2 usage. Each case below was a traceback or accepted silently."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

GATEWAY = [sys.executable, "-m", "mell.gateway.main", "--port", "0", "--admin-port", "0"]
WORKER = [sys.executable, "-m", "mell.workerd.main", "--fake-token-rate", "1"]
MELLCTL = [sys.executable, "-m", "mell.gateway.mellctl.main"]


def _one_line(cmd: list[str], code: int, *words: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    err = proc.stderr.decode()
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert lines and all(w in lines[-1] for w in words), err
    return lines[-1]


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--port", "70000"], ["'port'", "65535"]),
        (["--admin-port", "-1"], ["'admin_port'", ">= 0"]),
        (["--max-queued-requests", "0"], ["'max_queued_requests'", ">= 1"]),
        (["--worker-timeout", "-3"], ["'worker_timeout_s'", "> 0"]),
        (["--reconcile-timeout", "0"], ["'reconcile_timeout_s'", "> 0"]),
        (["--worker-endpoint", "localhost:7100"], ["'worker_endpoint'", "ZeroMQ address"]),
        (["--worker-endpoint", "tcp://127.0.0.1:99999"], ["'worker_endpoint'"]),
    ],
)
def test_gateway_flags_out_of_range(tmp_path: Path, flags: list[str], words: list[str]) -> None:
    _one_line([*GATEWAY, "--data-dir", str(tmp_path), *flags], 2, "mell-gateway:", *words)


def test_gateway_log_level_nonsense(tmp_path: Path) -> None:
    _one_line([*GATEWAY, "--log-level", "nonsense"], 2, "--log-level", "nonsense")


def test_gateway_config_file_values_validated(tmp_path: Path) -> None:
    config = tmp_path / "gw.toml"
    config.write_text("[journal]\nsegment_bytes = -5\n")
    cmd = [*GATEWAY, "--data-dir", str(tmp_path), "--config", str(config)]
    _one_line(cmd, 2, str(config), "journal.segment_bytes")


def test_gateway_flags_over_a_config_validated(tmp_path: Path) -> None:
    config = tmp_path / "gw.toml"
    config.write_text("port = 8000\n")
    cmd = [*GATEWAY, "--data-dir", str(tmp_path), "--config", str(config), "--port", "65536"]
    _one_line(cmd, 2, "'port'")


def test_gateway_worker_endpoint_not_of_this_host(tmp_path: Path) -> None:
    cmd = [*GATEWAY, "--data-dir", str(tmp_path), "--worker-endpoint", "tcp://10.255.1.2:7100"]
    _one_line(cmd, 1, "mell-gateway:", "10.255.1.2")


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--device", "foo"], ["'engine.device'", '"cuda:N"']),
        (["--gateway", "127.0.0.1:7100"], ["'gateway'", "ZeroMQ address"]),
        (["--block-size", "0"], ["'engine.block_size'"]),
        (["--drain-grace", "-1"], ["'drain_grace_s'"]),
        (["--log-level", "nonsense"], ["--log-level"]),
    ],
)
def test_worker_bad_flags(tmp_path: Path, flags: list[str], words: list[str]) -> None:
    _one_line([*WORKER, "--data-dir", str(tmp_path), *flags], 2, *words)


def test_init_tiny_onto_a_file(tmp_path: Path) -> None:
    target = tmp_path / "a-file"
    target.write_text("x")
    _one_line([*MELLCTL, "model", "init-tiny", str(target)], 1, "mellctl: error:", str(target))
