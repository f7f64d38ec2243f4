"""The cluster view's soft state: each worker's newest prefix cache summary.

A `LoadReport` carries a bounded summary of the worker's prefix cache (`CachedPrefixes`); the
view keeps the newest per worker as a hint for placement. It is not an event: not journaled,
not in snapshots, lost on a gateway restart until each worker's next report. The view writes it
through one door (`ClusterView.note_prefixes`) and forgets a worker's summary with its row or
its process (a new boot id: its cache starts empty).
"""

from __future__ import annotations

from collections.abc import Sequence

from mell.common.workers import CachedPrefixes
from mell.gateway.policy.base import PrefixHit


class PrefixSummaries:
    """Per worker: the hashes of every cached block, and of those running requests hold."""

    def __init__(self) -> None:
        self._cached: dict[str, tuple[frozenset[int], frozenset[int]]] = {}

    def note(self, worker_id: str, prefixes: CachedPrefixes | None) -> None:
        """The worker's newest summary (None: it caches nothing)."""
        if prefixes is None:
            self.forget(worker_id)
            return
        in_use = frozenset(prefixes.in_use)
        self._cached[worker_id] = (in_use | frozenset(prefixes.free), in_use)

    def forget(self, worker_id: str) -> None:
        self._cached.pop(worker_id, None)

    def hit(
        self, worker_id: str, prefix_hashes: Sequence[int], block_size: int
    ) -> PrefixHit | None:
        """How much of the prompt (its chained block hashes) the worker holds; None: nothing."""
        cached = self._cached.get(worker_id)
        if cached is None:
            return None
        every, in_use = cached
        n = shared = 0
        for h in prefix_hashes:
            if h not in every:
                break
            n += 1
            shared += h in in_use
        return PrefixHit(tokens=n * block_size, shared_blocks=shared) if n else None
