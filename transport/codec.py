"""MessagePack codec for one channel direction: a tagged union in, frames out.

A message is one body frame followed by zero or more raw frames (tensors, KV blocks) that are
handed to ZeroMQ without a copy; the body refers to them by index (`FrameRef`). Encoder and
decoder are built once per codec and reused for every message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import msgspec

from mell.common.errors import ProtocolError

T = TypeVar("T")

Buffer = bytes | bytearray | memoryview


class Codec(Generic[T]):
    """Encodes any message; decodes only members of `union` (anything else is a ProtocolError)."""

    def __init__(self, union: Any) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(union)

    def encode(self, message: Any, buffers: Sequence[Buffer] = ()) -> list[Buffer]:
        """The frames of one message: the body, then the raw buffers unchanged."""
        return [self._encoder.encode(message), *buffers]

    def decode(self, frames: Sequence[Buffer]) -> tuple[T, list[memoryview]]:
        """The message and its raw frames (views into the received frames, not copies)."""
        if not frames:
            raise ProtocolError("empty message")
        try:
            message = self._decoder.decode(frames[0])
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            raise ProtocolError(f"undecodable message: {err}") from None
        return message, [memoryview(f) for f in frames[1:]]
