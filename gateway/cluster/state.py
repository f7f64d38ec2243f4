"""The one door through which cluster events enter: envelope, append hooks, then the fold.

`record(event)` numbers the event per source, stamps it with a wall-clock time that never goes
backwards (the view orders writes from different sources by it), passes the envelope to every
append hook (the durable journal, when configured) before the view changes, then applies it to
the view. A state built over a recovered view continues its sequence numbers and clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from mell.common.events import Event, EventEnvelope
from mell.gateway.cluster.view import ClusterView

GATEWAY = "gateway"
AppendHook = Callable[[EventEnvelope], object]
_TICK = 1e-6  # the smallest step between two stamps


class ClusterState:
    """Owns the view; every change goes through `record`."""

    def __init__(self, view: ClusterView) -> None:
        self.view = view
        self._seqs: dict[str, int] = dict(view.last_seq)
        self._last_ts = max(view.last_stamp[0], 0.0)
        self._hooks: list[AppendHook] = []

    def add_append_hook(self, hook: AppendHook) -> None:
        self._hooks.append(hook)

    def record(self, event: Event, source: str = GATEWAY) -> EventEnvelope:
        seq = self._seqs.get(source, 0) + 1
        self._seqs[source] = seq
        ts = time.time()
        if ts <= self._last_ts:
            ts = self._last_ts + _TICK
        self._last_ts = ts
        envelope = EventEnvelope(source, seq, ts, event)
        for hook in self._hooks:
            hook(envelope)
        self.view.apply(envelope)
        return envelope
