"""The gateway's ROUTER socket as its users see it: send to a worker, call it, receive.

`WorkerPort` owns the ZeroMQ context, the channel, the calls in flight and the routes: which
connection (route) speaks for which worker id. A route is bound to a worker once its signed
hello is accepted (`authentic`, then `bind`), and unbound when the worker is lost; messages
go to a worker's bound route only. It is built first: the dispatcher and the migrator send
through it (as an `Outbox`), the worker link receives through it. A send that finds its worker
unreachable returns False and queues the worker's id; the link declares those workers lost
(`WorkerLink.watch_forever`), so the port needs no link.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Protocol

import zmq.asyncio

from mell.common.errors import MellError
from mell.common.messages import GatewayMessage, Hello, WorkerMessage
from mell.transport.channel import PeerUnreachable, RouterChannel
from mell.transport.codec import Codec
from mell.transport.rpc import PendingCalls
from mell.transport.secret import ClusterSecret

MakeMessage = Callable[[int], GatewayMessage]  # call id -> the message that carries it
HELLO_MAX_AGE_S = 300.0  # a signed hello older (or newer) than this is refused: a replay


class Outbox(Protocol):
    """What senders need of the port."""

    def send(self, worker_id: str, message: GatewayMessage) -> bool: ...

    def send_quietly(self, worker_id: str, message: GatewayMessage) -> None: ...

    async def call(self, worker_id: str, make: MakeMessage, timeout_s: float = 5.0) -> None: ...


class WorkerPort:
    """Owns the ROUTER socket every worker connects to, and its routes; an `Outbox`."""

    def __init__(self, endpoint: str, secret: ClusterSecret) -> None:
        self._ctx = zmq.asyncio.Context()
        self.channel: RouterChannel[WorkerMessage] = RouterChannel(
            self._ctx, endpoint, Codec(WorkerMessage)
        )
        self.endpoint = self.channel.endpoint
        self.secret = secret
        self.calls = PendingCalls()
        self.unreachable: asyncio.Queue[str] = asyncio.Queue()  # for the link to declare lost
        self._routes: dict[str, str] = {}  # worker id -> route
        self._workers: dict[str, str] = {}  # route -> worker id

    # ------------------------------------------------------------ routes

    def authentic(self, route: str, hello: Hello) -> bool:
        """The hello is signed with the cluster secret, for this route, recently."""
        if abs(time.time() - hello.signed_at) > HELLO_MAX_AGE_S:
            return False
        return self.secret.verify(hello.mac, *hello.signed_parts(route))

    def bind(self, worker_id: str, route: str) -> None:
        """From now on `route` speaks for `worker_id` (and no other route does)."""
        self.unbind(worker_id)
        self._routes[worker_id] = route
        self._workers[route] = worker_id

    def unbind(self, worker_id: str) -> None:
        route = self._routes.pop(worker_id, None)
        if route is not None:
            self._workers.pop(route, None)

    def route_of(self, worker_id: str) -> str | None:
        return self._routes.get(worker_id)

    def worker_at(self, route: str) -> str | None:
        """The worker `route` speaks for; None for a connection no hello was accepted from."""
        return self._workers.get(route)

    async def disconnected(self) -> str:
        """The next worker whose connection closed (a bound route's)."""
        while True:
            worker_id = self._workers.get(await self.channel.disconnected())
            if worker_id is not None:
                return worker_id

    def send_route(self, route: str, message: GatewayMessage) -> None:
        """Send to a connection whatever it speaks for (Rejoin, Refused); nothing if gone."""
        with contextlib.suppress(PeerUnreachable):
            self.channel.send(route, message)

    # ------------------------------------------------------------ to workers

    def send(self, worker_id: str, message: GatewayMessage) -> bool:
        """Send without blocking; False (and the worker queued as unreachable) if it is gone."""
        if self.try_send(worker_id, message):
            return True
        self.unreachable.put_nowait(worker_id)
        return False

    def try_send(self, worker_id: str, message: GatewayMessage) -> bool:
        """Send without blocking; False if the worker is gone (its loss is the caller's)."""
        try:
            self._send(worker_id, message)
            return True
        except PeerUnreachable:
            return False

    def send_quietly(self, worker_id: str, message: GatewayMessage) -> None:
        """Send if the worker is there; nothing happens if it is not."""
        with contextlib.suppress(PeerUnreachable):
            self._send(worker_id, message)

    async def call(self, worker_id: str, make: MakeMessage, timeout_s: float = 5.0) -> None:
        """Send `make(call_id)` and wait for the worker's reply; CallTimeout, PeerUnreachable,
        or MellError when the worker answers with an error."""
        error = await self.calls.call(
            lambda call_id: self._send(worker_id, make(call_id)), timeout_s
        )
        if error is not None:
            raise MellError(f"worker {worker_id}: {error}")

    def _send(self, worker_id: str, message: GatewayMessage) -> None:
        route = self._routes.get(worker_id)
        if route is None:
            raise PeerUnreachable(worker_id)
        self.channel.send(route, message)

    def close(self) -> None:
        self.channel.close()
        self._ctx.term()
