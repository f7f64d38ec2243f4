"""The engine's batching at epoch granularity: chunked prefill under a per-step token budget.

The worker scheduler (`workerd/scheduler.py`) runs, each step, one token of every decoding
request and, with the rest of `max_num_batched_tokens`, a chunk of the oldest prompt still
prefilling. Over an epoch that makes a worker's prompts a first-come first-served queue served
at the chunk rate, while its decoders advance one token per (slower) mixed step; once the queue
is empty the rest of the epoch runs plain decode steps, the requests whose prefill ended
joining the batch. Each request decodes at its worker's average rate over the epoch.

Few requests are prefilling at any time, so the queues are plain Python lists, kept from epoch
to epoch; the decoding requests stay vectorized in the simulator.
"""

from __future__ import annotations

import math
from bisect import insort
from typing import Any

import numpy as np

from mell.gateway.sim.profile import Profile

# A queued prompt: [request, ready at, tokens left, context tokens (float), context tokens
# (int), KV blocks as policies size it]. Only the tokens left change while it waits. A list
# (of ints and floats), not a class: the epoch loop unpacks it, and few are queued at a time.
Prompt = list[Any]
_REQ, _READY, _LEFT, _CTX, _CONTEXT, _BLOCKS = range(6)


def tokens_left(rec: Prompt) -> int:
    """Prompt tokens a queued record has still to compute."""
    left: int = rec[_LEFT]
    return left


def tokens_computed(rec: Prompt) -> int:
    """Context tokens of a queued record whose KV is computed."""
    context: int = rec[_CONTEXT]
    return context - tokens_left(rec)


def _fcfs(rec: Prompt) -> tuple[float, int]:
    return rec[_READY], rec[_REQ]


class PrefillQueues:
    """Per-worker queues of the prompts (and re-prefilled contexts) not computed yet.

    `decode_from[i]` is when request i may start decoding: inf while it is queued, the end of
    its prefill in the epoch that completes it (earlier epochs' values never bind again)."""

    def __init__(
        self,
        profile: Profile,
        first_token: np.ndarray,
        decode_from: np.ndarray,
        tpot_slo_ms: float = 0.0,
    ):
        self.profile = profile
        self.tpot_slo_ms = tpot_slo_ms  # > 0: a chunk only as long as the step stays within
        self.first_token, self.decode_from = first_token, decode_from
        self.by_worker: dict[int, list[Prompt]] = {}
        self.where: dict[int, int] = {}  # request -> worker
        self.kv = 0  # KV blocks (as policies size them) of the queued requests, last epoch

    def __bool__(self) -> bool:
        return bool(self.where)

    def add(self, worker: int, i: int, ready: float, tokens: int, ctx: float, blocks: int) -> None:
        """Queue `tokens` of request i's context (`ctx` tokens, `blocks` KV blocks in all) on
        `worker`, first come first served from `ready` on."""
        self.remove(i)
        insort(
            self.by_worker.setdefault(worker, []),
            [i, ready, tokens, ctx, int(ctx), blocks],
            key=_fcfs,
        )
        self.where[i] = worker
        self.decode_from[i] = math.inf

    def remove(self, i: int) -> Prompt | None:
        """Take request i out of its queue (preempted, or migrated by token transfer)."""
        worker = self.where.pop(i, None)
        if worker is None:
            return None
        queue = self.by_worker[worker]
        rec = next(r for r in queue if r[_REQ] == i)
        queue.remove(rec)
        if not queue:
            del self.by_worker[worker]
        return rec

    def move(self, i: int, worker: int) -> None:
        """Request i's computed chunks were copied to `worker` (KV transfer): the rest of its
        prompt queues there, in its original order."""
        rec = self.remove(i)
        if rec is not None:
            insort(self.by_worker.setdefault(worker, []), rec, key=_fcfs)
            self.where[i] = worker
            self.decode_from[i] = math.inf

    def left(self, i: int) -> int:
        """Prompt tokens request i has still to compute (0 when decoding)."""
        worker = self.where.get(i)
        if worker is None:
            return 0
        left: int = next(r[_LEFT] for r in self.by_worker[worker] if r[_REQ] == i)
        return left

    def run(
        self, t: float, t_end: float, batch: np.ndarray, ctx_sum: np.ndarray, rate: np.ndarray
    ) -> tuple[int, int]:
        """Run the epoch [t, t_end) of every queue. `batch` and `ctx_sum`: requests and context
        tokens per worker (queued ones included); `rate`: decode tokens per second per worker,
        replaced by the epoch's average where a queue ran. Sets `decode_from` and the first
        token of the prompts completed; returns (first tokens produced, blocks of the prompts
        still queued that are not computed yet); `kv` keeps those requests' whole KV."""
        step, bs = self.profile.step, self.profile.block_size
        base, per_seq = step.decode_base_ms, step.decode_per_seq_ms
        per_kv, per_tok = step.decode_per_kv_token_ms, step.prefill_per_token_ms
        budget = step.max_num_batched_tokens
        dt = t_end - t
        first_token, decode_from, where = self.first_token, self.decode_from, self.where
        firsts = not_computed = kv = 0
        inf = math.inf
        for wk, queue in list(self.by_worker.items()):
            n = float(batch[wk]) - len(queue)  # decoders only
            c = float(ctx_sum[wk])
            for rec in queue:
                c -= rec[_CTX]
            chunk = budget - n if budget - n > 1.0 else 1.0
            if self.tpot_slo_ms > 0.0 and per_tok > 0.0:  # SLO-aware admission
                room = (self.tpot_slo_ms - base - per_seq * n - per_kv * c) / per_tok
                chunk = max(1.0, min(chunk, room))
            mixed_ms = base + per_seq * n + per_kv * c + per_tok * chunk
            rho = chunk * 1000.0 / mixed_ms  # prompt tokens per second while prefilling
            f = t  # the queue is busy until f
            busy = joined_ctx = 0.0
            done = 0
            for rec in queue:
                i, ready, left, ctx, context, blocks = rec
                b = f if f > ready else ready
                f = b + left / rho
                if f <= t_end:
                    decode_from[i] = f
                    if first_token[i] != first_token[i]:  # NaN: its first prefill
                        first_token[i] = f
                        firsts += 1
                    del where[i]
                    busy += f - b
                    joined_ctx += ctx
                    done += 1
                    continue
                if b < t_end:
                    rec[_LEFT] = left = max(1, left - int((t_end - b) * rho))
                    busy += t_end - b
                kv += blocks
                not_computed += blocks - -(-(context - left) // bs)
                f = inf  # FCFS: nothing behind it starts this epoch
            if done:
                del queue[:done]
                if not queue:
                    del self.by_worker[wk]
            phi = busy / dt if busy < dt else 1.0
            plain_ms = base + per_seq * (n + done) + per_kv * (c + joined_ctx)
            rate[wk] = phi * 1000.0 / mixed_ms + (1.0 - phi) * 1000.0 / plain_ms
        self.kv = kv
        return firsts, not_computed
