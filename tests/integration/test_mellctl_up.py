"""`mellctl up` itself: one ready line, children stopped on SIGTERM, a failed child named."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from mell_cluster import MELLCTL, get_json, start_cluster

from mell.gateway.mellctl.running import record_path

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.split(") ")[1][0] != "Z"


def test_up_serves_then_stops_every_child(tmp_path: Path) -> None:
    cluster = start_cluster(tmp_path, "--workers", "2", "--fake-token-rate", "200")
    try:
        status, health = get_json(cluster.url + "/health")
        assert status == 200 and health["models"]["mell-tiny"]["active"] == 2
        assert (tmp_path / "models/mell-tiny/config.json").is_file()  # created on first use
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        status = subprocess.run(
            [*MELLCTL, "status", "--json"], cwd=elsewhere, capture_output=True, timeout=60
        )
        assert status.returncode == 0, status.stderr  # found through the running-cluster record
        assert json.loads(status.stdout)["workers"][0]["model"] == "mell-tiny"
        cluster.proc.send_signal(signal.SIGTERM)
        assert cluster.proc.wait(30) == 0
        assert not any(_alive(pid) for pid in cluster.pids.values())
        assert not record_path().exists()  # the record goes with the cluster
        assert cluster.proc.stdout is not None
        assert cluster.proc.stdout.read() == b""  # the ready line was the only one
        assert "admin API at http://127.0.0.1:" in (tmp_path / "mellctl.err").read_text()
    finally:
        cluster.stop()


def test_up_names_the_child_that_failed(tmp_path: Path) -> None:
    cmd = [
        *MELLCTL,
        "up",
        "--data-dir",
        str(tmp_path),
        "--device",
        "no-such-device",
    ]
    done = subprocess.run(cmd, capture_output=True, timeout=120)
    assert done.returncode == 1
    assert b"worker w0" in done.stderr and b"exited with code" in done.stderr
    assert b"worker-w0.log" in done.stderr


def test_up_rejects_more_models_than_workers(tmp_path: Path) -> None:
    cmd = [
        *MELLCTL,
        "up",
        "--data-dir",
        str(tmp_path),
        "--model",
        "mell-tiny",
        "--model",
        str(tmp_path),
        "--workers",
        "1",
    ]
    done = subprocess.run(cmd, capture_output=True, timeout=60)
    assert done.returncode == 1 and b"cannot serve 2 models" in done.stderr


def test_second_up_on_the_same_data_dir_names_the_journal_lock(tmp_path: Path) -> None:
    cluster = start_cluster(tmp_path, "--workers", "1", "--fake-token-rate", "50")
    try:
        cmd = [*MELLCTL, "up", "--data-dir", str(tmp_path), "--workers", "1",
               "--fake-token-rate", "50"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, timeout=120)
        err = done.stderr.decode()
        assert done.returncode == 1, err
        last = err.strip().splitlines()[-1]
        assert "exited with code 4" in last and "locked by another process" in last, err
        assert "Traceback" not in err
        assert cluster.proc.poll() is None  # the first cluster is untouched
    finally:
        cluster.stop()
