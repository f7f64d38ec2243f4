"""Socket I/O of the worker daemon, on its own thread.

The engine loop (main thread) never touches a socket: it calls `send` (to the gateway) or
`send_peer` (to another worker's data plane), which encode and hand the frames to an inproc pipe,
and reads `inbox` (a queue.Queue of decoded gateway messages and `PeerInput`s). A peer message
that `take_on_io_thread` accepts (KV blocks, written into the cache as they arrive) is handled
there and not queued; everything after it on the same socket is queued after it is done.
The I/O thread owns the DEALER to the gateway, the data-plane ROUTER (peers connect to it) and
DEALERs to the peers it sends to (connected on first use, at most `MAX_PEER_SOCKETS`: the
least recently used is closed past that). Frames are never copied on the way out; received KV
frames are handed on as views of ZeroMQ's buffers.

Its connection to the gateway has a route of its own, the worker id and a random suffix (new
for every process), which its hello signs (`sign`). Data-port messages are signed with the
cluster secret both ways (`SignedCodec`): a forged or unsigned one is dropped on arrival.
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog
import zmq

from mell.common.errors import ProtocolError
from mell.common.messages import GatewayMessage, Hello, PeerMessage, WorkerMessage
from mell.transport.channel import DealerChannel
from mell.transport.codec import Buffer, Codec
from mell.transport.secret import ClusterSecret, SignedCodec

log = structlog.get_logger("mell.workerd.io")
_STOP = b""  # an empty single frame on the pipe: flush and stop
_GATEWAY = b"g"  # route frame: to the gateway; b"p" + address: to a peer's data plane
MAX_PEER_SOCKETS = 64  # peers' data planes connected at once


@dataclass(frozen=True, slots=True)
class PeerInput:
    """A message from another worker's data plane, with its raw frames (KV blocks)."""

    message: PeerMessage
    frames: list[memoryview]
    received_at: float = 0.0  # time.monotonic() when the I/O thread took it off the socket


class WorkerIO:
    """Gateway link of one worker: `send` from the engine thread, `inbox` to read."""

    def __init__(
        self, gateway: str, worker_id: str, data_endpoint: str, secret: ClusterSecret
    ) -> None:
        self.inbox: queue.Queue[GatewayMessage | PeerInput] = queue.Queue()
        # (message, frames, received_at) -> handled here; set before peers send anything
        self.take_on_io_thread: Callable[[PeerMessage, list[memoryview], float], bool] | None = None
        self._ctx = zmq.Context()
        self._codec: Codec[WorkerMessage] = Codec(WorkerMessage)
        self._peer_codec: Codec[PeerMessage] = SignedCodec(PeerMessage, secret)
        self._secret = secret
        self._peers: OrderedDict[bytes, zmq.Socket[bytes]] = OrderedDict()  # I/O thread only
        self.route = f"{worker_id}/{secrets.token_hex(8)}"
        pipe = f"inproc://mell-io-{uuid.uuid4().hex}"
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.bind(pipe)
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.connect(pipe)
        self._data = self._ctx.socket(zmq.ROUTER)
        self._data.setsockopt(zmq.RCVHWM, 0)
        self._data.setsockopt(zmq.LINGER, 0)
        self._data.bind(data_endpoint)
        self.data_address: str = self._data.getsockopt_string(zmq.LAST_ENDPOINT)
        self._gateway: DealerChannel[GatewayMessage] = DealerChannel(
            self._ctx, gateway, self.route, Codec(GatewayMessage)
        )
        self._thread = threading.Thread(target=self._run, name="mell-io", daemon=True)
        self._thread.start()

    def send(self, message: WorkerMessage, buffers: Sequence[Buffer] = ()) -> None:
        """Queue a message to the gateway. Call from the engine thread only."""
        self._push.send_multipart([_GATEWAY, *self._codec.encode(message, buffers)], copy=False)

    def sign(self, hello: Hello) -> Hello:
        """The hello signed for this connection, now."""
        return hello.signed(self.route, self._secret.sign)

    def send_peer(self, address: str, message: PeerMessage, buffers: Sequence[Buffer] = ()) -> None:
        """Queue a message to another worker's data plane (frames uncopied). Engine thread."""
        route = b"p" + address.encode()
        self._push.send_multipart([route, *self._peer_codec.encode(message, buffers)], copy=False)

    def close(self, timeout_s: float = 3.0) -> None:
        """Flush what was sent so far, then stop the I/O thread."""
        self._push.send(_STOP)
        self._thread.join(timeout_s)
        self._push.close(linger=0)
        if not self._thread.is_alive():
            self._ctx.term()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._gateway.socket, zmq.POLLIN)
        poller.register(self._pull, zmq.POLLIN)
        poller.register(self._data, zmq.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self._gateway.socket in ready:
                self._receive()
            if self._pull in ready and not self._forward():
                break
            if self._data in ready:
                self._receive_peer()
        self._gateway.close(linger_ms=2000)
        self._pull.close(linger=0)
        self._data.close(linger=0)
        for sock in self._peers.values():
            sock.close(linger=0)

    def _receive_peer(self) -> None:
        while True:
            try:
                frames = self._data.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:  # frames[0] is the sender's ROUTER identity
                message, raw = self._peer_codec.decode([f.buffer for f in frames[1:]])
            except ProtocolError as err:
                log.warning("data_frame_dropped", error=err.message, num_frames=len(frames))
                continue
            now = time.monotonic()
            take = self.take_on_io_thread
            if take is not None and take(message, raw, now):
                continue
            self.inbox.put(PeerInput(message, raw, now))

    def _peer(self, address: bytes) -> zmq.Socket[bytes]:
        sock = self._peers.get(address)
        if sock is not None:
            self._peers.move_to_end(address)
            return sock
        if len(self._peers) >= MAX_PEER_SOCKETS:
            _, oldest = self._peers.popitem(last=False)
            oldest.close(linger=0)
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address.decode())
        self._peers[address] = sock
        return sock

    def _receive(self) -> None:
        while (item := self._gateway.recv_nowait()) is not None:
            self.inbox.put(item[0])

    def _forward(self) -> bool:
        while True:
            try:
                frames = self._pull.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return True
            if len(frames) == 1 and len(frames[0]) == 0:
                return False
            route = frames[0].bytes
            if route == _GATEWAY:
                self._gateway.send_frames(frames[1:])
                continue
            try:  # queued until connected (no HWM); a dead peer: the migration's deadline
                self._peer(route[1:]).send_multipart(frames[1:], copy=False)
            except zmq.ZMQError as err:
                log.warning("peer_send_failed", peer=route[1:].decode(), error=str(err))
