"""The gateway's worker link against a scripted worker socket: join, activation, calls,
malformed frames, unknown peers, silence."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import zmq

from mell.common.config import GatewayConfig
from mell.common.events import WorkerJoined
from mell.common.messages import (
    Drain,
    GatewayMessage,
    Heartbeat,
    Hello,
    LoadReport,
    Ping,
    Rejoin,
    Reply,
    Welcome,
    WorkerMessage,
)
from mell.common.workers import WorkerIdentity, WorkerLoad
from mell.gateway.cluster.state import ClusterState
from mell.gateway.cluster.view import ClusterView
from mell.gateway.cluster.worker_link import WorkerLink
from mell.gateway.cluster.worker_port import WorkerPort
from mell.gateway.policy.base import WorkerStatus
from mell.transport.channel import DealerChannel
from mell.transport.codec import Codec
from mell.transport.secret import ClusterSecret

HELLO = Hello(
    identity=WorkerIdentity(
        worker_id="w0",
        boot_id="boot-1",
        model="m",
        capacity_blocks=64,
        block_size=16,
        max_model_len=256,
        data_address="tcp://127.0.0.1:9",
    )
)
LOAD = LoadReport(
    load=WorkerLoad(
        num_running=0,
        num_waiting=0,
        num_total_blocks=64,
        num_free_blocks=64,
        num_preemptions_total=0,
    )
)

SECRET = ClusterSecret(b"test-cluster-secret-0123456789")


async def _recv(dealer: DealerChannel[GatewayMessage], timeout_s: float = 3.0) -> Any:
    for _ in range(int(timeout_s / 0.01)):
        if (got := dealer.recv_nowait()) is not None:
            return got[0]
        await asyncio.sleep(0.01)
    raise AssertionError("nothing received")


async def _until(predicate: Any, timeout_s: float = 3.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


async def test_worker_lifecycle_over_the_link() -> None:
    state = ClusterState(ClusterView(["m"]))
    link = WorkerLink(
        GatewayConfig(worker_timeout_s=0.6, epoch_s=0.1),
        state,
        WorkerPort("tcp://127.0.0.1:0", SECRET),
    )
    tasks = [asyncio.create_task(link.receive_forever()), asyncio.create_task(link.watch_forever())]
    ctx = zmq.Context()
    dealer: DealerChannel[GatewayMessage] = DealerChannel(
        ctx, link.endpoint, "w0", Codec(GatewayMessage)
    )
    out: Codec[WorkerMessage] = Codec(WorkerMessage)
    view = state.view
    try:
        dealer.send_frames(out.encode(Heartbeat(1)))  # unknown worker: asked to say hello
        assert await _recv(dealer) == Rejoin()
        dealer.socket.send_multipart([b"\xff\x00garbage"])  # dropped, the loop goes on
        dealer.send_frames(out.encode(HELLO.signed("w0", SECRET.sign)))
        assert isinstance(await _recv(dealer), Welcome)
        assert view.worker_rows["w0"].status == WorkerStatus.JOINING
        dealer.send_frames(out.encode(LOAD))
        await _until(lambda: view.worker_rows["w0"].status == WorkerStatus.ACTIVE)

        async def answer() -> None:
            for _ in range(2):
                message = await _recv(dealer)
                assert isinstance(message, Ping | Drain)
                dealer.send_frames(out.encode(Reply(call_id=message.call_id)))

        answering = asyncio.create_task(answer())
        assert await link.ping("w0") < 1.0
        await link.drain("w0")
        await answering
        assert view.worker_rows["w0"].status == WorkerStatus.DRAINING
        await _until(lambda: view.worker_rows["w0"].status == WorkerStatus.LOST, 3.0)
        assert "silent" in view.worker_rows["w0"].lost_reason
        dealer.send_frames(out.encode(HELLO.signed("w0", SECRET.sign)))  # it comes back: a new join
        assert isinstance(await _recv(dealer), Welcome)
        assert view.worker_rows["w0"].status == WorkerStatus.JOINING
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        dealer.close(0)
        ctx.term()
        link.close()


async def test_send_to_unknown_worker_is_reported_not_raised() -> None:
    link = WorkerLink(
        GatewayConfig(), ClusterState(ClusterView(["m"])), WorkerPort("tcp://127.0.0.1:0", SECRET)
    )
    try:
        assert link.send("ghost", Ping(call_id=1)) is False
    finally:
        link.close()


async def test_a_worker_the_port_cannot_reach_is_declared_lost_by_the_link() -> None:
    """Senders built before the link (the dispatcher, the migrator) send through the port; the
    link's watch loop declares the workers they found unreachable lost."""
    state = ClusterState(ClusterView(["m"]))
    state.record(WorkerJoined(identity=HELLO.identity), source="w0")  # never connected
    port = WorkerPort("tcp://127.0.0.1:0", SECRET)
    link = WorkerLink(GatewayConfig(worker_timeout_s=60), state, port)
    watch = asyncio.create_task(link.watch_forever())
    try:
        assert port.send("w0", Ping(call_id=1)) is False
        await _until(lambda: state.view.worker_rows["w0"].status == WorkerStatus.LOST)
        assert state.view.worker_rows["w0"].lost_reason == "unreachable"
        assert port.try_send("w0", Ping(call_id=2)) is False and port.unreachable.empty()
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        link.close()


pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")
