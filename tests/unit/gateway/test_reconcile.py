"""After a restart the worker link reconciles each worker's hello with the recovered view."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import zmq

from mell.common import events as ev
from mell.common.config import GatewayConfig
from mell.common.messages import (
    AbortRequest,
    GatewayMessage,
    Heartbeat,
    Hello,
    Rejoin,
    Welcome,
    WorkerMessage,
)
from mell.common.workers import WorkerIdentity
from mell.gateway.cluster.dispatcher import Dispatcher
from mell.gateway.cluster.metrics import Metrics
from mell.gateway.cluster.recovery import RESTART_REASON, reconcile_after_restart
from mell.gateway.cluster.state import ClusterState
from mell.gateway.cluster.view import ClusterView
from mell.gateway.cluster.worker_link import WorkerLink
from mell.gateway.cluster.worker_port import WorkerPort
from mell.gateway.policy.base import WorkerStatus, make_policy
from mell.transport.channel import DealerChannel
from mell.transport.codec import Codec
from mell.transport.secret import ClusterSecret

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")
HELLO = Hello(
    identity=WorkerIdentity(
        worker_id="w0",
        boot_id="boot-1",
        model="m",
        capacity_blocks=64,
        block_size=16,
        max_model_len=256,
        data_address="",
    ),
    request_ids=["r1", "ghost"],
)

SECRET = ClusterSecret(b"test-cluster-secret-0123456789")


def recovered_view() -> ClusterView:
    """What a previous gateway left in its journal: w0 (and w1) active, r1 on w0, r2 on w1."""
    view = ClusterView(["m"])
    history: list[tuple[str, Any]] = []
    for wid in ("w0", "w1"):
        history.append(
            (
                wid,
                ev.WorkerJoined(
                    identity=WorkerIdentity(
                        worker_id=wid,
                        boot_id="boot-1",
                        model="m",
                        capacity_blocks=64,
                        block_size=16,
                        max_model_len=256,
                        data_address="",
                    )
                ),
            )
        )
        history.append((wid, ev.WorkerActivated(worker_id=wid)))
    for rid, wid in (("r1", "w0"), ("r2", "w1")):
        history.append(("gateway", ev.RequestPlaced(request_id=rid, model="m", worker_id=wid,
                        num_prompt_tokens=20, max_tokens=8, num_blocks=2)))  # fmt: skip
    seqs: dict[str, int] = {}
    for ts, (source, event) in enumerate(history, 1):
        seqs[source] = seqs.get(source, 0) + 1
        view.apply(ev.EventEnvelope(source, seqs[source], float(ts), event))
    return view


async def _recv(dealer: DealerChannel[GatewayMessage]) -> Any:
    for _ in range(300):
        if (got := dealer.recv_nowait()) is not None:
            return got[0]
        await asyncio.sleep(0.01)
    raise AssertionError("nothing received")


async def test_hello_after_a_restart_aborts_what_no_client_reads() -> None:
    state = ClusterState(recovered_view())
    recorded: list[ev.EventEnvelope] = []
    state.add_append_hook(recorded.append)
    config = GatewayConfig(worker_timeout_s=0.5, reconcile_timeout_s=1.0)
    port = WorkerPort("tcp://127.0.0.1:0", SECRET)
    dispatcher = Dispatcher(state, make_policy("least-loaded"), port.send, Metrics(state.view), 10)
    link = WorkerLink(config, state, port, dispatcher)
    link.expect_rejoin(["w0", "w1"], config.reconcile_timeout_s)
    tasks = [asyncio.create_task(link.receive_forever()), asyncio.create_task(link.watch_forever())]
    ctx = zmq.Context()
    dealer: DealerChannel[GatewayMessage] = DealerChannel(
        ctx, link.endpoint, "w0", Codec(GatewayMessage)
    )
    out: Codec[WorkerMessage] = Codec(WorkerMessage)
    try:
        dealer.send_frames(out.encode(Heartbeat(7)))  # known from the journal, not greeted yet
        assert await _recv(dealer) == Rejoin()
        dealer.send_frames(out.encode(HELLO.signed("w0", SECRET.sign)))
        assert isinstance(await _recv(dealer), Welcome)
        abort = await _recv(dealer)
        assert isinstance(abort, AbortRequest) and sorted(abort.request_ids) == ["ghost", "r1"]
        assert "r1" not in state.view.requests
        assert state.view.worker_rows["w0"].status == WorkerStatus.ACTIVE  # same boot: no rejoin
        [aborted] = [e.event for e in recorded if isinstance(e.event, ev.RequestAborted)]
        assert aborted.request_id == "r1" and aborted.reason == RESTART_REASON
        # w1 never says hello: lost at the reconcile deadline, with its request.
        for _ in range(300):
            if state.view.worker_rows["w1"].status == WorkerStatus.LOST:
                break
            await asyncio.sleep(0.01)
        assert state.view.worker_rows["w1"].status == WorkerStatus.LOST
        assert state.view.requests == {}
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        dealer.close(0)
        ctx.term()
        link.close()


async def test_the_deadline_aborts_recovered_requests_nobody_reads() -> None:
    state = ClusterState(recovered_view())
    sent: list[tuple[str, Any]] = []
    dead = await reconcile_after_restart(
        state, {"r2": object()}, lambda w, m: sent.append((w, m)), 0.01, ["r1", "r2"]
    )
    assert dead == ["r1"] and sent == [("w0", AbortRequest(["r1"]))]
    assert list(state.view.requests) == ["r2"]
