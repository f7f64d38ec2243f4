"""The fluid lower bound on active workers: one reference per (trace, profile, epoch).

max over epochs of Σ_pools ⌈Σ KV_t / C⌉, where KV_t is the KV cache (blocks) the trace's live
requests hold at the end of epoch t, a request's KV being that of its whole context (prompt and
tokens generated) from its arrival on, as policies size it (see `simulator.py`).

KV_t depends on how fast requests progress, and a run's own progress depends on its schedule
(preemptions, migration stalls, and above all how prompts queue for prefill on a worker). A
bound read from a run would reward a policy for slowing requests down, and differ between the
policies of one table. So the bound reads no run: it replays the trace once with *fluid
progression* under the simulator's step-time model, and every policy of a table is measured
against that same number.

Fluid progression. In each epoch a pool is W_t = max(1, KV_t / C) exactly full workers
(fractional), KV_t counting every request live in the epoch (its arrivals included) at its
size at the start of the epoch. Nothing is preempted or migrated, and:

- Prefill: the pool computes prompts at W_t workers' fastest chunked-prefill rate (full chunks
  of `max_num_batched_tokens` on a worker that decodes nothing, 1000 / `chunk_ms_per_token`
  tokens per second each). That throughput is shared by the prompts that have arrived and are
  not computed yet, oldest first (arrival order), each prompt at most one worker's rate: a lone
  prompt takes the time it takes alone on a worker, a burst of prompts larger than the pool's
  rate queues. The queue carries over from epoch to epoch.
- Decode: once its prompt is computed a request decodes one token per step. The step is that
  of the fluid pool: each of the W_t workers decodes a batch of N_t / W_t requests holding
  Σ context / W_t tokens (every live request counted, prefilling ones included).

What it assumes, and why it is a reference, not a theorem:
- Prefill and decode do not share the GPUs: the pool prefills at W_t workers' full rate while
  its decode steps run at the plain decode step (in the engine a chunk slows the step it runs
  in). Optimistic for the bound.
- A policy that keeps more workers busy than KV_t / C, or spreads its load, has more prefill
  throughput and faster (smaller) decode steps than the fluid pool, so its requests can hold
  less KV than here: on the bench/fig11.py runs worst-fit's and LB's own max_t ⌈KV_t / C⌉ is
  up to 3 workers (7%) below this number on the conv trace (the fastest possible decode, a
  batch of one, would lower it by about a fifth there: 43 -> 34 workers on 13B/A100). A policy
  that stacks prompts on few workers queues them longer than the pool does, and holds more
  KV: on the Azure code trace every policy's own KV peak is 1.16 to 1.33 times this number,
  about half of it KV of requests still waiting for or in their prefill.
- So the number is a reference for packing quality at the progress a pool of that size can
  sustain, the same for every policy of a table; each policy's own max_t ⌈KV_t / C⌉ (its KV at
  its own progress) is printed beside it.
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


def pool_prefill(
    queue: list[list[float]], t: float, t_end: float, workers: float, rate: float
) -> list[tuple[int, float]]:
    """One epoch [t, t_end) of a pool's prefill queue; returns (request, time its prompt is
    computed) for the prompts completed, and leaves the others in `queue` with fewer tokens.

    `queue`: [request, arrival s, prompt tokens left] in arrival order; `workers`: the pool's
    W_t; `rate`: one worker's prefill tokens per second. At every instant the arrived prompts
    are served oldest first, each at most `rate`, until the pool's `workers` · `rate` is used
    up (the last one served may get a fraction of `rate`)."""
    total = workers * rate
    done: list[tuple[int, float]] = []
    now = t
    while queue and now < t_end:
        served: list[tuple[list[float], float]] = []
        left_rate = total
        next_arrival = t_end
        for rec in queue:
            if rec[1] > now:
                next_arrival = min(next_arrival, rec[1])
                break  # arrival order: the rest arrive later still
            if left_rate <= 0.0:
                break
            r = rate if rate < left_rate else left_rate
            served.append((rec, r))
            left_rate -= r
        until = next_arrival
        for rec, r in served:
            finish = now + rec[2] / r
            if finish < until:
                until = finish
        span = until - now
        finished = False
        for rec, r in served:
            # The prompts whose finish is `until` end exactly there (no float residue left).
            if now + rec[2] / r <= until:
                rec[2] = 0.0
                done.append((int(rec[0]), until))
                finished = True
            else:
                rec[2] -= r * span
        if finished:
            queue[:] = [rec for rec in queue if rec[2] > 0.0]
        now = until
    return done


def fluid_lower_bound(trace: Trace, profile: Profile, epoch_s: float) -> FluidBound:
    """The fluid lower bound of `trace` on `profile` with epochs of `epoch_s` seconds."""
    n = len(trace)
    if n == 0:
        return FluidBound(0, 0.0, dict.fromkeys(trace.models, 0))
    cap, bs, step = profile.capacity_blocks, profile.block_size, profile.step
    rate = 1000.0 / step.chunk_ms_per_token  # one worker's prompt tokens per second
    pools = len(trace.models)
    arrival, prompt, output = trace.arrival_s, trace.prompt, trace.output
    model = trace.model.astype(np.int64)
    dt = epoch_s
    live = np.zeros(0, dtype=np.int64)
    gen = np.zeros(0)
    decode_from = arrival.astype(np.float64).copy()  # inf while its prompt is queued
    queues: list[list[list[float]]] = [[] for _ in range(pools)]
    best, best_t, prefilling = 0, 0.0, 0.0
    by_model = np.zeros(pools, dtype=np.int64)
    nxt = 0
    t = math.floor(float(arrival[0]) / dt) * dt
    while nxt < n or len(live):
        if not len(live) and arrival[nxt] >= t + dt:
            t = math.floor(float(arrival[nxt]) / dt) * dt  # idle: jump ahead (as the simulator)
        t_end = t + dt
        stop = int(np.searchsorted(arrival, t_end, side="left"))
        for i in range(nxt, stop):
            queues[model[i]].append([i, float(arrival[i]), float(prompt[i])])
        decode_from[nxt:stop] = math.inf
        live = np.concatenate((live, np.arange(nxt, stop, dtype=np.int64)))
        gen = np.concatenate((gen, np.zeros(stop - nxt)))
        nxt = stop
        pool = model[live]
        ctx = prompt[live] + np.floor(gen)
        blocks = -(-(ctx + 1) // bs)
        width = np.maximum(1.0, np.bincount(pool, weights=blocks, minlength=pools) / cap)
        for p, queue in enumerate(queues):
            if queue:
                for i, at in pool_prefill(queue, t, t_end, float(width[p]), rate):
                    decode_from[i] = at
        batch = np.bincount(pool, minlength=pools) / width
        context = np.bincount(pool, weights=ctx, minlength=pools) / width
        step_s = (
            step.decode_base_ms
            + step.decode_per_seq_ms * batch
            + step.decode_per_kv_token_ms * context
        ) / 1000.0
        avail = t_end - np.maximum(decode_from[live], t)
        gen = gen + np.maximum(avail, 0.0) / step_s[pool]
        keep = gen < output[live]
        live, gen, pool = live[keep], gen[keep], pool[keep]
        tokens = np.minimum(prompt[live] + np.floor(gen) + 1, prompt[live] + output[live])
        kv = np.bincount(pool, weights=-(-tokens // bs), minlength=pools)
        need = -(-kv.astype(np.int64) // cap)
        by_model = np.maximum(by_model, need)
        total = int(need.sum())
        if total > best:
            best, best_t = total, t_end
            queued = np.isinf(decode_from[live])
            prefilling = float((-(-tokens[queued] // bs)).sum()) / cap
        t = t_end
    by_pool = dict(zip(trace.models, by_model.tolist(), strict=True))
    return FluidBound(best, best_t, by_pool, prefilling)
