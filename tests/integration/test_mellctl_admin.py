"""`mellctl status|workers|requests|events|drain|undrain` against a live `mellctl up` cluster.

The commands run as real processes (exit codes and stderr as an operator sees them), finding the
gateway from the data directory, flags, or the config file.
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
from mell_cluster import MELLCTL, LocalCluster, start_cluster, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = start_cluster(
        tmp_path_factory.mktemp("admin") / "data",
        "--workers", "2", "--fake-token-rate", "40", "--num-kv-blocks", "64",
    )  # fmt: skip
    yield c
    c.stop()


def ctl(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Any:
    return subprocess.run(
        [*MELLCTL, *args],
        capture_output=True, text=True, timeout=60, env=env, cwd=cwd,
    )  # fmt: skip


def ctl_json(cluster: LocalCluster, *args: str) -> Any:
    result = ctl(*args, "--json", "--data-dir", str(cluster.data_dir))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _stream(url: str, max_tokens: int) -> threading.Thread:
    def run() -> None:
        body = {"model": "mell-tiny", "prompt": "hi", "max_tokens": max_tokens,
                "ignore_eos": True}  # fmt: skip
        request = urllib.request.Request(
            url + "/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_status_table_and_json(cluster: LocalCluster) -> None:
    result = ctl("status", "--data-dir", str(cluster.data_dir))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["WORKER", "MODEL", "STATE", "KV"]
    assert any(line.startswith("w0 ") and " active " in line for line in lines)
    assert any(line.startswith("releasable workers: ") for line in lines)
    assert max(len(line) for line in lines) <= 100
    body = ctl_json(cluster, "status")
    assert body["totals"]["workers"] == 2 and body["totals"]["active"] == 2
    assert [m["model"] for m in body["models"]] == ["mell-tiny"]


def test_requests_and_events_of_a_running_request(cluster: LocalCluster) -> None:
    thread = _stream(cluster.url, 200)  # 5 s at 40 tokens/s
    wait_until(lambda: ctl_json(cluster, "requests")["requests"], 10, "a request in flight")
    [request] = ctl_json(cluster, "requests")["requests"]
    assert request["streaming"] and request["state"] in ("placed", "running")
    table = ctl("requests", "--data-dir", str(cluster.data_dir)).stdout
    assert request["request_id"] in table and "yes" in table
    on_worker = ctl_json(cluster, "requests", "--worker", request["worker_id"])["requests"]
    assert [r["request_id"] for r in on_worker] == [request["request_id"]]

    def kinds() -> list[str]:
        result = ctl("events", "--request", request["request_id"], "--json",
                     "--data-dir", str(cluster.data_dir))  # fmt: skip
        return [json.loads(line)["type"] for line in result.stdout.splitlines()]

    wait_until(lambda: "RequestAdmitted" in kinds(), 10, "admitted")
    assert kinds()[0] == "RequestPlaced"
    thread.join(30)
    wait_until(lambda: "RequestFinished" in kinds(), 10, "finished")
    text = ctl("events", "--tail", "3", "--data-dir", str(cluster.data_dir)).stdout
    assert text and max(len(line) for line in text.splitlines()) <= 100


def test_drain_and_undrain_with_a_follower(cluster: LocalCluster) -> None:
    follower = subprocess.Popen(
        [*MELLCTL, "events", "--follow", "--tail", "0",
         "--worker", "w1", "--json", "--data-dir", str(cluster.data_dir)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(1.0)  # the follower is connected (its stream is open before it prints)
        result = ctl("drain", "w1", "--data-dir", str(cluster.data_dir))
        assert result.returncode == 0 and result.stdout.startswith("w1: draining"), result
        workers = {w["worker_id"]: w for w in ctl_json(cluster, "workers")["workers"]}
        assert workers["w1"]["state"] == "draining" and workers["w0"]["state"] == "active"
        assert ctl("undrain", "w1", "--data-dir", str(cluster.data_dir)).returncode == 0
        workers = {w["worker_id"]: w for w in ctl_json(cluster, "workers")["workers"]}
        assert workers["w1"]["state"] == "active"
        assert follower.stdout is not None
        seen = []
        while "WorkerUndrained" not in seen:
            event = json.loads(follower.stdout.readline())
            assert event["worker_id"] == "w1"
            seen.append(event["type"])
        assert "WorkerDrainStarted" in seen
    finally:
        follower.kill()
        follower.wait()


def test_exit_codes_and_one_line_reasons(cluster: LocalCluster) -> None:
    unknown = ctl("drain", "nope", "--data-dir", str(cluster.data_dir))
    assert unknown.returncode == 1 and unknown.stderr.count("\n") == 1
    assert "no live worker 'nope'" in unknown.stderr
    bad = ctl("status", "--data-dir", str(cluster.data_dir), "--token", "wrong")
    assert bad.returncode == 1 and "admin token" in bad.stderr
    down = ctl("status", "--url", "http://127.0.0.1:1", "--token", "x")
    assert down.returncode == 3 and down.stderr.startswith("mellctl: error: gateway admin API")
    assert ctl("drain").returncode == 2  # usage
    lost = ctl("workers", "--data-dir", str(cluster.data_dir / "nowhere"))
    assert lost.returncode == 3 and "--url" in lost.stderr


def test_config_file_fallback(cluster: LocalCluster, tmp_path: Path) -> None:
    up = json.loads((cluster.data_dir / "up.json").read_text())
    config = tmp_path / "mellctl.toml"
    config.write_text(
        f'url = "{up["admin_url"]}"\ntoken_file = "{cluster.data_dir / "admin.token"}"\n'
    )
    env = dict(os.environ, MELLCTL_CONFIG=str(config))
    result = ctl("workers", "--json", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert {w["worker_id"] for w in json.loads(result.stdout)["workers"]} == {"w0", "w1"}


def test_events_from_the_journal_offline(cluster: LocalCluster) -> None:
    result = ctl("events", "--journal", str(cluster.data_dir / "journal"), "--worker", "w0",
                 "--tail", "5", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events and all(e["worker_id"] == "w0" for e in events)
