"""The gateway's ROUTER socket as its users see it: send to a worker, call it, receive.

`WorkerPort` owns the ZeroMQ context, the channel and the calls in flight. It is built first:
the dispatcher and the migrator send through it (as an `Outbox`), the worker link receives
through it. A send that finds its worker unreachable returns False and queues the worker's id;
the link declares those workers lost (`WorkerLink.watch_forever`), so the port needs no link.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Protocol

import zmq.asyncio

from mell.common.errors import MellError
from mell.common.messages import GatewayMessage, WorkerMessage
from mell.transport.channel import PeerUnreachable, RouterChannel
from mell.transport.codec import Codec
from mell.transport.rpc import PendingCalls

MakeMessage = Callable[[int], GatewayMessage]  # call id -> the message that carries it


class Outbox(Protocol):
    """What senders need of the port."""

    def send(self, worker_id: str, message: GatewayMessage) -> bool: ...

    def send_quietly(self, worker_id: str, message: GatewayMessage) -> None: ...

    async def call(self, worker_id: str, make: MakeMessage, timeout_s: float = 5.0) -> None: ...


class WorkerPort:
    """Owns the ROUTER socket every worker connects to; an `Outbox`."""

    def __init__(self, endpoint: str) -> None:
        self._ctx = zmq.asyncio.Context()
        self.channel: RouterChannel[WorkerMessage] = RouterChannel(
            self._ctx, endpoint, Codec(WorkerMessage)
        )
        self.endpoint = self.channel.endpoint
        self.calls = PendingCalls()
        self.unreachable: asyncio.Queue[str] = asyncio.Queue()  # for the link to declare lost

    def send(self, worker_id: str, message: GatewayMessage) -> bool:
        """Send without blocking; False (and the worker queued as unreachable) if it is gone."""
        if self.try_send(worker_id, message):
            return True
        self.unreachable.put_nowait(worker_id)
        return False

    def try_send(self, worker_id: str, message: GatewayMessage) -> bool:
        """Send without blocking; False if the worker is gone (its loss is the caller's)."""
        try:
            self.channel.send(worker_id, message)
            return True
        except PeerUnreachable:
            return False

    def send_quietly(self, worker_id: str, message: GatewayMessage) -> None:
        """Send if the worker is there; nothing happens if it is not."""
        with contextlib.suppress(PeerUnreachable):
            self.channel.send(worker_id, message)

    async def call(self, worker_id: str, make: MakeMessage, timeout_s: float = 5.0) -> None:
        """Send `make(call_id)` and wait for the worker's reply; CallTimeout, PeerUnreachable,
        or MellError when the worker answers with an error."""
        error = await self.calls.call(
            lambda call_id: self.channel.send(worker_id, make(call_id)), timeout_s
        )
        if error is not None:
            raise MellError(f"worker {worker_id}: {error}")

    def close(self) -> None:
        self.channel.close()
        self._ctx.term()
