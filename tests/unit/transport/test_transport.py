"""Codecs, channels and call correlation: round trips, uncopied frames, malformed frames."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import zmq
import zmq.asyncio

from mell.common.errors import ProtocolError
from mell.common.messages import (
    FrameRef,
    GatewayMessage,
    Heartbeat,
    Ping,
    TokenBatch,
    TokenOutput,
    WorkerMessage,
)
from mell.transport.channel import DealerChannel, PeerUnreachable, RouterChannel
from mell.transport.codec import Codec
from mell.transport.rpc import CallTimeout, PendingCalls


def test_codec_round_trip_with_raw_frames_uncopied() -> None:
    codec: Codec[WorkerMessage] = Codec(WorkerMessage)
    tensor = np.arange(12, dtype=np.float32).reshape(3, 4)
    frames = codec.encode(Heartbeat(7), [memoryview(tensor).cast("B")])
    assert frames[1].obj is tensor  # the buffer itself, not a copy
    message, raw = codec.decode(frames)
    assert message == Heartbeat(7)
    back = np.frombuffer(raw[0], dtype=np.float32).reshape(3, 4)
    assert np.array_equal(back, tensor)


@pytest.mark.parametrize("body", [b"", b"\xc1", b"\x92\xa3xyz\x01", b"\x92\xa2hb\xa1x"])
def test_codec_rejects_malformed_bodies(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        Codec(WorkerMessage).decode([body])


def test_codec_rejects_message_of_the_other_direction() -> None:
    frames = Codec(GatewayMessage).encode(Ping(call_id=1))
    with pytest.raises(ProtocolError):
        Codec(WorkerMessage).decode(frames)


def test_frame_ref_in_message_round_trips() -> None:
    ref = FrameRef(0, "<f2", [2, 16])
    codec: Codec[FrameRef] = Codec(FrameRef)
    assert codec.decode(codec.encode(ref))[0] == ref


async def test_router_drops_malformed_frames_and_keeps_receiving() -> None:
    actx = zmq.asyncio.Context()
    ctx = zmq.Context()
    router: RouterChannel[WorkerMessage] = RouterChannel(
        actx, "tcp://127.0.0.1:*", Codec(WorkerMessage)
    )
    dealer: DealerChannel[GatewayMessage] = DealerChannel(
        ctx, router.endpoint, "w1", Codec(GatewayMessage)
    )
    try:
        out: Codec[WorkerMessage] = Codec(WorkerMessage)
        dealer.socket.send_multipart([b"\xff\xff garbage"])
        dealer.socket.send_multipart([b"\x92\xa5hello\x01"])
        batch = TokenBatch(1, [TokenOutput("r", 0, [5], None, None, 3)])
        dealer.send_frames(out.encode(batch))
        peer, message, _ = await asyncio.wait_for(router.recv(), 5)
        assert (peer, message) == ("w1", batch)
        router.send("w1", Ping(call_id=9))
        for _ in range(100):
            if (got := dealer.recv_nowait()) is not None:
                break
            await asyncio.sleep(0.01)
        assert got is not None and got[0] == Ping(call_id=9)
        with pytest.raises(PeerUnreachable):
            router.send("nobody", Ping(call_id=1))
    finally:
        dealer.close(0)
        router.close()
        ctx.term()
        actx.term()


async def test_pending_calls_resolve_and_time_out() -> None:
    calls = PendingCalls()
    sent: list[int] = []

    def send(call_id: int) -> None:
        sent.append(call_id)
        asyncio.get_running_loop().call_soon(calls.resolve, call_id, "ok")

    assert await calls.call(send, 1.0) == "ok"
    with pytest.raises(CallTimeout):
        await calls.call(lambda _id: None, 0.05)
    assert not calls.resolve(12345, "late")
    assert len(calls) == 0
