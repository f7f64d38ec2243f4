"""Replay a public trace on a live cluster under MELL and worst-fit, beside the simulator.

    python bench/replay.py [--trace FILE] [--requests 300] [--speedup 2] [--workers 4]
                           [--num-kv-blocks 512] [--len-scale 0.5] [--min-step-ms 20] [--runs 3]

The first `--requests` requests of the trace (default: Azure LLM 2023 conv, from
bench/traces), arrival gaps divided by `--speedup`, token counts multiplied by `--len-scale`
and clipped to the worker's context (`--num-kv-blocks` × 16 tokens), are sent to a live
`mellctl up --workers N --device cpu --min-step-ms M` (mell-tiny) as non-streaming completions
with token-id prompts (greedy, ignore_eos: each produces exactly its trace output length); a
503 (no worker has room at that moment: the gateway does not queue) is retried after 0.2 s.
With `--policy mell` and with `--policy worst-fit`. While it runs the admin API is sampled
every 0.1 s; a worker is active while it holds a request. Printed per policy: requests
completed, time-average and peak of active workers, migrations; beside them the simulator's
prediction for the same replay (same trace slice, same policies with their live defaults, a
profile measured from mell-tiny on this machine by bench/profile_worker.py turned into the live
workers' step model by `live_step`, capacity = --num-kv-blocks).
Each policy runs `--runs` times, interleaved (mell, worst-fit, mell, ...); single runs on a
shared 2-core machine differ by up to a third, so the means are compared.

Device emulation (`--min-step-ms`, default 20): every engine step lasts at least that long, the
worker waiting out the rest. Four CPU workers on two cores are not four devices: unpaced, a
worker's step time grows with its batch's context and the busy workers share the cores, so
packing requests onto fewer workers leaves a core idle that spreading uses; measured unpaced
(`--min-step-ms 0 --speedup 6`), MELL's time-average was higher than worst-fit's (1.81 vs 1.61
over 3 runs; with one torch thread per worker 1.52 vs 1.19). Paced, a busy worker's step is
the floor (decode compute stays under it at this load) and it leaves the cores to the others while
it waits, as a GPU's step is nearly flat in the batch and GPUs do not share compute. The
simulator then gets the paced step model: decode steps of the floor, and a full prefill chunk
the larger of the floor and its measured compute, without the core-sharing slowdown.
Defaults: MELL's regime, many requests per worker (512 blocks = 8192 tokens; requests at most
2032 tokens = C/4, mean about C/14) at a load that needs 1-3 of the 4 workers. With 128
blocks (most requests above C/4, several above C/2, 3-4 per worker) and a quarter of the
load, MELL measured 0.54 against worst-fit's 0.46 (simulator: 0.46 both).
Checks: every request completes under both; MELL's mean time-average of active workers is lower.
The last line is `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from migration import Cluster  # bench/migration.py: a `mellctl up` cluster

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACE = ROOT / "bench/traces/azure-llm-2023/AzureLLMInferenceTrace_conv.csv"
BLOCK_SIZE = 16
TINY_MAX_LEN = 2048 - BLOCK_SIZE
RETRY_AFTER_S, RETRY_FOR_S = 0.2, 120.0


def load(args: argparse.Namespace) -> Any:
    from mell.gateway.sim.traces import load_traces

    # the worker's context: its KV pool (one block of room) and mell-tiny's positions
    max_len = min(args.num_kv_blocks * BLOCK_SIZE - BLOCK_SIZE, TINY_MAX_LEN)
    return load_traces(
        [args.trace],
        scale_time=args.speedup,
        scale_len=args.len_scale,
        max_len=max_len,
        limit=args.requests,
    )


async def replay(c: Cluster, trace: Any) -> dict[str, Any]:
    samples: list[tuple[float, int]] = []
    results: list[str] = []
    retries: list[int] = []  # request index per 503 answered
    stop = asyncio.Event()

    async def sample(s: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            async with s.get(f"{c.admin}/workers", headers=c.headers) as r:
                rows = (await r.json())["workers"]
            busy = sum(1 for w in rows if w["state"] != "lost" and w["num_requests"] > 0)
            samples.append((time.perf_counter(), busy))
            await asyncio.sleep(0.1)

    async def one(s: aiohttp.ClientSession, i: int, at: float, t0: float) -> None:
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        prompt = [3 + (11 * i + 7 * k) % 500 for k in range(int(trace.prompt[i]))]
        body = {"model": "mell-tiny", "prompt": prompt, "max_tokens": int(trace.output[i]),
                "temperature": 0.0, "ignore_eos": True}  # fmt: skip
        give_up = time.perf_counter() + RETRY_FOR_S
        try:
            while True:  # a 503 (no worker has room now) is retried, as a client would
                async with s.post(c.url + "/v1/completions", json=body) as r:
                    out = await r.json()
                if r.status != 503 or time.perf_counter() > give_up:
                    break
                retries.append(i)
                await asyncio.sleep(RETRY_AFTER_S)
            ok = r.status == 200 and out["usage"]["completion_tokens"] == body["max_tokens"]
            results.append("ok" if ok else f"{r.status}: {str(out)[:200]}")
        except (aiohttp.ClientError, TimeoutError) as err:
            results.append(f"error: {err!r}")

    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        sampler = asyncio.create_task(sample(s))
        t0 = time.perf_counter()
        arrivals = trace.arrival_s - trace.arrival_s[0]
        await asyncio.gather(*(one(s, i, float(a), t0) for i, a in enumerate(arrivals)))
        end = time.perf_counter()
        stop.set()
        await sampler
        async with s.get(f"{c.admin}/status", headers=c.headers) as r:
            status = await r.json()
        async with s.get(f"{c.admin}/events", params={"tail": "100000"}, headers=c.headers) as r:
            lines = [json.loads(x) for x in (await r.text()).splitlines() if x.strip()]
    reasons: dict[str, int] = {}
    for e in lines:
        if e.get("type") == "MigrationAborted":
            key = ":".join(e["reason"].split(":")[:2])[:60]
            reasons[key] = reasons.get(key, 0) + 1
    window = [(t, n) for t, n in samples if t0 <= t <= end]
    area = sum((b[0] - a[0]) * a[1] for a, b in itertools.pairwise(window))
    span = window[-1][0] - window[0][0] if len(window) > 1 else 1.0
    return {
        "requests": len(results),
        "completed": results.count("ok"),
        "failures": [r for r in results if r != "ok"][:5],
        "retried_503": len(retries),
        "avg_active": area / span,
        "peak_active": max((n for _, n in window), default=0),
        "migrations": status["totals"]["migrations"],
        "migrations_aborted": status["totals"]["migrations_aborted"],
        "abort_reasons": reasons,
        "wall_s": end - t0,
    }


def live_step(step: Any, slowdown: float, min_step_ms: float) -> Any:
    """The step model of the live workers: the measured one slowed down by core sharing, or,
    paced, decode steps of `min_step_ms` and a full prefill chunk the larger of that and its
    measured compute (linearized over the chunk)."""
    if min_step_ms <= 0:
        return msgspec.structs.replace(
            step,
            decode_base_ms=step.decode_base_ms * slowdown,
            decode_per_seq_ms=step.decode_per_seq_ms * slowdown,
            decode_per_kv_token_ms=step.decode_per_kv_token_ms * slowdown,
            prefill_base_ms=step.prefill_base_ms * slowdown,
            prefill_per_token_ms=step.prefill_per_token_ms * slowdown,
        )
    chunk = step.max_num_batched_tokens
    chunk_ms = step.decode_base_ms + step.prefill_per_token_ms * chunk
    return msgspec.structs.replace(
        step,
        decode_base_ms=min_step_ms,
        decode_per_seq_ms=0.0,
        decode_per_kv_token_ms=0.0,
        prefill_per_token_ms=max(0.0, chunk_ms - min_step_ms) / chunk,
    )


def simulate(
    trace: Any, profile_path: Path, capacity: int, policy: str, step_of: Any
) -> dict[str, Any]:
    """The simulator's run of the replay; `step_of` maps the measured step model to the live
    one (`live_step`)."""
    from mell.gateway.policy.base import make_policy
    from mell.gateway.sim.profile import load_profile
    from mell.gateway.sim.simulator import Simulator

    profile = load_profile(profile_path)
    step = step_of(profile.step)
    profile = msgspec.structs.replace(
        profile, capacity_blocks=capacity, max_model_len=capacity * BLOCK_SIZE, step=step
    )
    r = Simulator(trace, profile, make_policy(policy), epoch_s=0.25, sample_series=False).run()
    return {"avg_active": r.avg_active, "peak_active": r.peak_active,
            "migrations": r.migrations, "rejected": r.rejected}  # fmt: skip


def simulate_safely(
    trace: Any, profile_path: Path, capacity: int, policy: str, step_of: Any
) -> dict[str, Any]:
    """`simulate`, a policy bug showing in the output instead of ending the run."""
    try:
        return simulate(trace, profile_path, capacity, policy, step_of)
    except Exception as err:
        return {"avg_active": float("nan"), "peak_active": -1, "migrations": -1,
                "error": repr(err)}  # fmt: skip


def run_all(args: argparse.Namespace, trace: Any, root: Path) -> dict[str, Any]:
    """The profile, then every (run, policy) replay and its simulation; the RESULT object."""
    profile = root / "tiny.toml"
    subprocess.run(
        [sys.executable, str(ROOT / "bench/profile_worker.py"), "--device", "cpu", "--out",
         str(profile)], check=True, capture_output=True,
    )  # fmt: skip
    print(
        f"trace {Path(args.trace).name}: {len(trace)} requests over {trace.duration_s:.1f} s, "
        f"prompt mean {trace.prompt.mean():.0f}, output mean {trace.output.mean():.0f} tokens, "
        f"context cap {int((trace.prompt + trace.output).max())}; {args.workers} workers × "
        f"{args.num_kv_blocks} blocks, "
        + (f"steps paced to >= {args.min_step_ms:g} ms" if args.min_step_ms > 0 else "unpaced"),
        flush=True,
    )
    # The profile is measured on an idle machine; live, unpaced workers share its cores.
    slowdown = max(1.0, args.workers / (os.cpu_count() or 1))

    def step_of(step: Any) -> Any:
        return live_step(step, slowdown, args.min_step_ms)

    extra = ["--min-step-ms", str(args.min_step_ms)] if args.min_step_ms > 0 else []
    rows: dict[str, dict[str, Any]] = {}
    for run in range(args.runs):  # interleaved: mell, worst-fit, mell, worst-fit, ...
        for policy in ("mell", "worst-fit"):
            c = Cluster(
                root / f"{policy}-{run}", None, args.workers, policy, args.num_kv_blocks, extra
            )
            try:
                live = asyncio.run(replay(c, trace))
            finally:
                c.stop()
            row = rows.setdefault(policy, {"live": [], "sim": None})
            row["live"].append(live)
            if row["sim"] is None:
                row["sim"] = simulate_safely(trace, profile, args.num_kv_blocks, policy, step_of)
            sim = row["sim"]
            print(
                f"{policy:9s} run {run + 1}  live: {live['completed']}/{live['requests']} "
                f"completed ({live['retried_503']} 503s retried), active workers avg "
                f"{live['avg_active']:.2f} peak {live['peak_active']}, migrations "
                f"{live['migrations']} (aborted {live['migrations_aborted']})   simulator: avg "
                f"{sim['avg_active']:.2f} peak {sim['peak_active']}, "
                f"migrations {sim['migrations']}",
                flush=True,
            )
    for row in rows.values():
        row["avg_active"] = statistics.mean(r["avg_active"] for r in row["live"])
    mell, wf = rows["mell"]["avg_active"], rows["worst-fit"]["avg_active"]
    sim_mell, sim_wf = rows["mell"]["sim"]["avg_active"], rows["worst-fit"]["sim"]["avg_active"]
    print(
        f"time-average active workers over {args.runs} runs each: MELL {mell:.2f}, worst-fit "
        f"{wf:.2f} ({100 * (mell / wf - 1):+.0f}%); simulator {sim_mell:.2f} vs {sim_wf:.2f}",
        flush=True,
    )
    checks = {
        "all_completed": all(
            r["completed"] == r["requests"] for row in rows.values() for r in row["live"]
        ),
        "mell_fewer_active": mell < wf,
    }
    return {"rows": rows, "checks": checks, "args": vars(args)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", default=str(DEFAULT_TRACE))
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--speedup", type=float, default=2.0)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--num-kv-blocks", type=int, default=512)
    p.add_argument("--len-scale", type=float, default=0.5)
    p.add_argument("--runs", type=int, default=3, help="runs per policy, interleaved")
    p.add_argument(
        "--min-step-ms", type=float, default=20.0, help="workers' step floor (0: unpaced)"
    )
    args = p.parse_args()
    trace = load(args)
    root = Path(tempfile.mkdtemp(prefix="mell-bench-replay-"))
    try:
        result = run_all(args, trace, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
