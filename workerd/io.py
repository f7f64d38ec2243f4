"""Socket I/O of the worker daemon, on its own thread.

The engine loop (main thread) never touches the gateway socket: it calls `send` (encodes and
hands the frames to an inproc pipe) and reads `inbox` (a queue.Queue of decoded gateway
messages). The I/O thread owns the DEALER to the gateway and the data-plane ROUTER, moving frames
between them and the queue. Frames are never copied on the way out.
"""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Sequence
from typing import Any

import structlog
import zmq

from mell.common.messages import GatewayMessage, WorkerMessage
from mell.transport.channel import DealerChannel
from mell.transport.codec import Buffer, Codec

log = structlog.get_logger("mell.workerd.io")
_STOP = b""  # an empty single frame on the pipe: flush and stop


class WorkerIO:
    """Gateway link of one worker: `send` from the engine thread, `inbox` to read."""

    def __init__(self, gateway: str, identity: str, data_endpoint: str) -> None:
        self.inbox: queue.Queue[GatewayMessage] = queue.Queue()
        self._ctx = zmq.Context()
        self._codec: Codec[WorkerMessage] = Codec(WorkerMessage)
        pipe = f"inproc://mell-io-{uuid.uuid4().hex}"
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.bind(pipe)
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.connect(pipe)
        self._data = self._ctx.socket(zmq.ROUTER)
        self._data.bind(data_endpoint)
        self.data_address: str = self._data.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._gateway = DealerChannel(self._ctx, gateway, identity, Codec(GatewayMessage))
        self._thread = threading.Thread(target=self._run, name="mell-io", daemon=True)
        self._thread.start()

    def send(self, message: Any, buffers: Sequence[Buffer] = ()) -> None:
        """Queue a message to the gateway. Call from the engine thread only."""
        self._push.send_multipart(self._codec.encode(message, buffers), copy=False)

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
                frames = self._data.recv_multipart()
                log.warning("data_frame_dropped", reason="no migration yet", num=len(frames))
        self._gateway.close(linger_ms=2000)
        self._pull.close(linger=0)
        self._data.close(linger=0)

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
            self._gateway.send_frames(frames)
