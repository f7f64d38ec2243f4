"""Who may join the worker plane: a signed hello, one live process per worker id, restarts.

Real sockets on loopback: the gateway's link and port against scripted worker DEALERs, each
with a route of its own as a worker process has (worker id / random suffix).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import zmq

from mell.common.config import GatewayConfig
from mell.common.messages import (
    GatewayMessage,
    Hello,
    Ping,
    Refused,
    Reply,
    Welcome,
    WorkerMessage,
)
from mell.common.workers import WorkerIdentity
from mell.gateway.cluster.state import ClusterState
from mell.gateway.cluster.view import ClusterView
from mell.gateway.cluster.worker_link import WorkerLink
from mell.gateway.cluster.worker_port import HELLO_MAX_AGE_S, WorkerPort
from mell.gateway.policy.base import WorkerStatus
from mell.transport.channel import DealerChannel
from mell.transport.codec import Codec
from mell.transport.secret import ClusterSecret

SECRET = ClusterSecret(b"test-cluster-secret-0123456789")
OUT: Codec[WorkerMessage] = Codec(WorkerMessage)


def hello(boot_id: str, worker_id: str = "w0") -> Hello:
    identity = WorkerIdentity(
        worker_id=worker_id,
        boot_id=boot_id,
        model="m",
        capacity_blocks=64,
        block_size=16,
        max_model_len=256,
        data_address="tcp://127.0.0.1:9",
    )
    return Hello(identity=identity)


class Process:
    """A scripted worker process: its own route, its socket."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, route: str) -> None:
        self.route = route
        self.dealer: DealerChannel[GatewayMessage] = DealerChannel(
            ctx, endpoint, route, Codec(GatewayMessage)
        )
        self.answering = True

    def say(self, message: WorkerMessage) -> None:
        self.dealer.send_frames(OUT.encode(message))

    async def recv(self, timeout_s: float = 3.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = self.dealer.recv_nowait()
            if got is not None:
                if isinstance(got[0], Ping) and self.answering:
                    self.say(Reply(call_id=got[0].call_id))
                    continue
                return got[0]
            await asyncio.sleep(0.01)
        return None

    def close(self) -> None:
        self.dealer.close(0)


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[WorkerLink, ClusterState]]:
    state = ClusterState(ClusterView(["m"]))
    link = WorkerLink(
        GatewayConfig(worker_timeout_s=30), state, WorkerPort("tcp://127.0.0.1:0", SECRET)
    )
    tasks = [asyncio.create_task(link.receive_forever()), asyncio.create_task(link.watch_forever())]
    yield link, state
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    link.close()


@pytest.fixture
def ctx() -> Any:
    context = zmq.Context()
    yield context
    context.term()


async def test_an_unsigned_or_wrongly_signed_hello_is_refused(gateway, ctx) -> None:
    link, state = gateway
    p = Process(ctx, link.endpoint, "w0/aaaa")
    try:
        p.say(hello("b1"))  # unsigned
        assert isinstance(await p.recv(), Refused)
        other = ClusterSecret(b"some-other-clusters-secret-42")
        p.say(hello("b1").signed(p.route, other.sign))
        refused = await p.recv()
        assert isinstance(refused, Refused) and "secret" in refused.reason
        p.say(hello("b1").signed("w0/bbbb", SECRET.sign))  # signed for another connection
        assert isinstance(await p.recv(), Refused)
        stale = msgspec.structs.replace(hello("b1"), signed_at=time.time() - HELLO_MAX_AGE_S - 5)
        p.say(msgspec.structs.replace(stale, mac=SECRET.sign(*stale.signed_parts(p.route))))
        assert isinstance(await p.recv(), Refused)
        assert "w0" not in state.view.worker_rows  # never joined
        p.say(hello("b1").signed(p.route, SECRET.sign))
        assert isinstance(await p.recv(), Welcome)
        assert state.view.worker_rows["w0"].status == WorkerStatus.JOINING
    finally:
        p.close()


async def test_a_duplicate_id_is_refused_while_its_holder_answers(gateway, ctx) -> None:
    link, state = gateway
    first = Process(ctx, link.endpoint, "w0/aaaa")
    second = Process(ctx, link.endpoint, "w0/bbbb")
    try:
        first.say(hello("b1").signed(first.route, SECRET.sign))
        assert isinstance(await first.recv(), Welcome)
        answering = asyncio.create_task(first.recv(timeout_s=3.0))  # answers the ping
        second.say(hello("b2").signed(second.route, SECRET.sign))
        refused = await second.recv()
        assert isinstance(refused, Refused) and "held by a live worker" in refused.reason
        await answering
        row = state.view.worker_rows["w0"]
        assert row.status != WorkerStatus.LOST and row.boot_id == "b1"
        assert link.port.route_of("w0") == first.route  # the holder keeps its id
    finally:
        first.close()
        second.close()


async def test_a_restart_rejoins_when_the_old_process_is_dead(gateway, ctx) -> None:
    link, state = gateway
    old = Process(ctx, link.endpoint, "w0/aaaa")
    old.say(hello("b1").signed(old.route, SECRET.sign))
    assert isinstance(await old.recv(), Welcome)
    old.close()  # its connection closes: lost at once (no 30 s silence)
    for _ in range(200):
        if state.view.worker_rows["w0"].status == WorkerStatus.LOST:
            break
        await asyncio.sleep(0.01)
    assert state.view.worker_rows["w0"].lost_reason == "connection closed"
    new = Process(ctx, link.endpoint, "w0/cccc")
    try:
        new.say(hello("b2").signed(new.route, SECRET.sign))
        assert isinstance(await new.recv(), Welcome)
        assert state.view.worker_rows["w0"].boot_id == "b2"
    finally:
        new.close()


async def test_a_restart_replaces_a_holder_that_does_not_answer(gateway, ctx) -> None:
    """The old process is hung (its connection still open): the newcomer's hello pings it,
    no answer comes within a second, the old one is lost and the newcomer joins."""
    link, state = gateway
    old = Process(ctx, link.endpoint, "w0/aaaa")
    new = Process(ctx, link.endpoint, "w0/dddd")
    try:
        old.say(hello("b1").signed(old.route, SECRET.sign))
        assert isinstance(await old.recv(), Welcome)
        old.answering = False
        new.say(hello("b2").signed(new.route, SECRET.sign))
        assert isinstance(await new.recv(timeout_s=3.0), Welcome)
        row = state.view.worker_rows["w0"]
        assert row.boot_id == "b2" and row.status == WorkerStatus.JOINING
        assert link.port.route_of("w0") == new.route
    finally:
        old.close()
        new.close()
