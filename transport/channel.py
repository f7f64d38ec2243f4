"""Channels: the gateway's ROUTER (asyncio, binds) and a worker's DEALER (blocking, connects).

The gateway side knows each connection by its ZeroMQ identity (a worker's route: its worker id
and a random suffix, new for every process). It watches its connections: `disconnected` tells
the route whose TCP connection just closed (a socket monitor), so a dead worker is known at
once, not after a heartbeat timeout. Receive loops never
stop on a bad frame: it is logged with its peer and dropped. Frames are sent without copying;
received frames alias ZeroMQ's buffers until the caller drops them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import structlog
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from mell.common.errors import ProtocolError
from mell.transport.codec import Buffer, Codec

T = TypeVar("T")
log = structlog.get_logger("mell.transport")


class PeerUnreachable(Exception):
    """The ROUTER has no connection to that identity (worker gone)."""


class RouterChannel(Generic[T]):
    """Gateway end: binds one address; all workers connect to it."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, codec: Codec[T]) -> None:
        self._codec = codec
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unknown peer: error, not silent drop
        self.socket.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted worker takes its id over
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, 0)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.socket.bind(endpoint)
        self.endpoint: str = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._monitor = self.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._route_of_fd: dict[int, str] = {}  # the connection each route last spoke on

    async def recv(self) -> tuple[str, T, list[memoryview]]:
        """The next well-formed message: (peer identity, message, raw frames)."""
        while True:
            frames = await self.socket.recv_multipart(copy=False)
            peer = bytes(frames[0].buffer).decode(errors="replace")
            self._route_of_fd[frames[0].get(zmq.SRCFD)] = peer
            try:
                message, raw = self._codec.decode([f.buffer for f in frames[1:]])
            except ProtocolError as err:
                log.warning("frame_dropped", peer=peer, error=err.message, num_frames=len(frames))
                continue
            return peer, message, raw

    def send(self, peer: str, message: Any, buffers: Sequence[Buffer] = ()) -> None:
        """Queue one message to `peer` without blocking; PeerUnreachable if it is not connected."""
        frames = [peer.encode(), *self._codec.encode(message, buffers)]
        # With NOBLOCK the asyncio socket sends at once and returns a finished future; it also
        # re-arms its readers (ZeroMQ's FD is edge-triggered: a send can consume the edge that
        # a waiting recv needs, so sends must go through this socket, not a shadow of it).
        sent = asyncio.ensure_future(  # the Future itself (typed as a mere Awaitable)
            self.socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        )
        err = sent.exception() if sent.done() else None
        if isinstance(err, zmq.ZMQError) and err.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
            raise PeerUnreachable(peer)
        if err is not None:
            raise err

    async def disconnected(self) -> str:
        """The route of the next connection that closes (after it has sent something)."""
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                route = self._route_of_fd.pop(int(event["value"]), None)
                if route is not None:
                    return route

    def close(self) -> None:
        self.socket.disable_monitor()
        self._monitor.close(linger=0)
        self.socket.close(linger=0)


class DealerChannel(Generic[T]):
    """Worker end: connects to the gateway with its identity. Use from one thread only."""

    def __init__(
        self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, identity: str, codec: Codec[T]
    ) -> None:
        self._codec = codec
        self.socket = ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.IDENTITY, identity.encode())
        self.socket.setsockopt(zmq.LINGER, 2000)
        self.socket.setsockopt(zmq.SNDHWM, 0)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.socket.setsockopt(zmq.RECONNECT_IVL, 100)
        self.socket.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        self.socket.connect(endpoint)

    def recv_nowait(self) -> tuple[T, list[memoryview]] | None:
        """The next well-formed message if one is waiting; malformed ones are dropped."""
        while True:
            try:
                frames = self.socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return None
            try:
                return self._codec.decode([f.buffer for f in frames])
            except ProtocolError as err:
                log.warning("frame_dropped", peer="gateway", error=err.message)

    def send_frames(self, frames: Sequence[Any]) -> None:
        """Send already-encoded frames (from `Codec.encode`) without copying."""
        self.socket.send_multipart(frames, copy=False)

    def close(self, linger_ms: int = 1000) -> None:
        self.socket.close(linger=linger_ms)
