"""The worker's data port: forged messages are dropped, and replies to many peers do not leak
file descriptors (a bounded set of peer sockets)."""

from __future__ import annotations

import os
import queue
import time

import pytest
import zmq

from mell.common.config import EngineConfig
from mell.common.messages import MigrateAck, MigrateReserve, PeerMessage
from mell.common.tiny_model import write_tiny_model
from mell.transport.codec import Codec
from mell.transport.secret import ClusterSecret, SignedCodec
from mell.workerd.engine.engine import Engine
from mell.workerd.io import MAX_PEER_SOCKETS, PeerInput, WorkerIO
from mell.workerd.migration.hub import MigrationHub
from mell.workerd.worker import _Port

SECRET = ClusterSecret(b"test-cluster-secret-0123456789")
OTHER = ClusterSecret(b"some-other-clusters-secret-42")


def _num_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _reserve(i: int) -> MigrateReserve:
    return MigrateReserve(
        migration_id=f"m{i}", stage=0, num_blocks=1, reply_to=f"tcp://127.0.0.1:{20000 + i}"
    )


def _drain(io: WorkerIO, wait_s: float) -> list[PeerInput]:
    got: list[PeerInput] = []
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            item = io.inbox.get(timeout=0.02)
        except queue.Empty:
            continue
        assert isinstance(item, PeerInput)
        got.append(item)
    return got


@pytest.fixture
def io():
    worker_io = WorkerIO("tcp://127.0.0.1:1", "w0", "tcp://127.0.0.1:0", SECRET)
    yield worker_io
    worker_io.close()


def test_forged_and_unsigned_data_port_messages_are_dropped(io: WorkerIO) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(io.data_address)
    try:
        sock.send_multipart(Codec(PeerMessage).encode(_reserve(1)))  # unsigned
        sock.send_multipart(SignedCodec(PeerMessage, OTHER).encode(_reserve(2)))  # wrong key
        frames = SignedCodec(PeerMessage, SECRET).encode(_reserve(3))
        sock.send_multipart([frames[0], Codec(PeerMessage).encode(_reserve(4))[0]])  # tampered
        sock.send_multipart([b"\x00" * 32])  # a MAC of nothing
        sock.send_multipart(SignedCodec(PeerMessage, SECRET).encode(_reserve(5)))  # the one
        got = _drain(io, 1.0)
    finally:
        sock.close()
        ctx.term()
    assert [g.message for g in got] == [_reserve(5)]


def test_reserves_with_1200_reply_addresses_keep_the_fd_count_bounded(tmp_path) -> None:
    """1,200 signed reserves, each from a different `reply_to`: the worker answers each (a
    refusal: one block each until none is left), but keeps at most MAX_PEER_SOCKETS sockets
    to peers; 1,200 unsigned ones open nothing at all."""
    tiny = write_tiny_model(tmp_path / "tiny")
    engine = Engine(EngineConfig(model=str(tiny), num_kv_blocks=64, max_model_len=256))
    io = WorkerIO("tcp://127.0.0.1:1", "w0", "tcp://127.0.0.1:0", SECRET)
    hub = MigrationHub(engine, _Port(io), "w0", io.data_address)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.connect(io.data_address)
    try:
        time.sleep(0.2)
        before = _num_fds()
        unsigned = Codec(PeerMessage)
        for i in range(1200):
            sock.send_multipart(unsigned.encode(_reserve(i)))
        assert _drain(io, 0.5) == []
        signed = SignedCodec(PeerMessage, SECRET)
        for i in range(1200):
            sock.send_multipart(signed.encode(_reserve(i)))
        handled = 0
        deadline = time.monotonic() + 30
        while handled < 1200 and time.monotonic() < deadline:
            for item in _drain(io, 0.05):
                hub.handle(item.message, item.frames, item.received_at)
                handled += 1
        assert handled == 1200
        time.sleep(0.5)  # let the I/O thread send the answers
        grown = _num_fds() - before
        assert MAX_PEER_SOCKETS <= 64 and grown <= 200, f"{grown} more file descriptors"
    finally:
        sock.close()
        ctx.term()
        io.close()


def test_replies_go_out_signed(io: WorkerIO) -> None:
    ctx = zmq.Context()
    peer = ctx.socket(zmq.ROUTER)
    peer.setsockopt(zmq.LINGER, 0)
    peer.bind("tcp://127.0.0.1:0")
    try:
        ack = MigrateAck(migration_id="m", stage=0, step="reserve", ok=True)
        io.send_peer(peer.getsockopt_string(zmq.LAST_ENDPOINT), ack)
        assert peer.poll(3000)
        frames = peer.recv_multipart()[1:]
        assert SignedCodec(PeerMessage, SECRET).decode(frames)[0] == ack
        with pytest.raises(Exception, match="forged"):
            SignedCodec(PeerMessage, OTHER).decode(frames)
    finally:
        peer.close()
        ctx.term()
