"""The one door through which cluster events enter: envelope, append hooks, then the fold.

`record(event)` numbers the event per source, passes the envelope to every append hook (the
durable journal, when configured) before the view changes, then applies it to the view.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from mell.common.events import Event, EventEnvelope
from mell.gateway.cluster_view import ClusterView

GATEWAY = "gateway"
AppendHook = Callable[[EventEnvelope], None]


class ClusterState:
    """Owns the view; every change goes through `record`."""

    def __init__(self, view: ClusterView) -> None:
        self.view = view
        self._seqs: dict[str, int] = {}
        self._hooks: list[AppendHook] = []

    def add_append_hook(self, hook: AppendHook) -> None:
        self._hooks.append(hook)

    def record(self, event: Event, source: str = GATEWAY) -> EventEnvelope:
        seq = self._seqs.get(source, 0) + 1
        self._seqs[source] = seq
        envelope = EventEnvelope(source, seq, time.time(), event)
        for hook in self._hooks:
            hook(envelope)
        self.view.apply(envelope)
        return envelope
