"""The engine's batching at epoch granularity: chunked prefill under a per-step token budget.

The worker scheduler (`workerd/scheduler.py`) runs, each step, one token of every decoding
request and, with the rest of `max_num_batched_tokens`, a chunk of the oldest prompt still
prefilling. Over an epoch that makes a worker's prompts a first-come first-served queue served
at the chunk rate, while its decoders advance one token per (slower) mixed step; once the queue
is empty the rest of the epoch runs plain decode steps, the requests whose prefill ended
joining the batch. Each request decodes at its worker's average rate over the epoch.
"""

from __future__ import annotations

import math

import numpy as np

from mell.gateway.sim.profile import Profile


def chunked_prefill(
    profile: Profile,
    t: float,
    t_end: float,
    queue: list[tuple[int, float, int, int]],
    begin: np.ndarray,
    todo: np.ndarray,
    ctx: np.ndarray,
    batch: np.ndarray,
    ctx_sum: np.ndarray,
    rate: np.ndarray,
    lengths: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> tuple[int, int]:
    """Run the epoch [t, t_end) of the prefill queues.

    `queue`: (worker, queued at, request, position) of every request with prompt tokens left,
    sorted (per worker, first come first served). Per position: `begin` (when it can run; set
    to when it starts decoding, inf if not this epoch), `todo` (prompt tokens left, updated),
    `ctx` (its context tokens). Per worker: `batch` and `ctx_sum` over all its requests, `rate`
    (decode tokens/s, replaced by the epoch's average where a queue ran). `lengths`: prompt,
    tokens generated and output length per request.

    Returns the blocks not yet computed of the prompts still prefilling (KV not in memory), and
    the KV (blocks, as policies size it) of those requests."""
    step, bs = profile.step, profile.block_size
    base, per_seq = step.decode_base_ms, step.decode_per_seq_ms
    per_kv, per_tok = step.decode_per_kv_token_ms, step.prefill_per_token_ms
    budget = step.max_num_batched_tokens
    prompt, gen, out = lengths
    dt = t_end - t
    held_back = queued = 0
    k = 0
    while k < len(queue):
        wk = queue[k][0]
        end = k
        n, c = float(batch[wk]), float(ctx_sum[wk])
        while end < len(queue) and queue[end][0] == wk:  # decoders only in n and c
            n -= 1.0
            c -= ctx[queue[end][3]]
            end += 1
        chunk = max(budget - n, 1.0)
        mixed_ms = base + per_seq * n + per_kv * c + per_tok * chunk
        rho = chunk * 1000.0 / mixed_ms  # prompt tokens per second while prefilling
        f = t  # the worker's prefill queue is busy until f
        busy = joined = joined_ctx = 0.0
        for _, _, i, j in queue[k:end]:
            b = max(f, begin[j])
            left = int(todo[j])
            f = b + left / rho
            if f <= t_end:
                todo[j] = 0
                begin[j] = f
                busy += f - b
                joined += 1.0
                joined_ctx += ctx[j]
                continue
            if b < t_end:
                left = max(1, left - int((t_end - b) * rho))
                todo[j] = left
                busy += t_end - b
            begin[j] = math.inf
            context = int(prompt[i]) + int(gen[i])
            reserved = int(prompt[i]) + min(int(gen[i]) + 1, int(out[i]))
            queued += -(-reserved // bs)
            held_back += -(-reserved // bs) - -(-(context - left) // bs)
        k = end
        phi = min(busy / dt, 1.0)
        plain_ms = base + per_seq * (n + joined) + per_kv * (c + joined_ctx)
        rate[wk] = phi * 1000.0 / mixed_ms + (1.0 - phi) * 1000.0 / plain_ms
    return held_back, queued
