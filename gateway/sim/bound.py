"""The fluid lower bound on active workers: one reference per (trace, profile, epoch).

max over epochs of Σ_pools ⌈Σ KV_t / C⌉, where KV_t is the KV cache (blocks) the trace's live
requests hold at the end of epoch t, a request's KV being that of its whole context (prompt and
tokens generated) from its arrival on, as policies size it (see `simulator.py`).

KV_t depends on how fast requests progress, and a run's own progress depends on its schedule
(preemptions, migration stalls, and above all how prompts queue for prefill on a worker). A
bound read from a run would reward a policy for slowing requests down, and differ between the
policies of one table. So the bound reads no run: it replays the trace once with *ideal
progression* under the simulator's step-time model, and every policy of a table is measured
against that same number.

Ideal progression: a request's prefill starts at its arrival and waits for no other prompt; it
runs at the fastest rate the simulator gives a prompt (full chunks of `max_num_batched_tokens`
on a worker that decodes nothing: `StepTime.chunk_ms_per_token`), so no simulated request starts
decoding earlier or holds less KV during its prefill. Then it decodes one token per step. The
step is that of a fluid packing of its pool: W_t = max(1, KV_t / C) equally loaded workers
(fractional), each decoding a batch of N_t / W_t requests holding Σ context / W_t tokens, i.e.
exactly full workers. Nothing is preempted or migrated.

The prefill part is strict. The decode part is a reference, not a theorem: a policy that spreads
its load decodes a little faster than full workers do (the KV term of a step), so its requests
can hold slightly less KV: on the bench/fig11.py runs worst-fit's and LB's own max_t ⌈KV_t / C⌉
is up to 2 workers (5%) below this bound on the conv trace (the fastest possible decode, a batch
of one, would lower the bound by about a fifth there: 43 -> 34 workers on 13B/A100). Under
bursts of long prompts a packing policy queues several prompts on each worker (a worker needs
C / prefill rate = 2.6-2.8 s to compute a full worker's prompts), so requests live much longer
than ideal progression lets them: on the Azure code trace every policy's own KV peak is 1.35 to
1.45 times this bound, about half of it KV of requests still waiting for or in their prefill.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mell.gateway.sim.profile import Profile
from mell.gateway.sim.traces import Trace


@dataclass(frozen=True, slots=True)
class FluidBound:
    workers: int  # max_t Σ_pools ⌈KV_t / C⌉
    at_s: float  # end of the epoch where it is reached (trace seconds)
    by_model: dict[str, int]  # each pool's own max over time
    prefilling: float = 0.0  # at `at_s`: KV (Σ / C, in workers) of requests still prefilling


def fluid_lower_bound(trace: Trace, profile: Profile, epoch_s: float) -> FluidBound:
    """The fluid lower bound of `trace` on `profile` with epochs of `epoch_s` seconds."""
    n = len(trace)
    if n == 0:
        return FluidBound(0, 0.0, dict.fromkeys(trace.models, 0))
    cap, bs, step = profile.capacity_blocks, profile.block_size, profile.step
    pools = len(trace.models)
    arrival, prompt, output = trace.arrival_s, trace.prompt, trace.output
    model = trace.model.astype(np.int64)
    dt = epoch_s
    live = np.zeros(0, dtype=np.int64)
    gen = np.zeros(0)
    stall = np.zeros(0)
    best, best_t, prefilling = 0, 0.0, 0.0
    by_model = np.zeros(pools, dtype=np.int64)
    nxt = 0
    t = math.floor(float(arrival[0]) / dt) * dt
    while nxt < n or len(live):
        if not len(live) and arrival[nxt] >= t + dt:
            t = math.floor(float(arrival[nxt]) / dt) * dt  # idle: jump ahead (as the simulator)
        t_end = t + dt
        stop = int(np.searchsorted(arrival, t_end, side="left"))
        new = np.arange(nxt, stop, dtype=np.int64)
        nxt = stop
        live = np.concatenate((live, new))
        gen = np.concatenate((gen, np.zeros(len(new))))
        own = step.chunk_ms_per_token * prompt[new] / 1000.0  # alone, full chunks
        stall = np.concatenate((stall, own))
        pool = model[live]
        ctx = prompt[live] + np.floor(gen)
        blocks = -(-(ctx + 1) // bs)
        width = np.maximum(1.0, np.bincount(pool, weights=blocks, minlength=pools) / cap)
        batch = np.bincount(pool, minlength=pools) / width
        context = np.bincount(pool, weights=ctx, minlength=pools) / width
        step_s = (
            step.decode_base_ms
            + step.decode_per_seq_ms * batch
            + step.decode_per_kv_token_ms * context
        ) / 1000.0
        start = np.maximum(arrival[live], t)
        avail = t_end - start - stall
        stall = np.maximum(0.0, -avail)
        gen = gen + np.maximum(avail, 0.0) / step_s[pool]
        keep = gen < output[live]
        live, gen, stall, pool = live[keep], gen[keep], stall[keep], pool[keep]
        tokens = np.minimum(prompt[live] + np.floor(gen) + 1, prompt[live] + output[live])
        kv = np.bincount(pool, weights=-(-tokens // bs), minlength=pools)
        need = -(-kv.astype(np.int64) // cap)
        by_model = np.maximum(by_model, need)
        total = int(need.sum())
        if total > best:
            best, best_t = total, t_end
            queued = stall > 0
            prefilling = float((-(-tokens[queued] // bs)).sum()) / cap
        t = t_end
    by_pool = dict(zip(trace.models, by_model.tolist(), strict=True))
    return FluidBound(best, best_t, by_pool, prefilling)
