"""Migration boundaries: prefill speed from a real engine, bandwidth probes over real ZeroMQ
data planes, and the gateway's adaptive choice using them instead of profile constants."""

from __future__ import annotations

import queue
import time
from typing import Any

import pytest

from mell.common.config import EngineConfig
from mell.common.messages import BoundariesReport, PeerAddress, Probe, ProbeAck
from mell.common.tiny_model import write_tiny_model
from mell.gateway.cluster.migrator import Migrator
from mell.gateway.cluster.state import ClusterState
from mell.gateway.cluster.view import ClusterView
from mell.gateway.policy.base import Move
from mell.gateway.policy.migration_choice import choose_transfers
from mell.transport.secret import ClusterSecret
from mell.workerd.engine.engine import Engine
from mell.workerd.io import PeerInput, WorkerIO
from mell.workerd.migration.boundaries import (
    Boundaries,
    kv_bytes_per_token,
    measure_prefill_tokens_per_s,
)


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    tiny = write_tiny_model(tmp_path_factory.mktemp("tiny"))
    return Engine(EngineConfig(model=str(tiny), max_model_len=512, num_kv_blocks=64))


def test_prefill_speed_and_kv_bytes_from_the_engine(engine: Engine) -> None:
    tps = measure_prefill_tokens_per_s(engine, 128)
    assert tps > 100
    assert not engine.has_unfinished() and engine.blocks.num_free() == 64
    cfg = engine.model_config
    assert kv_bytes_per_token(engine) == 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4


class _Port:
    def __init__(self, io: WorkerIO) -> None:
        self.io, self.gateway = io, []

    def to_peer(self, address: str, message: Any, buffers: Any = None) -> None:
        self.io.send_peer(address, message, buffers or ())

    def to_gateway(self, message: Any) -> None:
        self.gateway.append(message)


def _answer_probes(ios: list[WorkerIO], bs: list[Boundaries], done: Any) -> None:
    """Each worker's engine loop, reduced to its probe handling."""
    deadline = time.monotonic() + 10
    while not done():
        assert time.monotonic() < deadline, "timed out"
        for io, b in zip(ios, bs, strict=True):
            try:
                item = io.inbox.get(timeout=0.01)
            except queue.Empty:
                continue
            if isinstance(item, PeerInput) and isinstance(item.message, Probe):
                b.on_probe(item.message)
            elif isinstance(item, PeerInput) and isinstance(item.message, ProbeAck):
                b.on_ack(item.message)


def test_bandwidth_probe_between_two_data_planes() -> None:
    secret = ClusterSecret(b"test-cluster-secret-0123456789")
    ios = [WorkerIO("tcp://127.0.0.1:1", f"p{i}", "tcp://127.0.0.1:0", secret) for i in range(2)]
    try:
        ports = [_Port(io) for io in ios]
        bs = [
            Boundaries(p, io.data_address, 1000.0, 1024) for p, io in zip(ports, ios, strict=True)
        ]
        peers = [PeerAddress(f"p{i}", io.data_address) for i, io in enumerate(ios)]
        bs[0].measure(peers, time.monotonic())
        _answer_probes(ios, bs, lambda: bool(ports[0].gateway))
        [report] = ports[0].gateway
        assert isinstance(report, BoundariesReport)
        assert report.prefill_tokens_per_s == 1000.0 and report.kv_bytes_per_token == 1024
        assert report.peer_bytes_per_s["p1"] > 1e6  # loopback moves MB/s at the very least
        assert "p0" not in report.peer_bytes_per_s  # not itself
    finally:
        for io in ios:
            io.close(timeout_s=1)


def test_adaptive_choice_uses_the_measured_boundaries() -> None:
    migrator = Migrator(ClusterState(ClusterView(["m"])), None, None, None, epoch_s=1.0)
    moves = [Move("r", "a", "b", "auto")]
    tokens = {"r": 1000}
    # Before any report: profile constants (a fast link: KV transfer).
    assert choose_transfers(moves, tokens, migrator.transfer_model()).kv
    # a measured a slow link to b, b re-prefills fast: token transfer.
    migrator.on_message(
        "a", BoundariesReport(prefill_tokens_per_s=1e5, peer_bytes_per_s={"b": 1e5},
                              kv_bytes_per_token=4096)
    )  # fmt: skip
    migrator.on_message("b", BoundariesReport(prefill_tokens_per_s=1e6, kv_bytes_per_token=4096))
    model = migrator.transfer_model()
    assert model.kv_bytes_per_token == 4096 and model.prefill_tps("b") == 1e6
    assert model.kv_seconds("a", "b", 1000) == pytest.approx(0.001 + 1000 * 4096 / 1e5)
    assert choose_transfers(moves, tokens, model).tokens
    # A fast link again: KV transfer.
    migrator.on_message(
        "a", BoundariesReport(prefill_tokens_per_s=1e5, peer_bytes_per_s={"b": 1e11},
                              kv_bytes_per_token=4096)
    )  # fmt: skip
    assert choose_transfers(moves, tokens, migrator.transfer_model()).kv
