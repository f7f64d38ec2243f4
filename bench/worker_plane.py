"""What the worker plane's protections cost: why the data ports sign message bodies (HMAC)
rather than encrypt every KV byte (ZeroMQ CURVE), and what per-token seeding costs.

    python bench/worker_plane.py

Prints one line per figure: codec encode+decode per data-port message, plain and signed;
loopback throughput of 256 MiB in 4 MiB frames, plain and CURVE; a seeded request's
per-token generator (create + seed).
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import torch
import zmq

from mell.common.messages import FrameRef, MigrateBlocks, PeerMessage
from mell.transport.codec import Codec
from mell.transport.secret import ClusterSecret, SignedCodec
from mell.workerd.engine.sequence import token_seed


def codec_us(codec: Codec[PeerMessage], n: int = 100_000) -> float:
    ref = FrameRef(0, "<f2", [16, 2, 8, 16, 128])
    msg = MigrateBlocks(migration_id="m" * 16, stage=0, layer=3, first=0, data=[ref])
    start = time.perf_counter()
    for _ in range(n):
        codec.decode(codec.encode(msg))
    return (time.perf_counter() - start) / n * 1e6


def throughput(curve: bool, total: int = 256 << 20, chunk: int = 4 << 20) -> float:
    """Bytes per second from a PUSH to a PULL over loopback TCP."""
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    if curve:
        public, secret = zmq.curve_keypair()
        pull.curve_server = True
        pull.curve_publickey, pull.curve_secretkey = public, secret
        push.curve_serverkey = public
        push.curve_publickey, push.curve_secretkey = zmq.curve_keypair()
    pull.bind("tcp://127.0.0.1:0")
    push.connect(pull.getsockopt_string(zmq.LAST_ENDPOINT))
    push.send(b"warm")
    pull.recv()  # connected (and the handshake done)
    data = np.random.bytes(chunk)
    sender = threading.Thread(
        target=lambda: [push.send(data, copy=False) for _ in range(total // chunk)]
    )
    start = time.perf_counter()
    sender.start()
    for _ in range(total // chunk):
        pull.recv(copy=False)
    elapsed = time.perf_counter() - start
    sender.join()
    pull.close(0)
    push.close(0)
    ctx.term()
    return total / elapsed


def generator_us(n: int = 20_000) -> float:
    start = time.perf_counter()
    for i in range(n):
        torch.Generator(device="cpu").manual_seed(token_seed(42, i))
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    secret = ClusterSecret(os.urandom(32))
    print(f"plain codec encode+decode: {codec_us(Codec(PeerMessage)):.2f} us/message")
    print(
        f"signed codec encode+decode: {codec_us(SignedCodec(PeerMessage, secret)):.2f} us/message"
    )
    for curve in (False, True):
        rate = max(throughput(curve) for _ in range(2))
        kind = "CURVE" if curve else "plain"
        print(f"loopback 256 MiB in 4 MiB frames, {kind}: {rate / 1e9:.2f} GB/s")
    print(f"per-token generator (create + seed): {generator_us():.2f} us")


if __name__ == "__main__":
    main()
