"""Live migration through real processes: `mellctl up --workers 2`, streams moved mid-decode by
the admin API (KV and token transfer, several times), drain moving requests away, and a
destination killed mid-migration. Clients see exactly the unmigrated output, or a clean error.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from mell_cluster import MELLCTL, LocalCluster, get_json, metric, start_cluster, wait_until

pytestmark = pytest.mark.slow
MAX_TOKENS = 400


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = start_cluster(
        tmp_path_factory.mktemp("migration") / "data",
        "--workers",
        "3",
        "--device",
        "cpu",
        "--worker-timeout",
        "2",
        # Steps of at least 5 ms: a stream's last migration point leaves 60 tokens (300 ms)
        # for the client to read up and move it; unpaced, mell-tiny could finish first.
        "--min-step-ms",
        "5",
    )
    yield c
    c.stop()


def admin(cluster: LocalCluster) -> tuple[str, dict[str, str]]:
    state = json.loads((cluster.data_dir / "up.json").read_text())
    token = (Path(cluster.data_dir) / "admin.token").read_text().strip()
    return state["admin_url"], {"Authorization": f"Bearer {token}"}


def body(i: int, seed: int | None, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    b: dict[str, Any] = {
        "model": "mell-tiny",
        "prompt": f"migrate me {i}",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0.0 if seed is None else 0.8,
    }
    if seed is not None:
        b["seed"] = seed
    return b


async def _text(session: aiohttp.ClientSession, url: str, b: dict[str, Any]) -> str:
    async with session.post(url + "/v1/completions", json=b) as r:
        assert r.status == 200
        return (await r.json())["choices"][0]["text"]


async def _stream(
    session: aiohttp.ClientSession, url: str, b: dict[str, Any], migrate: Any
) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """Stream one request, calling `migrate(request_id, n_chunks)` as chunks arrive."""
    async with session.post(url + "/v1/completions", json={**b, "stream": True}) as r:
        assert r.status == 200
        text, moves, last, n = "", [], {}, 0
        async for line in r.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            last = json.loads(line[6:])
            if last.get("choices"):
                text += last["choices"][0]["text"]
                n += 1
                moved = await migrate(last["id"], n)
                if moved is not None:
                    moves.append(moved)
        return text, moves, last


async def _migrate(session, cluster, request_id: str, kind: str) -> dict[str, Any]:
    url, headers = admin(cluster)
    async with session.get(f"{url}/admin/v1/requests", headers=headers) as r:
        rows = await r.json()
    rows = rows.get("requests", rows) if isinstance(rows, dict) else rows
    src = next(row["worker_id"] for row in rows if row["request_id"] == request_id)
    dst = random.choice([w for w in ("w0", "w1", "w2") if w != src])
    async with session.post(
        f"{url}/admin/v1/requests/{request_id}/migrate",
        json={"to": dst, "kind": kind},
        headers=headers,
    ) as r:
        out = await r.json()
        assert r.status == 200, out
        assert (out["src"], out["dst"]) == (src, dst), out
        return out


@pytest.mark.parametrize("seed", [None, 7], ids=["greedy", "seeded"])
async def test_migrated_streams_match_unmigrated(cluster: LocalCluster, seed: int | None) -> None:
    rng = random.Random(seed or 1)
    points = sorted(rng.sample(range(5, MAX_TOKENS - 60), 4))
    kinds = ["kv", "tokens", "kv", "tokens"]
    async with aiohttp.ClientSession() as s:
        want = await _text(s, cluster.url, body(1, seed))

        async def migrate(rid: str, n: int) -> dict[str, Any] | None:
            if points and n >= points[0]:
                points.pop(0)
                return await _migrate(s, cluster, rid, kinds.pop(0))
            return None

        got, moves, last = await _stream(s, cluster.url, body(1, seed), migrate)
    assert last["choices"][0]["finish_reason"] == "length"
    committed = [m for m in moves if m["committed"]]
    assert len(committed) >= 3, moves
    assert {m["kind"] for m in committed} == {"kv", "tokens"}
    assert got == want


async def test_destination_killed_mid_stream_stream_completes(cluster: LocalCluster) -> None:
    """Migrations aimed at a frozen worker abort on their deadline; the source resumes."""
    url, headers = admin(cluster)
    async with aiohttp.ClientSession() as s:
        want = await _text(s, cluster.url, body(3, None))
        frozen: list[str] = []

        async def migrate(rid: str, n: int) -> dict[str, Any] | None:
            if n != 20:
                return None
            async with s.get(f"{url}/admin/v1/requests", headers=headers) as r:
                rows = await r.json()
            rows = rows.get("requests", rows) if isinstance(rows, dict) else rows
            src = next(row["worker_id"] for row in rows if row["request_id"] == rid)
            dst = next(w for w in ("w0", "w1", "w2") if w != src)
            cluster.kill_child(f"worker {dst}", signal.SIGSTOP)
            frozen.append(dst)
            async with s.post(
                f"{url}/admin/v1/requests/{rid}/migrate",
                json={"to": dst, "kind": "kv"},
                headers=headers,
            ) as r:
                return await r.json()

        got, moves, last = await _stream(s, cluster.url, body(3, None), migrate)
        cluster.kill_child(f"worker {frozen[0]}")
    assert last["choices"][0]["finish_reason"] == "length"
    assert got == want
    assert [m["committed"] for m in moves] == [False], moves
    wait_until(lambda: get_json(cluster.url + "/health")[1]["lost_workers"], 10, "worker lost")
    metrics = urllib_text(cluster.url + "/metrics")
    assert metric(metrics, "mell:migrations_total", kind="kv") >= 1


def urllib_text(url: str, headers: dict[str, str] | None = None) -> str:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as r:
        return r.read().decode()


def test_no_blocks_leak_after_migrations(cluster: LocalCluster) -> None:
    url, headers = admin(cluster)

    def idle() -> bool:
        _, body = get_json(f"{url}/admin/v1/workers", headers)
        rows = body.get("workers", body) if isinstance(body, dict) else body
        live = [w for w in rows if w["state"] == "active"]
        return bool(live) and all(w["used_blocks"] == 0 for w in live)

    wait_until(idle, 10, "every live worker's blocks free")


def mellctl(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [*MELLCTL, *args]
    return subprocess.run(
        [*cmd, "--data-dir", str(cluster.data_dir)], capture_output=True, text=True, timeout=60
    )


async def test_mellctl_migrate_then_drain_moves_requests_away(cluster: LocalCluster) -> None:
    url, headers = admin(cluster)
    drained: list[str] = []

    def holder(rid: str) -> str:
        _, rows = get_json(f"{url}/admin/v1/requests", headers)
        rows = rows.get("requests", rows) if isinstance(rows, dict) else rows
        return next(row["worker_id"] for row in rows if row["request_id"] == rid)

    async with aiohttp.ClientSession() as s:
        want = await _text(s, cluster.url, body(4, 11, 900))

        async def act(rid: str, n: int) -> dict[str, Any] | None:
            if n == 10:
                src = holder(rid)
                _, live = get_json(f"{url}/admin/v1/workers", headers)
                live = live.get("workers", live) if isinstance(live, dict) else live
                dst = next(w["worker_id"] for w in live if w["state"] == "active"
                           and w["worker_id"] != src)  # fmt: skip
                done = await asyncio.to_thread(
                    mellctl, cluster, "migrate", rid, "--to", dst, "--kind", "tokens"
                )
                assert done.returncode == 0, done.stderr
                assert "committed" in done.stdout
                assert holder(rid) == dst
                return {"committed": True}
            if n == 30:
                src = holder(rid)
                done = await asyncio.to_thread(mellctl, cluster, "drain", src)
                assert done.returncode == 0, done.stderr
                drained.append(src)
            return None

        got, _, last = await _stream(s, cluster.url, body(4, 11, 900), act)
    assert last["choices"][0]["finish_reason"] == "length"
    assert got == want
    [src] = drained
    events = urllib_text(f"{url}/admin/v1/events?tail=1000&request={last['id']}", headers)
    kinds = [json.loads(line)["type"] for line in events.splitlines() if line.strip()]
    assert kinds.count("MigrationCommitted") == 2, kinds  # mellctl migrate, then the drain
    wait_until(lambda: get_json(f"{url}/admin/v1/workers/{src}", headers)[1]["releasable"], 10)
    assert mellctl(cluster, "undrain", src).returncode == 0
