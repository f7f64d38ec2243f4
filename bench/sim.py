"""Simulator speed on the merged Azure LLM 2023 trace (code + conv as two models), every policy.

    python bench/sim.py [--traces DIR] [--profile NAME] [--scale-time X] [--scale-len Y]

A request-event is an arrival, a departure, a preemption or a migration; the simulator also
grows every running request's KV one token per decode step (vectorized per epoch), which is not
counted (RESULT gives those decode tokens per second too). Target: >= 50,000 request-events per
second over all policies together, in ONE process (the default, --jobs 1): total events over
the sum of the policies' run times, one after another. With --jobs N > 1 the policies run in N
processes at once, and the batch rate (total events / wall time) is printed as well; the
headline `events_per_s` stays the one-process rate. The fluid lower bound is computed once
for the trace and shared by the runs (its time is printed apart).
The last line is `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACES = ROOT / "bench" / "traces" / "azure-llm-2023"
POLICIES = ("mell", "best-fit", "worst-fit", "lb", "round-robin")


def _run(job):
    from mell.gateway.sim.profile import load_profile
    from mell.gateway.sim.simulator import Simulator, sim_policy

    name, profile_name, trace, epoch, bound = job
    profile = load_profile(profile_name)
    policy = sim_policy(name, profile, epoch)
    return Simulator(trace, profile, policy, epoch_s=epoch, sample_series=False, bound=bound).run()


def main() -> int:
    from mell.gateway.sim.bound import fluid_lower_bound
    from mell.gateway.sim.profile import load_profile
    from mell.gateway.sim.traces import load_traces

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--traces", type=Path, default=DEFAULT_TRACES)
    ap.add_argument("--profile", default="llama2-13b-a100-40g")
    ap.add_argument("--scale-time", type=float, default=1.0)
    ap.add_argument("--scale-len", type=float, default=2.0)
    ap.add_argument("--epoch", type=float, default=0.5)
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help=f"policies run in N processes at once (this machine: {os.cpu_count()} CPUs)",
    )
    args = ap.parse_args()
    files = [args.traces / f"AzureLLMInferenceTrace_{n}.csv" for n in ("code", "conv")]
    profile = load_profile(args.profile)
    t0 = time.perf_counter()
    trace = load_traces(
        files, scale_time=args.scale_time, scale_len=args.scale_len, max_len=profile.max_len
    )
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    bound = fluid_lower_bound(trace, profile, args.epoch)
    bound_s = time.perf_counter() - t0
    per_policy = {}
    total_events = 0
    total_wall = 0.0
    batch_start = time.perf_counter()
    cpu_start = time.process_time()
    jobs = [(name, str(args.profile), trace, args.epoch, bound) for name in POLICIES]
    if args.jobs > 1:
        import multiprocessing

        with multiprocessing.Pool(args.jobs) as pool:
            results = pool.map(_run, jobs, chunksize=1)
    else:
        results = [_run(job) for job in jobs]
    batch_wall = time.perf_counter() - batch_start
    cpu_s = time.process_time() - cpu_start  # this process only (meaningful with --jobs 1)
    for name, r in zip(POLICIES, results, strict=True):
        total_events += r.events
        total_wall += r.wall_s
        per_policy[name] = {
            "events": r.events,
            "wall_s": round(r.wall_s, 3),
            "events_per_s": round(r.events / r.wall_s),
            "peak": r.peak_active,
            "sim_s_per_wall_s": round(r.sim_seconds / r.wall_s),
            "decode_tokens_per_s": round(int(trace.output.sum()) / r.wall_s),
        }
        print(
            f"{name:12s} {r.events:>8d} events in {r.wall_s:6.2f} s = "
            f"{r.events / r.wall_s:>9,.0f} events/s  (peak {r.peak_active} workers, "
            f"{r.sim_seconds:.0f} simulated s)"
        )
    if args.jobs > 1:
        print(
            f"all policies in {args.jobs} processes: {total_events} events in "
            f"{batch_wall:.2f} s wall = {total_events / batch_wall:,.0f} events/s"
        )
    rate = total_events / total_wall
    print(
        f"trace: {len(trace)} requests, read in {load_s:.2f} s; lower bound {bound.workers} "
        f"workers, computed once in {bound_s:.2f} s"
    )
    print(
        f"one process, one policy after another: {total_events} events in {total_wall:.2f} s "
        f"= {rate:,.0f} events/s (target >= 50,000)"
    )
    load_1m = os.getloadavg()[0]
    if args.jobs == 1:  # on a shared machine wall time counts the other processes' load too
        print(
            f"CPU time of this process: {cpu_s:.2f} s = {total_events / cpu_s:,.0f} events per "
            f"CPU second (load average {load_1m:.1f} on {os.cpu_count()} cores)"
        )
    print(
        "RESULT "
        + json.dumps(
            {
                "requests": len(trace),
                "profile": profile.name,
                "scale_time": args.scale_time,
                "scale_len": args.scale_len,
                "events_per_s": round(rate),
                "total_events": total_events,
                "wall_s": round(total_wall, 2),
                "policies": per_policy,
                "batch_events_per_s": round(total_events / batch_wall),
                "jobs": args.jobs,
                "lower_bound": bound.workers,
                "cpu_s": round(cpu_s, 2) if args.jobs == 1 else None,
                "events_per_cpu_s": round(total_events / cpu_s) if args.jobs == 1 else None,
                "load_avg_1m": round(load_1m, 2),
                "target_met": rate >= 50_000,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
