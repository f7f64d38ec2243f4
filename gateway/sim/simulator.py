"""The trace-driven cluster simulator: the real policy objects on a virtual clock.

Time advances one epoch at a time. In each epoch:

1. requests preempted last epoch, then the epoch's arrivals, are placed through `policy.place`
   (the view reflects each placement before the next one);
2. every worker runs for the epoch as the engine batches (`workerd/scheduler.py`): steps of at
   most the profile's `max_num_batched_tokens`, one token per decoding request and the rest a
   chunk of the oldest prompt still prefilling (prompts, token-transfer migrations and resumed
   requests queue first-come first-served per worker); decodes advance in the same steps. Step
   times come from the profile's model (`profile.StepTime`); vectorized over the running
   requests with numpy, the few prompts in prefill in a loop (`_decode`, `_prefill`);
3. finished requests depart; the others' KV grows (one token per decode step); a worker over
   capacity preempts its latest arrivals (vLLM's recompute: the request is placed again with its
   context as the prompt);
4. `policy.plan_epoch` returns moves; the migration choice splits them into KV and token
   transfers within the profile's budgets (the rest wait); they run at once, and the migrated
   request loses the transfer's downtime (KV: latency + one block) or re-prefills its context in
   the destination's queue (tokens);
5. metrics are sampled where MELL's Algorithm 1 counts GPUs, after the slot's operations and the
   release of empty workers (active workers = workers holding at least one request), the same
   for every policy.

A request's size, as policies see it and as the lower bound counts it, is the KV of its whole
context (prompt and tokens generated) from placement on: the worker fills it within the prompt's
prefill, and placement must leave that room. The KV actually in memory (memory utilization)
grows chunk by chunk as the prompt is computed, as in the engine.

The worker pool is unbounded: the view always offers `spare_workers` idle ACTIVE workers per
model, and a worker that empties is released.

With `prefix_cache` (traces with prefix hashes: Mooncake), every worker caches prompt blocks
(`prefix_cache.PrefixCache`): a request admitted on a worker holding a prefix of its prompt
prefills only the rest, and is charged (`view.loads`) only the blocks no other running request
holds there. Arrivals carry their prefix hashes and the view answers `prefix_hits`; whether
placement uses them is the policy's choice (cache-aware or cache-blind). Moves are checked
against the destination's charge; a migrated request's KV lands whole on the destination (its
blocks there are shared only with what the destination holds).

With a host tier (`host`, `host_tier.HostTierSpec`: `kv_offload` swap or layerwise), a victim
of step 3 keeps its KV on its worker's host tier when there is room (swapped, or parked if it
was still prefilling), and resumes by a reload instead of a recompute; `tpot_slo_s` caps each
step's prefill chunk (the SLO-aware admission rule). See `host_tier.py` for what is modelled.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from mell.common.errors import InvalidRequest
from mell.gateway.policy.base import (
    Arrival,
    Move,
    Placement,
    Policy,
)
from mell.gateway.policy.migration_choice import choose_transfers
from mell.gateway.sim.batching import PrefillQueues, Prompt, tokens_computed, tokens_left
from mell.gateway.sim.bound import FluidBound, fluid_lower_bound
from mell.gateway.sim.host_tier import HostTier, HostTierSpec
from mell.gateway.sim.prefix_cache import PrefixCache
from mell.gateway.sim.profile import Profile
from mell.gateway.sim.repack import first_fit_decreasing
from mell.gateway.sim.result import SimResult
from mell.gateway.sim.tally import Tally
from mell.gateway.sim.traces import Trace
from mell.gateway.sim.view import SimView, transfer_model

IntArray = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]
Counts = npt.NDArray[np.intp]  # what np.bincount returns
BoolArray = npt.NDArray[np.bool_]

WAITING, RUNNING, DONE, REJECTED = 0, 1, 2, 3
PLACE_EPOCHS = 4.0  # placements leave room for this many epochs of growth (every policy)


class Simulator:
    def __init__(
        self,
        trace: Trace,
        profile: Profile,
        policy: Policy,
        *,
        epoch_s: float = 0.5,
        spare_workers: int = 8,
        sample_series: bool = True,
        progress: Callable[[float], None] | None = None,
        bound: FluidBound | None = None,
        prefix_cache: bool = False,
        host: HostTierSpec | None = None,
    ) -> None:
        self.trace, self.profile, self.policy = trace, profile, policy
        self.epoch_s = epoch_s
        # The reference every policy is measured against: computed from the trace alone (pass it
        # in to share one computation between the runs of a table).
        self.bound = bound if bound is not None else fluid_lower_bound(trace, profile, epoch_s)
        self.progress = progress
        self.sample_series = sample_series
        self.view = SimView(trace.models, profile, spare_workers)
        self.transfers = transfer_model(profile, self.view, epoch_s)
        n = len(trace)
        self.prompt = trace.prompt.astype(np.int64).copy()  # grows on preemption (recompute)
        self.state = np.zeros(n, dtype=np.int8)
        self.gen = np.zeros(n, dtype=np.float64)
        self.blocks = np.zeros(n, dtype=np.int64)
        self.worker = np.full(n, -1, dtype=np.int64)  # worker slot (`SimView.slot`)
        self.first_token = np.full(n, np.nan)
        self.finish = np.full(n, np.nan)
        self.rids = [str(i) for i in range(n)]  # request ids as the policies see them
        self.untimed = 0  # running requests without a first token yet
        self.waiting: dict[str, list[int]] = {}  # worker -> preempted requests (FCFS)
        self.n_waiting = 0
        self.view.held = self.waiting
        self.emptied: set[str] = set()  # workers that lost requests this epoch
        self.live: dict[int, str] = {}  # request index -> worker id
        self.placed_at = np.zeros(n, dtype=np.float64)
        # when each request may decode next: after its prefill (`PrefillQueues`) and after
        # a KV migration's downtime
        self.decode_from = np.zeros(n, dtype=np.float64)
        spec = (host or HostTierSpec()).check()
        self.host = HostTier(spec, profile) if spec.kv_offload != "off" else None
        if self.host is not None and prefix_cache:
            raise InvalidRequest("the host tier and the prefix caches are not simulated together")
        self.prefill = PrefillQueues(
            profile, self.first_token, self.decode_from, spec.tpot_slo_s * 1000.0
        )
        self.mem_in_use = 0  # KV blocks computed (in memory): prefills count their chunks only
        self.stats = dict.fromkeys(
            ("preempt", "mig", "kv", "tok", "deferred", "skipped", "rejected", "recomputed"), 0
        )
        # prefix caching: the caches, and each request's KV blocks other requests are charged
        self.cache: PrefixCache | None = None
        self.discount = np.zeros(n, dtype=np.int64)
        if prefix_cache and trace.prefix is not None:
            self.cache = self.view.cache = PrefixCache(
                trace.prefix_block_tokens, profile.block_size
            )

    # -- one run ----------------------------------------------------------------------------

    def run(self) -> SimResult:
        """Replay the whole trace, epoch by epoch (the module doc's steps), and report."""
        wall = time.perf_counter()
        tally = Tally(self.trace.models, self.profile.capacity_blocks, self.sample_series)
        t_first, t_last = self._run_epochs(tally)
        return self._result(tally, max(self.epoch_s, t_last - t_first), wall)

    def _run_epochs(self, tally: Tally) -> tuple[float, float]:
        """Run epochs until every request has arrived and left; (first epoch, end of last)."""
        trace, dt = self.trace, self.epoch_s
        n = len(trace)
        nxt = 0
        t = float(trace.arrival_s[0]) if n else 0.0
        t = math.floor(t / dt) * dt
        t_first = t
        last_progress = -1.0
        while nxt < n or self.live or self.n_waiting:
            if not self.live and not self.n_waiting and trace.arrival_s[nxt] >= t + dt:
                t = math.floor(trace.arrival_s[nxt] / dt) * dt  # idle: jump ahead
            t_end = t + dt
            nxt = self._arrive(nxt, t_end)
            busy, kv = self._decode(t, t_end)
            busy = self._migrate(self.policy.plan_epoch(self.view, t_end), t_end, busy)
            tally.epoch(t_end, dt, busy, kv, self.prefill.kv, self.mem_in_use, self._sizes_by_model)
            t = t_end
            last_progress = self._report_progress(nxt, last_progress)
        if self.progress is not None:
            self.progress(1.0)
        return t_first, t

    def _arrive(self, nxt: int, t_end: float) -> int:
        """Place the requests from `nxt` that arrive before `t_end`; the next one's index."""
        arrival_s = self.trace.arrival_s
        stop = int(np.searchsorted(arrival_s, t_end, side="left"))
        for i in range(nxt, stop):
            self._place(i, float(arrival_s[i]))
        return stop

    def _report_progress(self, nxt: int, last: float) -> float:
        """Call `progress` with the fraction of requests arrived, every 1%; the last reported."""
        n = len(self.trace)
        if self.progress is not None and n:
            frac = nxt / n
            if frac - last >= 0.01:
                self.progress(frac)
                return frac
        return last

    def _result(self, tally: Tally, span: float, wall: float) -> SimResult:
        """The run's report; `span` is the simulated time, `wall` when the run started."""
        trace, st, cap = self.trace, self.stats, self.profile.capacity_blocks
        done = self.state == DONE
        ttft = (self.first_token - trace.arrival_s)[done]
        out_tok = np.maximum(1, trace.output[done] - 1)
        tpot = (self.finish[done] - self.first_token[done]) / out_tok
        result = SimResult(
            policy=self.policy.name,
            requests=len(trace),
            rejected=st["rejected"],
            preemptions=st["preempt"],
            peak_active=tally.peak,
            avg_active=tally.busy_time / span,
            lower_bound=self.bound.workers,
            lower_bound_prefilling=self.bound.prefilling,
            own_bound=tally.own_bound,
            own_bound_prefilling=tally.own_prefilling,
            peak_kv=tally.peak_kv,
            peak_prefilling=tally.peak_prefilling,
            peak_repack=sum(first_fit_decreasing(v, cap) for v in tally.peak_sizes.values()),
            mem_util=tally.mem_util,
            migrations=st["mig"],
            kv_migrations=st["kv"],
            token_migrations=st["tok"],
            deferred_moves=st["deferred"],
            skipped_moves=st["skipped"],
            sim_seconds=span,
            ttft_p50_s=float(np.percentile(ttft, 50)) if len(ttft) else 0.0,
            ttft_p99_s=float(np.percentile(ttft, 99)) if len(ttft) else 0.0,
            tpot_mean_ms=float(tpot.mean() * 1000) if len(tpot) else 0.0,
            tpot_p99_ms=float(np.percentile(tpot, 99) * 1000) if len(tpot) else 0.0,
            wall_s=time.perf_counter() - wall,
            events=len(trace) + int(done.sum()) + st["preempt"] + st["mig"],
            peak_by_model=tally.peak_model,
            times=tally.times,
            active=tally.active,
        )
        self._prefix_summary(result)
        self._host_summary(result)
        return result

    def _host_summary(self, result: SimResult) -> None:
        """The host tier's measures into `result` (recomputed tokens with or without one)."""
        result.recomputed_tokens = self.stats["recomputed"]
        host = self.host
        if host is None:
            return
        result.kv_offload = host.spec.kv_offload
        result.swaps, result.parks = host.swaps, host.parks
        result.offload_bytes = host.bytes_moved

    def _prefix_summary(self, result: SimResult) -> None:
        """The prefix caches' measures into `result` (none without the cache model)."""
        cache = self.cache
        if cache is None:
            return
        result.prefix_hit_rate = cache.hit_rate
        result.prefill_saved_tokens = cache.hit_tokens
        result.prefill_queried_tokens = cache.queried_tokens
        result.prefix_evicted_blocks = cache.evicted

    def _sizes_by_model(self) -> dict[str, list[int]]:
        """The KV blocks of every running request, per model (its pool)."""
        out: dict[str, list[int]] = {}
        model_of = self.view.model_of
        for wid, load in self.view.loads.items():
            if load:
                out.setdefault(model_of[wid], []).extend(load.values())
        return out

    # -- steps ------------------------------------------------------------------------------

    def _place(self, i: int, now: float) -> None:
        trace, bs = self.trace, self.profile.block_size
        model = trace.models[int(trace.model[i])]
        prompt = int(self.prompt[i])
        hashes = () if self.cache is None or trace.prefix is None else tuple(trace.prefix[i])
        arrival = Arrival(str(i), model, prompt, int(trace.output[i]), hashes)
        decision = self.policy.place(self.view, arrival)
        if not isinstance(decision, Placement) or decision.worker_id not in self.view.loads:
            self.state[i] = REJECTED
            self.stats["rejected"] += 1
            return
        wid = decision.worker_id
        blocks = -(-(prompt + 1) // bs)
        todo = prompt
        if self.cache is not None:
            cached, blocks = self._admit(wid, i, blocks, prompt)
            todo = max(1, prompt - cached)  # the last prompt token is always computed
        self.view.add(wid, str(i), blocks)
        self.live[i] = wid
        self.worker[i] = self.view.slot[wid]
        self.blocks[i] = blocks
        self.state[i] = RUNNING
        self.untimed += 1
        self.placed_at[i] = now
        self.prefill.add(self.view.slot[wid], i, now, todo, float(prompt), blocks)
        if self.cache is not None:
            self.cache.trim(wid, sum(self.view.loads[wid].values()), self.profile.capacity_blocks)

    def _admit(
        self, wid: str, i: int, blocks: int, tokens: int, count: bool = True
    ) -> tuple[int, int]:
        """Request i (`blocks` KV blocks in all, a context of `tokens`) joins `wid`'s prefix
        cache; (its tokens cached there, the KV blocks it is charged there)."""
        assert self.cache is not None
        cached, shared = self.cache.acquire(
            wid, i, self.trace.prefix[i] if self.trace.prefix else (), tokens, count=count
        )
        self.discount[i] = shared
        return cached, blocks - shared

    def _release(self, i: int, wid: str) -> int:
        """Request i leaves `wid`'s prefix cache; the requests that take over the charge of
        the blocks it owned are charged them (`view.loads`). Returns the blocks taken over."""
        if self.cache is None:
            return 0
        self.discount[i] = 0
        load, rids, total = self.view.loads[wid], self.rids, 0
        for r, extra in self.cache.release(i).items():
            load[rids[r]] += extra
            self.blocks[r] += extra
            self.discount[r] -= extra
            total += extra
        return total

    def _decode(self, t: float, t_end: float) -> tuple[dict[str, int], dict[str, int]]:
        """Run every worker for the epoch as the engine batches (`workerd/scheduler.py`), at
        epoch granularity and vectorized over the running requests; then departures,
        preemption, resumption. Returns busy workers and their KV blocks per model.

        A worker's step computes one token per decoding request and, with the rest of its
        `max_num_batched_tokens` budget, a chunk of the prompts still prefilling, oldest first
        (FCFS: a prompt waits for the ones queued before it on its worker, never for later
        ones). While it prefills, its decoders advance one token per mixed step; the rest of
        the epoch runs plain decode steps (with the requests whose prefill ended joining).
        Each request decodes at its worker's average rate over the epoch. The KV a prefilling
        request holds in memory (`mem_in_use`: memory utilization) grows chunk by chunk; its size
        as policies see it (`view.loads`, and the KV of the bound) is its whole context from
        placement on, the memory it will hold within its prefill, which placement must leave.
        """
        if not self.live:
            return self._preempt_and_resume(t_end, None)
        idx = np.fromiter(self.live, dtype=np.int64, count=len(self.live))
        w = self.worker[idx]
        nw = int(w.max()) + 1
        gen = self.gen[idx]
        batch, ctx_sum, rate = self._decode_rates(self.prompt[idx] + gen, w, nw)
        held_back = self._run_prefills(t, t_end, batch, ctx_sum, rate)
        rw = rate[w]
        gen = self._decode_tokens(idx, gen, rw, t, t_end)
        keep = self._depart_finished(idx, gen, rw, t_end)
        if keep is not None:
            idx, gen, w = idx[keep], gen[keep], w[keep]
        used = self._grow_kv(idx, w, gen, nw, held_back)
        return self._preempt_and_resume(t_end, used)

    def _decode_rates(self, ctx: Floats, w: IntArray, nw: int) -> tuple[Counts, Floats, Floats]:
        """Per worker slot (of `nw`), from the context tokens `ctx` of the running requests on
        slots `w`: its running requests, their context tokens, and its decode tokens per
        second (the profile's plain decode step)."""
        step = self.profile.step
        batch = np.bincount(w, minlength=nw)
        # weighted, bincount counts in float64 (the stubs say intp): no copy is made
        ctx_sum = np.bincount(w, weights=ctx, minlength=nw).astype(np.float64, copy=False)
        decode_s = (
            step.decode_base_ms
            + step.decode_per_seq_ms * batch
            + step.decode_per_kv_token_ms * ctx_sum
        ) / 1000.0
        return batch, ctx_sum, 1.0 / decode_s

    def _run_prefills(
        self, t: float, t_end: float, batch: Counts, ctx_sum: Floats, rate: Floats
    ) -> int:
        """Run the epoch's chunked prefills; the blocks of prompts not computed yet."""
        if not self.prefill:
            self.prefill.kv = 0
            return 0
        firsts, held_back = self.prefill.run(t, t_end, batch, ctx_sum, rate)
        self.untimed -= firsts
        return held_back

    def _decode_tokens(
        self, idx: IntArray, gen: Floats, rw: Floats, t: float, t_end: float
    ) -> Floats:
        """Advance the requests `idx` (`gen` tokens generated) at their workers' rates `rw`
        from when each may decode (after its prefill, after a KV migration's downtime); their
        tokens generated now."""
        begin = np.maximum(self.decode_from[idx], t)
        gen = gen + np.maximum(t_end - begin, 0.0) * rw
        self.gen[idx] = gen
        return gen

    def _depart_finished(
        self, idx: IntArray, gen: Floats, rw: Floats, t_end: float
    ) -> BoolArray | None:
        """The requests that generated their output leave, finishing within the epoch at
        their rate; the mask of those that stay (None when none left)."""
        output = self.trace.output[idx]
        finished = gen >= output
        if not finished.any():
            return None
        fin = idx[finished]
        self.finish[fin] = t_end - (gen[finished] - output[finished]) / rw[finished]
        self.state[fin] = DONE
        live, rids, emptied, loads = self.live, self.rids, self.emptied, self.view.loads
        for i in fin.tolist():
            wid = live.pop(i)
            del loads[wid][rids[i]]
            self._release(i, wid)
            emptied.add(wid)
        return ~finished

    def _grow_kv(
        self, idx: IntArray, w: IntArray, gen: Floats, nw: int, held_back: int
    ) -> list[int]:
        """The running requests' KV grows to their context (prompt and tokens generated); the
        view's loads follow. Returns each worker slot's KV blocks."""
        # gen >= 0, so truncation is floor; (x + bs - 1) // bs is the ceiling for x >= 0
        bs = self.profile.block_size
        tokens = self.prompt[idx] + np.minimum(gen.astype(np.int64) + 1, self.trace.output[idx])
        blocks = (tokens + (bs - 1)) // bs
        if self.cache is not None:
            blocks -= self.discount[idx]
        self.mem_in_use = int(blocks.sum()) - held_back
        changed = blocks != self.blocks[idx]
        self.blocks[idx] = blocks
        loads, live, rids = self.view.loads, self.live, self.rids
        for i, b in zip(idx[changed].tolist(), blocks[changed].tolist(), strict=True):
            loads[live[i]][rids[i]] = b
        used: list[int] = np.bincount(w, weights=blocks, minlength=nw).astype(np.int64).tolist()
        return used

    def _preempt_and_resume(
        self, t_end: float, used_at: list[int] | None
    ) -> tuple[dict[str, int], dict[str, int]]:
        """vLLM's behaviour on each worker: over capacity, the latest admitted request is
        preempted (its KV freed) and waits on that worker; waiting requests resume first-come
        first-served when their context fits again, re-prefilling it (recompute)."""
        view, cap = self.view, self.profile.capacity_blocks
        touched = set(view.busy()) | {w for w, q in self.waiting.items() if q} | self.emptied
        self.emptied = set()
        slot = view.slot
        known = len(used_at) if used_at is not None else 0
        loads, waiting, refresh, model_of = view.loads, self.waiting, view.refresh, view.model_of
        infos = view.info
        busy = dict.fromkeys(self.trace.models, 0)
        kv = dict.fromkeys(self.trace.models, 0)
        for wid in sorted(touched):  # sorted: runs are reproducible across processes
            load = loads.get(wid)
            if load is None:
                continue
            if not load:
                used = 0
            elif used_at is None:
                used = sum(load.values())
            else:  # KV of the worker's running requests, summed per worker by `_decode`
                k = slot[wid]
                used = used_at[k] if k < known else 0
            if used > cap and len(load) > 1:
                used = self._preempt(wid, load, used, t_end)
            if waiting.get(wid):
                used = self._resume(wid, load, used, t_end)
            if self.cache is not None:
                self.cache.trim(wid, used, cap)
            info = infos.get(wid)
            if info is None:
                refresh(wid, used)
            elif info.num_free_blocks != cap - used:  # `SimView.refresh`, inlined
                object.__setattr__(info, "num_free_blocks", cap - used)
            if load:
                m = model_of[wid]
                busy[m] += 1
                kv[m] += used
            else:
                view.release_if_empty(wid)
        return busy, kv

    def _preempt(self, wid: str, load: dict[str, int], used: int, t_end: float) -> int:
        """Preempt the latest admitted requests of `wid` until it fits; the KV left in use.
        A victim's KV goes to the host tier when it can (`_offload`), else it is dropped (to be
        recomputed)."""
        cap = self.profile.capacity_blocks
        while used > cap and len(load) > 1:
            rid = max(load, key=lambda r: (self.placed_at[int(r)], int(r)))
            blocks = load.pop(rid)
            used -= blocks
            i = int(rid)
            used += self._release(i, wid)
            del self.live[i]
            self._offload(wid, i, blocks, self.prefill.remove(i), t_end)
            self.state[i] = WAITING
            self.waiting.setdefault(wid, []).append(i)
            self.n_waiting += 1
            self.stats["preempt"] += 1
        return used

    def _offload(self, wid: str, i: int, blocks: int, queued: Prompt | None, t: float) -> None:
        """Victim i (`blocks` on `wid`; `queued`: its prefill record if still prefilling) keeps
        its KV on the host tier when there is room (parked: its first token after its prompt's
        one-pass prefill from `t`), else its computed tokens count as recomputed."""
        host = self.host
        kept = host.take(wid, i, blocks, queued is not None) if host is not None else None
        if kept == "park" and queued is not None and math.isnan(self.first_token[i]):
            self.first_token[i] = t + self.profile.step.prefill_ms(tokens_left(queued)) / 1000.0
        elif kept is None:
            self.stats["recomputed"] += (
                tokens_computed(queued) if queued is not None else int(self.prompt[i] + self.gen[i])
            )

    def _resume(self, wid: str, load: dict[str, int], used: int, t_end: float) -> int:
        """Resume waiting requests of `wid` first-come first-served while they fit: reloaded
        from the host tier, or re-prefilled (recompute)."""
        cap, bs = self.profile.capacity_blocks, self.profile.block_size
        queue = self.waiting[wid]
        while queue:
            i = queue[0]
            context = int(self.prompt[i] + int(self.gen[i]))
            need = -(-(context + 1) // bs)
            todo = context
            shared = 0 if self.cache is None else self._shared_at(wid, i)
            if used + need - shared > cap and load:
                break
            if self.host is not None and i in self.host.on_host:
                used = self._reload(wid, i, load, used, need, t_end)
                continue
            if self.cache is not None:
                cached, need = self._admit(wid, i, need, context)
                todo = max(1, context - cached)
            queue.pop(0)
            self.n_waiting -= 1
            load[str(i)] = need
            used += need
            self.blocks[i] = need
            self.live[i] = wid
            self.state[i] = RUNNING
            self.placed_at[i] = t_end
            self.prefill.add(
                self.view.slot[wid], i, t_end, todo, self.prompt[i] + self.gen[i], need
            )
        return used

    def _reload(
        self, wid: str, i: int, load: dict[str, int], used: int, need: int, t_end: float
    ) -> int:
        """Request i (first in `wid`'s queue) comes back from the host tier: running again,
        decoding once its reload has landed; the KV in use on `wid`."""
        assert self.host is not None
        self.waiting[wid].pop(0)
        self.n_waiting -= 1
        load[str(i)] = need
        self.blocks[i] = need
        self.live[i] = wid
        self.state[i] = RUNNING
        self.placed_at[i] = t_end
        self.decode_from[i] = t_end + self.host.reload(wid, i)
        return used + need

    def _shared_at(self, wid: str, i: int) -> int:
        """KV blocks of request i that running requests on `wid` hold (pure)."""
        assert self.cache is not None and self.trace.prefix is not None
        _, shared = self.cache.lookup(wid, self.trace.prefix[i])
        return shared * self.cache.per_block

    def _migrate(self, moves: list[Move], now: float, busy: dict[str, int]) -> dict[str, int]:
        """Run the epoch's moves; `busy` (busy workers per model) updated for the workers
        they fill and empty."""
        if not moves:
            return busy
        view = self.view
        valid = [
            m
            for m in moves
            if m.src != m.dst and m.request_id in view.loads.get(m.src, ()) and m.dst in view.loads
        ]
        touched = {m.src for m in valid} | {m.dst for m in valid}
        before = {w: bool(view.loads[w]) for w in touched}
        self.stats["skipped"] += len(moves) - len(valid)
        bs = self.profile.block_size
        context = {m.request_id: int(view.loads[m.src][m.request_id]) * bs for m in valid}
        plan = choose_transfers(valid, context, self.transfers)
        self.stats["deferred"] += len(plan.deferred)
        self.stats["skipped"] += len(self._run_moves(plan.chosen, now))
        for wid in sorted({m.src for m in moves if m.src in view.loads}):
            view.refresh(wid)
            view.release_if_empty(wid)
        for wid, was in before.items():
            now_busy = bool(view.loads.get(wid))
            if now_busy != was:
                busy[view.model_of[wid]] += 1 if now_busy else -1
        return busy

    def _run_moves(self, pending: list[Move], now: float) -> list[Move]:
        """Run the chosen moves whose destination has room; moves may free the room later
        ones need, so a few passes are made. Returns the moves that never found room."""
        loads = self.view.loads
        used = {w: sum(loads[w].values()) for w in {m.dst for m in pending}}
        for _ in range(3):
            later = self._run_pass(pending, used, now)
            if len(later) == len(pending):
                break
            pending = later
        return pending

    def _run_pass(self, pending: list[Move], used: dict[str, int], now: float) -> list[Move]:
        """One pass over `pending` (`used`: KV blocks of the destinations, kept up to date);
        returns the moves that did not fit (a request that left is dropped)."""
        cap, loads = self.profile.capacity_blocks, self.view.loads
        later = []
        for m in pending:
            blocks = loads[m.src].get(m.request_id)
            if blocks is None:
                continue
            i = int(m.request_id)
            need = blocks  # what it takes on the destination
            if self.cache is not None:
                need = blocks + int(self.discount[i]) - self._shared_at(m.dst, i)
            if used.get(m.dst, 0) + need > cap:
                later.append(m)
                continue
            need, taken_over = self._execute(m, i, blocks, now)
            used[m.dst] = used.get(m.dst, 0) + need
            if m.src in used:
                used[m.src] -= blocks - taken_over
        return later

    def _execute(self, m: Move, i: int, blocks: int, now: float) -> tuple[int, int]:
        """Run one move of request i (`blocks` on its source); (its KV blocks charged on the
        destination, blocks other requests on the source took over)."""
        view, t = self.view, self.transfers
        view.remove(m.src, m.request_id)
        total = blocks + int(self.discount[i])
        taken_over = self._release(i, m.src)
        cached = 0  # context tokens the destination holds (token transfer: not prefilled)
        if self.cache is not None:
            ctx_tokens = int(self.prompt[i] + self.gen[i])
            cached, blocks = self._admit(m.dst, i, total, ctx_tokens, count=m.kind != "kv")
            self.blocks[i] = blocks
        view.add(m.dst, m.request_id, blocks)
        self.live[i] = m.dst
        self.worker[i] = view.slot[m.dst]
        self.stats["mig"] += 1
        if m.kind == "kv":
            self.stats["kv"] += 1
            # Live KV migration: decoding continues; the downtime is the last stage
            self.decode_from[i] = max(self.decode_from[i], now) + (
                t.latency_s
                + self.profile.block_size
                * t.kv_bytes_per_token
                / (t.link_bytes_per_s[t.link_of(m.src, m.dst)])
            )
            self.prefill.move(i, view.slot[m.dst])  # a prompt still prefilling goes on there
        else:
            self.stats["tok"] += 1
            # Token transfer: the request joins the destination's prefill queue with its whole
            # context (its KV there is computed chunk by chunk again).
            ctx = self.prompt[i] + self.gen[i]
            redo = max(1, int(ctx) - cached) if cached else int(ctx)
            self.prefill.add(view.slot[m.dst], i, now, redo, ctx, blocks)
        if self.cache is not None:
            self.cache.trim(m.dst, sum(view.loads[m.dst].values()), self.profile.capacity_blocks)
        return blocks, taken_over


def headroom_tokens(profile: Profile, epoch_s: float) -> int:
    """Tokens one request decodes per epoch on a typical worker (16 requests, half full)."""
    step_ms = profile.step.decode_ms(16, profile.capacity_tokens // 2)
    return math.ceil(epoch_s * 1000.0 / step_ms)


CACHE_AWARE = ("mell", "best-fit")  # the policies with a cache-aware placement (`prefix_aware`)


def sim_policy(
    name: str,
    profile: Profile,
    epoch_s: float,
    *,
    headroom: bool = True,
    prefix_aware: bool = False,
    **mell_options: Any,
) -> Policy:
    """A registry policy configured for the simulated epoch. With `headroom` every policy that
    places keeps the same growth reserve as MELL (one epoch of decoding, see
    `baselines.reserve`), so that no policy wins by over-committing memory and preempting.
    With `prefix_aware`, the policies of CACHE_AWARE place by where prefixes are cached."""
    from mell.gateway.policy.base import make_policy

    tokens = headroom_tokens(profile, epoch_s)
    place_epochs = mell_options.pop("place_epochs", PLACE_EPOCHS)
    aware = {"prefix_aware": True} if prefix_aware and name in CACHE_AWARE else {}
    if name == "mell":
        return make_policy(
            name, headroom_tokens=tokens, place_epochs=place_epochs, **aware, **mell_options
        )
    if headroom and name in ("best-fit", "worst-fit", "round-robin", "lb"):
        return make_policy(name, headroom_tokens=tokens, place_epochs=place_epochs, **aware)
    return make_policy(name, **aware)


def simulate(trace: Trace, profile: Profile, policy: Policy, **kwargs: Any) -> SimResult:
    return Simulator(trace, profile, policy, **kwargs).run()
