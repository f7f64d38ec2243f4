"""LayerKV in the worker: a burst of long prompts while many requests decode on a fixed
device KV pool, on mell-tiny (CPU), four engines in one process, runs interleaved:

  (A) today's engine: admission reserves the first chunk only; preemption recomputes
  (B) whole-prompt admission (the fixed baseline); preemption recomputes
  (C) B + swap preemption to a host tier
  (D) B + layerwise offload (long prompts prefilled straight to the host, parked, reloaded)
      + SLO-aware admission (tpot_slo_s)

Workload (arrival times from the start of a run): 10 decoders (32-token prompts, up to 160
tokens out) alive at all times for 0.8 s, a finished one replaced at once (their KV holds much
of the pool whatever the machine's speed);
three 1,500-token prompts (16 out) at `--burst-at`; 6 short prompts (32 in, 32 out), one every
50 ms from then. Pool: 128 blocks x 16 tokens. The CPU copy engine emulates a host link of
`--link-gbps`. TPOT SLO: `--tpot-slo-x` (10) times the median decode-only step time measured
in a warm-up. Then without pressure (a pool of 2,048 blocks, the open requests and 40 more
decoders all at once) offload off vs layerwise without SLO admission: equal output tok/s.

    python bench/layerkv.py [--rounds 3]

(The scheduler-only burst of the issue, on the real BlockManager and Scheduler without a model,
is tests/unit/workerd/test_scheduler.py; `pytest -s` prints its figures.) The last line is
`RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mell.common.config import EngineConfig
from mell.common.sampling import SamplingParams
from mell.common.tiny_model import write_tiny_model
from mell.workerd.engine.engine import Engine

NUM_BLOCKS = 128
BLOCK = 16
HOST_BYTES = 64 << 20
DECODE_OUT = 160  # tokens per decoder
DECODERS = 10  # decoders alive at all times (closed loop) until DECODERS_UNTIL_S
DECODERS_UNTIL_S = 0.8


@dataclass
class Req:
    rid: str
    kind: str  # "decoder", "long", "short"
    at: float
    prompt: list[int]
    max_tokens: int
    times: list[float] = field(default_factory=list)


def _prompt(n: int, s: int) -> list[int]:
    return [(s * 31 + 7 * i) % 500 + 3 for i in range(n)]


def workload(burst_at: float) -> list[Req]:
    """The open part: the initial decoders (staggered lengths), the burst, the short prompts;
    `run` keeps DECODERS decoders alive (a finished one is replaced) until DECODERS_UNTIL_S."""
    reqs = [
        Req(f"d{i}", "decoder", 0.0, _prompt(32, i), DECODE_OUT * (i + 1) // DECODERS)
        for i in range(DECODERS)
    ]
    reqs += [Req(f"L{i}", "long", burst_at, _prompt(1500, 50 + i), 16) for i in range(3)]
    reqs += [Req(f"s{i}", "short", burst_at + 0.05 * i, _prompt(32, 80 + i), 32) for i in range(6)]
    return reqs


def run(eng: Engine, reqs: list[Req], closed_loop: bool = True) -> dict[str, float]:
    """Arrivals on the wall clock; every output token's time per request."""
    reqs = [Req(r.rid, r.kind, r.at, r.prompt, r.max_tokens) for r in reqs]
    pending = sorted(reqs, key=lambda r: r.at)
    by_id = {r.rid: r for r in reqs}
    before = eng.stats()
    start, cpu = time.monotonic(), time.process_time()
    steps = 0
    first_steps: list[float] = []  # the steps that gave a long prompt its first token (s)

    def add(r: Req) -> None:
        sp = SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True)
        eng.add_request(r.rid, r.prompt, sp)

    while pending or eng.has_unfinished():
        now = time.monotonic() - start
        while pending and pending[0].at <= now:
            add(pending.pop(0))
        if not eng.has_unfinished():
            time.sleep(min(0.001, max(0.0, pending[0].at - now)))
            continue
        began = time.monotonic() - start
        outs = eng.step()
        steps += 1
        t = time.monotonic() - start
        if any(o.first_index == 0 and by_id[o.request_id].kind == "long" for o in outs):
            first_steps.append(t - began)
        for o in outs:
            by_id[o.request_id].times += [t] * len(o.new_token_ids)
            done = o.finish_reason is not None and o.request_id[0] == "d"
            if done and closed_loop and t < DECODERS_UNTIL_S:  # the next decoder comes
                r = Req(f"d{len(by_id)}", "decoder", t, _prompt(32, len(by_id)), DECODE_OUT)
                by_id[r.rid] = r
                reqs.append(r)
                add(r)
    makespan, cpu = time.monotonic() - start, time.process_time() - cpu
    after = eng.stats()
    result = metrics(reqs, makespan, before, after, steps)
    result["tok_cpu_s"] = sum(len(r.times) for r in reqs) / cpu  # per CPU second (all threads)
    # The long prompts' prefill: the last one cannot have its first token before all of it
    # is computed (one compute thread), whatever the schedule: a floor under its TTFT.
    result["long_prefill_steps_s"] = sum(first_steps)
    result["long_prefill_step_max_s"] = max(first_steps, default=0.0)
    return result


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def metrics(reqs: list[Req], makespan: float, before, after, steps: int) -> dict[str, float]:
    ttft = {k: [r.times[0] - r.at for r in reqs if r.kind == k] for k in ("long", "short")}

    def tpot_of(r: Req) -> float:
        return (r.times[-1] - r.times[0]) / (len(r.times) - 1)

    tpot = [tpot_of(r) for r in reqs if len(r.times) > 1]
    tpot_decoders = [tpot_of(r) for r in reqs if len(r.times) > 1 and r.kind == "decoder"]
    gaps = [b - a for r in reqs for a, b in zip(r.times, r.times[1:], strict=False)]
    out_tokens = sum(len(r.times) for r in reqs)
    moved_before = sum(before.offload_bytes_total.values())
    return {
        "ttft_long_p50": pct(ttft["long"], 0.5),
        "ttft_long_p99": pct(ttft["long"], 0.99),
        "ttft_short_p50": pct(ttft["short"], 0.5),
        "ttft_short_p99": pct(ttft["short"], 0.99),
        "tpot_p99": pct(tpot, 0.99),
        "tpot_p99_decoders": pct(tpot_decoders, 0.99),
        "max_gap": max(gaps),
        "e2e_p99": pct([r.times[-1] - r.at for r in reqs], 0.99),
        "tok_s": out_tokens / makespan,
        "recomputed": after.num_tokens_recomputed_total - before.num_tokens_recomputed_total,
        "bytes_moved": sum(after.offload_bytes_total.values()) - moved_before,
        "swaps": after.num_swaps_total - before.num_swaps_total,
        "parked": after.num_parked_total - before.num_parked_total,
        "preemptions": after.num_preemptions_total - before.num_preemptions_total,
        "steps": steps,
    }


