"""The simulator's cluster as policies see it: a PolicyView over simulated workers, and the
migration cost model of its links."""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from mell.gateway.policy.base import PrefixHit, WorkerInfo, WorkerStatus
from mell.gateway.policy.migration_choice import TransferModel
from mell.gateway.sim.prefix_cache import PrefixCache
from mell.gateway.sim.profile import Profile


class SimView:
    """PolicyView over the simulator's state: busy workers plus spare idle ones per model.

    Its WorkerInfo objects are live views of the simulated workers (see `refresh`): valid for
    the policy call they are read in, like any view."""

    def __init__(self, models: list[str], profile: Profile, spare: int) -> None:
        self._models = list(models)
        self.profile = profile
        self.spare = spare
        self.loads: dict[str, dict[str, int]] = {}  # worker -> {request: blocks}
        self.model_of: dict[str, str] = {}
        self.index: dict[str, int] = {}  # worker -> global index (machine topology)
        # worker -> its position in the simulator's per-worker arrays: the lowest free one, a
        # released worker's reused, so the arrays stay as long as the most workers at once.
        self.slot: dict[str, int] = {}
        self._free_slots: list[int] = []  # a heap
        self.infos: dict[str, dict[str, WorkerInfo]] = {m: {} for m in models}
        self.info: dict[str, WorkerInfo] = {}  # worker -> its WorkerInfo (all models)
        self._lists: dict[str, list[WorkerInfo] | None] = dict.fromkeys(models)
        self.idle: dict[str, list[str]] = {m: [] for m in models}
        self._next = 0
        self.held: dict[str, list[int]] = {}  # worker -> preempted requests waiting there
        self.cache: PrefixCache | None = None  # the workers' prefix caches, when simulated
        for m in models:
            self.top_up(m)

    # PolicyView
    def models(self) -> list[str]:
        return self._models

    def workers(self, model: str) -> list[WorkerInfo]:
        cached = self._lists.get(model)
        if cached is None:
            cached = list(self.infos.get(model, {}).values())
            self._lists[model] = cached
        return cached

    # PrefixView
    def prefix_hits(self, model: str, prefix_hashes: Sequence[int]) -> dict[str, PrefixHit]:
        cache = self.cache
        if cache is None:
            return {}
        tokens, per = cache.block_tokens, cache.per_block
        return {
            w: PrefixHit(k * tokens, shared * per)
            for w, (k, shared) in cache.hits(prefix_hashes, self.infos.get(model, {})).items()
            if k
        }

    # mechanics
    def new_worker(self, model: str) -> str:
        wid = f"{model}/w{self._next}"
        self.index[wid] = self._next
        self._next += 1
        self.slot[wid] = heapq.heappop(self._free_slots) if self._free_slots else len(self.slot)
        self.loads[wid] = {}
        self.model_of[wid] = model
        self.idle[model].append(wid)
        self.refresh(wid)
        return wid

    def top_up(self, model: str) -> None:
        while len(self.idle[model]) < self.spare:
            self.new_worker(model)

    def refresh(self, wid: str, used: int | None = None) -> None:
        load = self.loads[wid]
        if used is None:
            used = sum(load.values())
        p = self.profile
        model = self.model_of[wid]
        info = self.infos[model].get(wid)
        if info is not None:
            # The simulator's WorkerInfo is a live view of its worker: `request_blocks` is the
            # worker's own dict, and the free count is updated in place (a new frozen object per
            # worker per epoch was a fifth of the simulator's time). Policies read the view
            # during a call and keep nothing of it, as the policy contract (`policy/base.py`) asks.
            if info.num_free_blocks != p.capacity_blocks - used:
                object.__setattr__(info, "num_free_blocks", p.capacity_blocks - used)
            return
        self.infos[model][wid] = self.info[wid] = WorkerInfo(
            wid,
            model,
            WorkerStatus.ACTIVE,
            p.capacity_blocks,
            p.block_size,
            load,
            p.capacity_blocks - used,
        )
        self._lists[model] = None

    def add(self, wid: str, rid: str, blocks: int) -> None:
        load = self.loads[wid]
        if not load:
            model = self.model_of[wid]
            idle = self.idle[model]
            if wid in idle:
                idle.remove(wid)
                self.top_up(model)
        load[rid] = blocks
        self.refresh(wid)

    def remove(self, wid: str, rid: str) -> None:
        del self.loads[wid][rid]

    def release_if_empty(self, wid: str) -> None:
        """An empty worker joins the idle spares, or is released when there are enough.
        With prefix caches, an emptied worker that holds cached blocks stays idle in place of
        the spare holding the fewest (the spare count is the same; its cache is not lost)."""
        if self.loads[wid] or self.held.get(wid):
            return
        model = self.model_of[wid]
        idle = self.idle[model]
        if wid in idle:
            return
        if len(idle) < self.spare:
            idle.append(wid)
            self.refresh(wid, 0)
            return
        cache = self.cache
        if cache is not None and cache.cached_blocks(wid):
            idle.append(wid)
            self.refresh(wid, 0)
            wid = min(idle, key=cache.cached_blocks)  # (the oldest of the least cached)
            idle.remove(wid)
        self._release(model, wid)

    def _release(self, model: str, wid: str) -> None:
        del self.infos[model][wid]
        del self.info[wid]
        del self.loads[wid]
        if self.cache is not None:
            self.cache.drop(wid)
        heapq.heappush(self._free_slots, self.slot.pop(wid))
        self._lists[model] = None

    def busy(self) -> list[str]:
        return [w for w, load in self.loads.items() if load]


def transfer_model(profile: Profile, view: SimView, epoch_s: float) -> TransferModel:
    links = profile.links
    per_machine = links.gpus_per_machine

    def link_of(src: str, dst: str) -> str:
        a, b = view.index.get(src, 0) // per_machine, view.index.get(dst, 0) // per_machine
        return f"intra:{a}" if a == b else f"inter:{a}>{b}"

    class _Bandwidth(dict[str, float]):
        def __missing__(self, key: str) -> float:
            gbps = links.inter_gbps if key.startswith("inter") else links.intra_gbps
            return gbps * 1e9

    return TransferModel(
        kv_bytes_per_token=profile.model.kv_bytes_per_token,
        link_of=link_of,
        link_bytes_per_s=_Bandwidth(),
        default_prefill_tps=1000.0 / profile.step.prefill_per_token_ms,
        epoch_s=epoch_s,
        comm_fraction=links.comm_fraction,
        prefill_fraction=links.prefill_fraction,
        latency_s=links.latency_ms / 1000.0,
    )
