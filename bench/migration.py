"""Live migration cost on a KV-heavy tiny model: time and stall per kind, KV throughput vs limit.

    python bench/migration.py [--contexts 128,512,2048,8192] [--repeat 5]

A live `mellctl up --workers 2` (CPU) serves a KV-heavy random Llama checkpoint (many KV heads,
no GQA, small MLP; the mell-tiny tokenizer). For each context length L and each kind (kv,
tokens, auto) one streaming request with an L-token prompt is moved mid-decode through the admin
API (`POST /admin/v1/requests/{id}/migrate`), `--repeat` times, the kinds interleaved and each
first in turn (best kept; every run's time is in the RESULT):
- stall: the longest gap between consecutive tokens from the source's pause (it reports how long
  it paused) to the first token at the destination, minus the median gap before (one step);
- migration time: from the admin call to the request's first token at the destination (for a
  token transfer that includes the re-prefill);
- KV throughput: the KV bytes the copy stages moved / their time (first frame sent to the
  destination's answer, as the source measured it), best of the runs, against two limits
  measured in the same run with raw ZeroMQ DEALER → ROUTER over TCP loopback from this process
  to another (each with its own ZeroMQ context, as two workers) moving the same bytes in
  messages of the data plane's size, one answer per stage (best of 5): idle (nothing else
  runs), and beside a decode (while a request of the same context decodes on a worker, as the
  source decodes the request during the copy: on a 2-core machine the decode takes half of
  what the idle limit gets). Two more for reference: the transfer beside a decode with the
  receiver also copying every message into a cache-sized array (the work a destination must
  do: ZeroMQ cannot receive into its cache), and the transfer within one process (both sockets
  on one ZeroMQ I/O thread, which no pair of workers shares).
Checks: KV throughput ≥ 60% of the limit at the largest context (both limits are reported); the
KV stall roughly flat in L (the least-squares line through the stalls rises ≤ 10 ms from the
smallest to the largest context; one stall alone jitters by a step or two); `auto` within 10%
of the faster kind at every length (migration time; also whether it chose the faster kind,
since two runs of one kind differ by more than 10% here).
The last line is `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import multiprocessing
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

LAYERS, HEADS, HEAD_DIM = 4, 4, 64  # KV heads = heads: 2·4·4·64·4 B = 8 KiB per token (fp32)
KV_BYTES_PER_TOKEN = 2 * LAYERS * HEADS * HEAD_DIM * 4
BLOCK_SIZE = 16


def make_checkpoint(directory: Path, max_len: int) -> Path:
    import torch
    import transformers

    from mell.common.tiny_model import ensure_tiny_model

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=HEADS * HEAD_DIM,
        intermediate_size=256,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=max_len,
        initializer_range=0.2,
        eos_token_id=0,
        bos_token_id=1,
    )
    transformers.LlamaForCausalLM(cfg).float().eval().save_pretrained(directory)
    tiny = ensure_tiny_model(directory.parent / "mell-tiny")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, directory / name)
    return directory


# ---------------------------------------------------------------- the cluster


class Cluster:
    """A `mellctl up` cluster on CPU (model None: mell-tiny); stopped by `stop`."""

    def __init__(
        self,
        data_dir: Path,
        model: Path | None,
        workers: int,
        policy: str = "least-loaded",
        num_kv_blocks: int = 0,
        extra: Sequence[str] = (),
    ) -> None:
        """`extra`: more `mellctl up` flags."""
        cmd = [sys.executable, "-m", "mell.gateway.mellctl.main", "up", "--data-dir",
               str(data_dir), "--workers", str(workers), "--device", "cpu",
               "--policy", policy, *extra]  # fmt: skip
        if model is not None:
            cmd += ["--model", str(model)]
        if num_kv_blocks:
            cmd += ["--num-kv-blocks", str(num_kv_blocks)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        ready, _, _ = select.select([self.proc.stdout], [], [], 300)
        line = self.proc.stdout.readline().decode() if ready else ""
        if "http://" not in line:
            self.stop()
            raise RuntimeError(f"mellctl up did not start: {line!r}")
        self.url = next(w for w in line.split() if w.startswith("http://"))
        state = json.loads((data_dir / "up.json").read_text())
        self.admin = state["admin_url"] + "/admin/v1"
        token = (data_dir / "admin.token").read_text().strip()
        self.headers = {"Authorization": f"Bearer {token}"}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def holder(s: aiohttp.ClientSession, c: Cluster, rid: str) -> str:
    async with s.get(f"{c.admin}/requests", headers=c.headers) as r:
        rows = (await r.json())["requests"]
    return next(row["worker_id"] for row in rows if row["request_id"] == rid)


def stream_body(model: str, context: int, max_tokens: int) -> dict[str, Any]:
    """A greedy streamed completion of a `context`-token prompt that runs `max_tokens`."""
    return {"model": model, "prompt": [3 + (7 * i) % 500 for i in range(context)],
            "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True}  # fmt: skip


async def migrate_once(
    s: aiohttp.ClientSession, c: Cluster, model: str, context: int, kind: str, at: int
) -> dict[str, Any]:
    """One streaming request of `context` prompt tokens, migrated once after `at` tokens.
    With logprobs every token comes in its own chunk (without, the detokenizer holds back
    bytes of an incomplete UTF-8 character and merges chunks: gaps that are not stalls)."""
    body = {**stream_body(model, context, 160), "logprobs": 0}
    times: list[float] = []
    call: dict[str, Any] = {}
    task: asyncio.Task[Any] | None = None

    async def run_migration(rid: str) -> None:
        src = await holder(s, c, rid)
        dst = "w1" if src == "w0" else "w0"
        call["start"] = time.perf_counter()
        async with s.post(f"{c.admin}/requests/{rid}/migrate", json={"to": dst, "kind": kind},
                          headers=c.headers) as r:  # fmt: skip
            call["out"] = await r.json()
        call["end"] = time.perf_counter()

    async with s.post(c.url + "/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                times.append(time.perf_counter())
                if len(times) == at:
                    task = asyncio.create_task(run_migration(chunk["id"]))
    if task is not None:
        await task
    out = call.get("out", {})
    start, end = call.get("start", 0.0), call.get("end", 0.0)
    before = [b - a for a, b in itertools.pairwise(times) if b < start]
    normal = statistics.median(before[-20:]) if before else 0.0
    source = out.get("source") or {}
    # The stall: gaps that end after the source paused the request (it was paused for
    # `stall_s` before its outcome reached us), up to the first token after the outcome.
    paused = end - source.get("stall_s", end - start) - 0.005
    resumed = next((t for t in times if t > end), None)  # decoding again at the destination
    gaps = [b - a for a, b in itertools.pairwise(times) if paused <= b <= (resumed or end)]
    return {
        "committed": bool(out.get("committed")) and resumed is not None,
        "kind": out.get("kind", kind),
        "reason": out.get("reason", "no migration"),
        "time_ms": (resumed - start) * 1000 if resumed is not None else None,
        "stall_ms": max(0.0, (max(gaps) if gaps else 0.0) - normal) * 1000,
        "step_ms": normal * 1000,
        "copy_ms": source.get("copy_s", 0.0) * 1000,
        "copy_bytes": source.get("copy_bytes", 0),
        "tokens": len(times),
    }


# ---------------------------------------------------------------- the limit


def zmq_limit(context: int, repeat: int = 5, processes: int = 2, write: bool = False) -> float:
    """Bytes/s of raw ZeroMQ loopback moving one context's KV like a single-stage KV copy: per
    layer, messages of the data plane's size (`MigrationSettings.message_bytes`), then one
    round trip. Best of `repeat`. `processes=2`: the receiver is another process with its own
    ZeroMQ context, as a destination worker is; `1`: a thread of this process, both sockets
    sharing one ZeroMQ I/O thread (and one core's cache), which no pair of workers does.
    `write`: the receiver also copies every message into an array of the context's KV size,
    as a destination writes the blocks into its cache (ZeroMQ cannot receive into it)."""
    import zmq

    layer_bytes, frames = _limit_frames(context)
    sink_args = (len(frames), repeat + 1, layer_bytes * LAYERS if write else 0)
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    if processes == 1:
        router = ctx.socket(zmq.ROUTER)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        sink: Any = threading.Thread(target=_sink_rounds, args=(router, *sink_args))
    else:
        spawn = multiprocessing.get_context("spawn")
        ours, theirs = spawn.Pipe()
        sink = spawn.Process(target=_sink, args=(theirs, *sink_args))
    sink.start()
    try:
        if processes != 1:
            if not ours.poll(60):
                raise RuntimeError("the ZeroMQ sink process did not start")
            port = ours.recv()
        dealer.connect(f"tcp://127.0.0.1:{port}")
        best = float("inf")
        for i in range(repeat + 1):
            start = time.perf_counter()
            for frame in frames:
                dealer.send_multipart([b"blocks", frame], copy=False)
            dealer.send(b"end")
            dealer.recv()
            if i:  # the first round connects
                best = min(best, time.perf_counter() - start)
    finally:
        sink.join(60)
        dealer.close(0)
        if processes == 1:
            router.close(0)
        ctx.term()
    return layer_bytes * LAYERS / best


def _limit_frames(context: int) -> tuple[int, list[bytearray]]:
    """One layer's KV bytes for `context` tokens, and every layer's messages of the data
    plane's size (whole blocks)."""
    from mell.workerd.migration.settings import MigrationSettings

    layer_bytes = -(-context // BLOCK_SIZE) * BLOCK_SIZE * KV_BYTES_PER_TOKEN // LAYERS
    block_bytes = BLOCK_SIZE * KV_BYTES_PER_TOKEN // LAYERS
    size = max(1, MigrationSettings().message_bytes // block_bytes) * block_bytes
    layer = [bytearray(min(size, layer_bytes - at)) for at in range(0, layer_bytes, size)]
    return layer_bytes, layer * LAYERS


def _sink_rounds(router: Any, messages: int, rounds: int, cache_bytes: int = 0) -> None:
    """Receive `messages` messages and an end marker, answer it; `rounds` times. `cache_bytes`
    > 0: copy the messages' data one after the other into an array of that size (all of them
    fit), as a destination writes them into its cache."""
    import numpy as np

    cache = np.zeros(cache_bytes, dtype=np.uint8)
    for _ in range(rounds):
        at = 0
        for _ in range(messages):
            frames = router.recv_multipart(copy=False)
            if cache_bytes:
                data = np.frombuffer(frames[-1].buffer, dtype=np.uint8)
                cache[at : at + len(data)] = data
                at += len(data)
        ident = router.recv_multipart()[0]
        router.send_multipart([ident, b"ack"])


def _sink(conn: Any, messages: int, rounds: int, cache_bytes: int = 0) -> None:
    """The limit's receiving process: a ROUTER on a free port (sent back on `conn`)."""
    import zmq

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    conn.send(router.bind_to_random_port("tcp://127.0.0.1"))
    _sink_rounds(router, messages, rounds, cache_bytes)
    router.close(0)
    ctx.term()


async def zmq_limit_under_load(
    s: aiohttp.ClientSession, c: Cluster, model: str, context: int, write: bool = False
) -> float:
    """`zmq_limit` measured while a request of `context` tokens decodes on the cluster, as the
    KV copy runs while the request it moves decodes on the source (stage 1 of the protocol)."""
    limit = functools.partial(zmq_limit, context, write=write)
    body = stream_body(model, context, 400)
    async with s.post(c.url + "/v1/completions", json=body) as r:
        n = 0
        async for line in r.content:
            n += line.startswith(b"data: {")
            if n == 16:  # decoding: measure while the stream goes on, then hang up (aborts it)
                return await asyncio.get_running_loop().run_in_executor(None, limit)
    raise RuntimeError(f"the {context}-token request ended before 16 tokens")


# ---------------------------------------------------------------- main


async def measure(c: Cluster, model: str, contexts: list[int], repeat: int) -> list[dict]:
    rows = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        for context in contexts:
            row: dict[str, Any] = {"context": context}
            kinds = ("kv", "tokens", "auto")
            runs_of: dict[str, list[dict]] = {kind: [] for kind in kinds}
            for i in range(repeat):  # interleaved, each kind first in turn (drift hits all)
                first = i % len(kinds)
                for kind in kinds[first:] + kinds[:first]:
                    runs_of[kind].append(await migrate_once(s, c, model, context, kind, 16))
            for kind, runs in runs_of.items():
                ok = [r for r in runs if r["committed"]]
                best = min(ok, key=lambda r: r["time_ms"]) if ok else runs[0]
                row[kind] = best
                row[f"{kind}_times_ms"] = [round(r["time_ms"], 1) for r in ok]
                if kind == "kv":  # the best copy throughput of the runs (the limit's: best too)
                    rates = [r["copy_bytes"] / r["copy_ms"] / 1e6 for r in ok if r["copy_ms"]]
                    row["kv_gb_per_s"] = max(rates, default=0.0)
            row["kv_bytes"] = row["kv"]["copy_bytes"]
            row["limit_gb_per_s"] = zmq_limit(context) / 1e9
            row["kv_vs_limit"] = row["kv_gb_per_s"] / row["limit_gb_per_s"]
            row["limit_one_process_gb_per_s"] = zmq_limit(context, processes=1) / 1e9
            loaded = await zmq_limit_under_load(s, c, model, context)
            row["limit_loaded_gb_per_s"] = loaded / 1e9
            row["kv_vs_loaded_limit"] = row["kv_gb_per_s"] / row["limit_loaded_gb_per_s"]
            matched = await zmq_limit_under_load(s, c, model, context, write=True)
            row["limit_matched_gb_per_s"] = matched / 1e9
            row["kv_vs_matched_limit"] = row["kv_gb_per_s"] / row["limit_matched_gb_per_s"]
            fastest = min(row["kv"]["time_ms"] or 1e9, row["tokens"]["time_ms"] or 1e9)
            row["auto_vs_fastest"] = (row["auto"]["time_ms"] or 1e9) / fastest
            faster = "kv" if row["kv"]["time_ms"] == fastest else "tokens"
            row["auto_chose_faster"] = row["auto"]["kind"] == faster
            rows.append(row)
            print(
                f"L={context:5d}  kv {row['kv']['time_ms']:8.1f} ms (stall "
                f"{row['kv']['stall_ms']:6.1f})  tokens {row['tokens']['time_ms']:8.1f} ms "
                f"(stall {row['tokens']['stall_ms']:7.1f})  auto→{row['auto']['kind']:6s} "
                f"{row['auto']['time_ms']:8.1f} ms  KV {row['kv_gb_per_s']:.2f} GB/s = "
                f"{100 * row['kv_vs_limit']:.0f}% of ZeroMQ idle {row['limit_gb_per_s']:.2f} GB/s, "
                f"{100 * row['kv_vs_loaded_limit']:.0f}% of ZeroMQ beside a decode "
                f"{row['limit_loaded_gb_per_s']:.2f} GB/s, "
                f"{100 * row['kv_vs_matched_limit']:.0f}% of the same writing a cache "
                f"{row['limit_matched_gb_per_s']:.2f} GB/s (one-process ZeroMQ "
                f"{row['limit_one_process_gb_per_s']:.2f})",
                flush=True,
            )
    return rows


def stall_growth_ms(rows: list[dict]) -> float:
    """How much the KV stall grows over the contexts measured: the least-squares slope of stall
    against context length times the range (single stalls jitter by a step or two here)."""
    xs = [float(r["context"]) for r in rows]
    ys = [r["kv"]["stall_ms"] for r in rows]
    if len(xs) < 2:
        return 0.0
    return statistics.linear_regression(xs, ys).slope * (max(xs) - min(xs))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="128,512,2048,8192")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    contexts = [int(x) for x in args.contexts.split(",")]
    root = Path(tempfile.mkdtemp(prefix="mell-bench-migration-"))
    start = time.perf_counter()
    try:
        model = make_checkpoint(root / "kv-heavy", max(contexts) + 512)
        c = Cluster(root / "data", model, workers=2)
        try:
            rows = asyncio.run(measure(c, "kv-heavy", contexts, args.repeat))
        finally:
            c.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    growth = stall_growth_ms(rows)
    checks = {
        "kv_throughput_ge_60pct_of_limit_beside_decode": rows[-1]["kv_vs_loaded_limit"] >= 0.6,
        "kv_throughput_ge_60pct_of_idle_limit": rows[-1]["kv_vs_limit"] >= 0.6,
        "kv_stall_flat": growth <= 10.0,
        "auto_within_10pct": all(r["auto_vs_fastest"] <= 1.10 for r in rows),
        "auto_chose_faster_kind": all(r["auto_chose_faster"] for r in rows),
        "all_committed": all(r[k]["committed"] for r in rows for k in ("kv", "tokens", "auto")),
    }
    print(f"KV stall growth from L={rows[0]['context']} to L={rows[-1]['context']} "
          f"(least squares): {growth:+.1f} ms")  # fmt: skip
    result = {"rows": rows, "checks": checks, "kv_stall_growth_ms": growth,
              "wall_s": round(time.perf_counter() - start, 1),
              "cpu_count": os.cpu_count()}  # fmt: skip
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