def decode_step_s(model: Path) -> float:
    """Median step time of 12 decoding requests (no pressure), after a warm-up."""
    eng = Engine(EngineConfig(model=str(model), num_kv_blocks=1024, max_model_len=2048))
    for r in workload(0.0)[:12]:
        eng.add_request(r.rid, r.prompt, SamplingParams(max_tokens=64, ignore_eos=True))
    eng.step()
    times = []
    while eng.has_unfinished():
        t = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def engines(model: Path, link: float, slo: float, num_blocks: int) -> dict[str, Engine]:
    base = {"model": str(model), "num_kv_blocks": num_blocks, "max_model_len": 2048}
    host = {"host_kv_bytes": HOST_BYTES, "kv_link_bytes_per_s": link}
    return {
        "A": Engine(EngineConfig(admission="chunk", **base)),
        "B": Engine(EngineConfig(admission="whole", **base)),
        "C": Engine(EngineConfig(kv_offload="swap", **host, **base)),
        "D": Engine(EngineConfig(kv_offload="layerwise", tpot_slo_s=slo, **host, **base)),
    }


def show(name: str, m: dict[str, float]) -> None:
    print(
        f"  {name}: TTFT long p50/p99 {m['ttft_long_p50']:.3f}/{m['ttft_long_p99']:.3f} s"
        f"  short p50/p99 {m['ttft_short_p50']:.3f}/{m['ttft_short_p99']:.3f} s"
        f"  TPOT p99 {m['tpot_p99'] * 1e3:.1f} ms (decoders "
        f"{m['tpot_p99_decoders'] * 1e3:.1f})  max gap {m['max_gap'] * 1e3:.0f} ms"
        f"  e2e p99 {m['e2e_p99']:.2f} s  {m['tok_s']:.0f} tok/s ({m['tok_cpu_s']:.0f}/CPU s)"
        f"  recomputed {m['recomputed']}  moved {m['bytes_moved'] / 1e6:.1f} MB"
        f"  swaps {m['swaps']} parked {m['parked']} preemptions {m['preemptions']}"
        f"  long first-token steps {m['long_prefill_steps_s'] * 1e3:.0f} ms in all",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--burst-at", type=float, default=0.3)
    ap.add_argument("--link-gbps", type=float, default=8.0, help="emulated host link, GB/s")
    ap.add_argument("--tpot-slo-x", type=float, default=10.0)
    a = ap.parse_args()
    torch.set_num_threads(1)  # (steady timings on a shared machine; the copy thread is extra)
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_model(Path(tmp) / "tiny")
        step = decode_step_s(model)
        slo = a.tpot_slo_x * step
        print(f"decode step (12 requests) {step * 1e3:.2f} ms; TPOT SLO {slo * 1e3:.2f} ms")
        reqs = workload(a.burst_at)
        results: dict[str, list[dict[str, float]]] = {k: [] for k in "ABCD"}
        engs = engines(model, a.link_gbps * 1e9, slo, NUM_BLOCKS)
        for eng in engs.values():  # warm-up (not counted): first-use allocations, caches
            run(eng, reqs)
        for rnd in range(a.rounds):
            print(f"round {rnd + 1} (pressure: {NUM_BLOCKS} blocks x {BLOCK} tokens)")
            for name, eng in engs.items():
                results[name].append(run(eng, reqs))
                show(name, results[name][-1])
        # No pressure: the whole workload at once on 2,048 blocks, B vs D without SLO admission
        # (offload on, nothing to offload): output tok/s, median over alternating runs.
        free = engines(model, a.link_gbps * 1e9, 0.0, 2048)
        closed = [Req(r.rid, r.kind, 0.0, r.prompt, r.max_tokens) for r in reqs]
        closed += [Req(f"x{i}", "decoder", 0.0, _prompt(32, 99 + i), DECODE_OUT) for i in range(40)]
        roomy: dict[str, list[float]] = {"B": [], "D": []}
        roomy_cpu: dict[str, list[float]] = {"B": [], "D": []}
        for name in ("B", "D"):
            run(free[name], closed, closed_loop=False)  # warm-up
        for rnd in range(2 * a.rounds):
            print(f"round {rnd + 1} (no pressure, all at once: 2048 blocks; D without SLO)")
            for name in ("B", "D") if rnd % 2 == 0 else ("D", "B"):
                m = run(free[name], closed, closed_loop=False)
                roomy[name].append(m["tok_s"])
                roomy_cpu[name].append(m["tok_cpu_s"])
                show(name, m)
        for eng in [*engs.values(), *free.values()]:
            eng.close()

    def med(name: str, key: str) -> float:
        return statistics.median(m[key] for m in results[name])

    print("medians over rounds:")
    for name in "ABCD":
        print(
            f"  {name}: TTFT long p99 {med(name, 'ttft_long_p99'):.3f} s, short p99 "
            f"{med(name, 'ttft_short_p99'):.3f} s, TPOT p99 {med(name, 'tpot_p99') * 1e3:.1f} ms, "
            f"max gap {med(name, 'max_gap') * 1e3:.0f} ms, {med(name, 'tok_s'):.0f} tok/s"
        )
    floor = med("D", "long_prefill_steps_s")
    print(
        f"why D's long TTFT p99 is {med('D', 'ttft_long_p99'):.3f} s: the steps that gave the "
        f"long prompts their first tokens took {floor:.3f} s in all (one prompt per step, the "
        f"longest {med('D', 'long_prefill_step_max_s'):.3f} s): the last one waits for the "
        f"others' prefill, so B's p99 ({med('B', 'ttft_long_p99'):.3f} s) over that sum, "
        f"{med('B', 'ttft_long_p99') / floor:.2f}, bounds the ratio on this machine"
    )
    no_pressure = statistics.median(roomy["D"]) / statistics.median(roomy["B"])
    per_cpu = statistics.median(roomy_cpu["D"]) / statistics.median(roomy_cpu["B"])
    print(
        f"no pressure: layerwise / off output tok/s = {no_pressure:.3f} (wall clock), "
        f"{per_cpu:.3f} (per CPU second)"
    )
    result = {
        "ttft_p99_ratio_b_over_d": med("B", "ttft_long_p99") / med("D", "ttft_long_p99"),
        "tpot_p99_d_s": med("D", "tpot_p99"),
        "tpot_slo_s": slo,
        "throughput_ratio_d_over_b": med("D", "tok_s") / med("B", "tok_s"),
        "no_pressure_throughput_ratio_layerwise_over_off": no_pressure,
        "no_pressure_cpu_throughput_ratio_layerwise_over_off": per_cpu,
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
