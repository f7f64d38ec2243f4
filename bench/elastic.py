"""Elastic KV memory (eLLM) vs a static split, at one memory budget, on mell-tiny (CPU).

One worker engine, one byte budget (`--budget-mib`) for KV + copy staging + activations, a
long-prompt burst: `--requests` prompts of `--prompt` tokens (each a little longer than the
last), `--out` tokens out each, all arriving at once; the host tier takes swapped victims.

  static:  memory_budget_bytes 0; the KV pool is what the budget leaves beside a step of the
           full token budget (`--tokens`, a long prompt in one pass): num_kv_blocks =
           budget.kv_blocks_for(tokens), fixed, plain tensors (all of it written at start).
  elastic: memory_budget_bytes = the budget; the KV cap and the step's token budget are chosen
           together each step (memory_budget.py), the pool virtual (mmap: memory backs only
           the blocks handed out; the freed top is given back).

Each variant runs in its own process (so each process's RSS is its own): max batch size (the
most requests given a token in one step), output tok/s, TTFT p99, peak RSS during the burst and idle
RSS after it drains (/proc/self/statm), with and without the model's weights and code (the
RSS at engine start is reported too). The last line is `RESULT {json}`; its
`concurrency_ratio` is elastic / static max batch size (target >= 1.5).

    python bench/elastic.py [--budget-mib 80] [--requests 48] [--prompt 1000] [--out 256]
"""

from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing as mp
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mell.common.config import EngineConfig
from mell.common.sampling import SamplingParams
from mell.common.tiny_model import write_tiny_model
from mell.workerd.engine.engine import Engine

HOST_BYTES = 256 << 20


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE


def prompt(n: int, s: int) -> list[int]:
    return [(s * 31 + 7 * i) % 500 + 3 for i in range(n)]


def config(model: Path, a: argparse.Namespace, **kw: Any) -> EngineConfig:
    return EngineConfig(
        model=str(model),
        device="cpu",
        max_num_seqs=a.requests,
        max_num_batched_tokens=a.tokens,
        max_model_len=2048,
        kv_offload="swap",
        host_kv_bytes=HOST_BYTES,
        **kw,
    )


def static_blocks(model: Path, a: argparse.Namespace) -> int:
    """The static split of the same budget: KV beside a step of the full token budget."""
    probe = Engine(config(model, a, memory_budget_bytes=a.budget_mib << 20))
    assert probe.elastic is not None
    n = probe.elastic.budget.kv_blocks_for(a.tokens)
    probe.close()
    return n


def run_variant(name: str, model: str, a: argparse.Namespace, out: Any) -> None:
    torch.set_num_threads(1)
    path = Path(model)
    if name == "static":
        eng = Engine(config(path, a, num_kv_blocks=static_blocks(path, a), kv_pool="static"))
    else:
        eng = Engine(config(path, a, memory_budget_bytes=a.budget_mib << 20))
    # warm-up (not counted): a short request, first-use allocations
    eng.add_request("w", prompt(32, 0), SamplingParams(max_tokens=2, ignore_eos=True))
    while eng.has_unfinished():
        eng.step()
    eng.step()
    base_rss = rss()
    added: dict[str, float] = {}
    first: dict[str, float] = {}
    tokens = 0
    max_batch = 0
    peak = base_rss
    start = time.monotonic()
    for i in range(a.requests):
        rid = f"r{i}"
        sp = SamplingParams(max_tokens=a.out, temperature=0.0, ignore_eos=True)
        eng.add_request(rid, prompt(a.prompt + 4 * i, i), sp)
        added[rid] = time.monotonic()
    while eng.has_unfinished():
        outs = eng.step()
        now = time.monotonic()
        max_batch = max(max_batch, len(outs))
        peak = max(peak, rss())
        for o in outs:
            tokens += len(o.new_token_ids)
            first.setdefault(o.request_id, now)
    makespan = time.monotonic() - start
    for _ in range(3):
        eng.step()  # idle: an elastic pool gives its memory back
    ttft = sorted(first[r] - added[r] for r in added)
    el = eng.elastic
    out.put(
        {
            "name": name,
            "kv_blocks": eng.stats().num_total_blocks,
            "max_batch": max_batch,
            "tok_s": tokens / makespan,
            "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
            "makespan_s": makespan,
            "rss_start_mib": base_rss / 2**20,
            "rss_peak_mib": peak / 2**20,
            "rss_idle_mib": rss() / 2**20,
            "preemptions": eng.stats().num_preemptions_total,
            "shrinks": el.budget.shrinks if el else 0,
            "grows": el.budget.grows if el else 0,
            "victims": el.victims_total if el else 0,
            "blocks_moved": el.blocks_moved_total if el else 0,
        }
    )
    eng.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-mib", type=int, default=80)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--prompt", type=int, default=1000)
    ap.add_argument("--out", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=2048, help="max_num_batched_tokens")
    a = ap.parse_args()
    ctx = mp.get_context("spawn")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_model(Path(tmp) / "tiny")
        for name in ("static", "elastic"):
            q = ctx.Queue()
            p = ctx.Process(target=run_variant, args=(name, str(model), a, q))
            p.start()
            results[name] = q.get()
            p.join()
    for r in results.values():
        print(
            f"{r['name']:8s} KV blocks {r['kv_blocks']:5d}  max batch {r['max_batch']:3d}  "
            f"{r['tok_s']:7.1f} out tok/s  TTFT p99 {r['ttft_p99_s']:.2f} s  "
            f"RSS start/peak/idle {r['rss_start_mib']:.0f}/{r['rss_peak_mib']:.0f}/"
            f"{r['rss_idle_mib']:.0f} MiB  preemptions {r['preemptions']}  "
            f"shrinks {r['shrinks']} grows {r['grows']} victims {r['victims']} "
            f"moved {r['blocks_moved']}",
            flush=True,
        )
    s, e = results["static"], results["elastic"]
    result = {
        "budget_bytes": a.budget_mib << 20,
        "concurrency_ratio": e["max_batch"] / s["max_batch"],
        "static": s,
        "elastic": e,
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
