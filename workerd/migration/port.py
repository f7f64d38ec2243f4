"""What the migration machines and the boundaries send through: the worker's I/O thread."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from mell.common.messages import PeerMessage, WorkerMessage
from mell.transport.codec import Buffer


class Port(Protocol):
    """Sends never block and never fail here: a lost peer shows as a missed deadline."""

    def to_peer(
        self, address: str, message: PeerMessage, buffers: Sequence[Buffer] | None = None
    ) -> None:
        """To another worker's data plane; `buffers` are the message's frames (uncopied)."""
        ...

    def to_gateway(self, message: WorkerMessage) -> None: ...
