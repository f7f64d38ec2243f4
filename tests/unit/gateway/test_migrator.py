"""The gateway's migrator: the first word decides, the stream follows, contradictions are undone."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mell.common import events as ev
from mell.common.errors import InvalidRequest, NotFound
from mell.common.messages import (
    AbortRequest,
    CancelMigration,
    MigratedIn,
    MigrationEnded,
    StartMigration,
    TokenBatch,
    TokenOutput,
)
from mell.common.workers import WorkerIdentity
from mell.gateway.cluster.dispatcher import Dispatcher
from mell.gateway.cluster.metrics import Metrics
from mell.gateway.cluster.migrator import Migrator
from mell.gateway.cluster.state import ClusterState
from mell.gateway.cluster.stream import RequestStream
from mell.gateway.cluster.view import ClusterView, RequestState
from mell.gateway.policy.base import Move, make_policy
from mell.transport.rpc import CallTimeout


class FakeLink:
    """Records what the migrator sends; `call` answers at once (or never)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []
        self.answer = True

    def send_quietly(self, worker_id: str, message: Any) -> None:
        self.sent.append((worker_id, message))

    def send(self, worker_id: str, message: Any) -> bool:
        self.sent.append((worker_id, message))
        return True

    async def call(self, worker_id: str, make: Any, timeout_s: float) -> None:
        self.sent.append((worker_id, make(7)))
        if not self.answer:
            raise CallTimeout("no reply")

    def of(self, kind: type) -> list[tuple[str, Any]]:
        return [(w, m) for w, m in self.sent if isinstance(m, kind)]


def world(timeout_s: float = 5.0) -> tuple[Migrator, Dispatcher, FakeLink, RequestStream]:
    state = ClusterState(ClusterView(["m"]))
    for wid in ("w0", "w1"):
        state.record(
            ev.WorkerJoined(
                identity=WorkerIdentity(
                    worker_id=wid,
                    boot_id="b",
                    model="m",
                    capacity_blocks=10,
                    block_size=16,
                    max_model_len=256,
                    data_address=f"tcp://{wid}",
                )
            ),
            source=wid,
        )
        state.record(ev.WorkerActivated(worker_id=wid), source=wid)
    state.record(
        ev.RequestPlaced(
            request_id="r",
            model="m",
            worker_id="w0",
            num_prompt_tokens=4,
            max_tokens=8,
            num_blocks=1,
        )
    )
    state.record(ev.RequestAdmitted(request_id="r", worker_id="w0"))
    link = FakeLink()
    metrics = Metrics(state.view)
    dispatcher = Dispatcher(state, make_policy("least-loaded"), link.send, metrics, 8)
    stream = RequestStream("r", "m", "w0", 4, 8, 0.0)
    dispatcher.streams["r"] = stream
    migrator = Migrator(state, link, dispatcher, metrics, timeout_s=timeout_s)
    return migrator, dispatcher, link, stream


def out(first: int, tokens: list[int], finish: str | None = None) -> TokenBatch:
    return TokenBatch(1, [TokenOutput("r", first, tokens, None, finish, 4)])


async def started(migrator: Migrator, kind: str = "kv") -> tuple[asyncio.Task[Any], str]:
    task = asyncio.create_task(migrator.migrate(Move("r", "w0", "w1", kind)))
    await asyncio.sleep(0)
    [m] = migrator.active.values()
    return task, m.migration_id


async def test_commit_by_destination_moves_the_stream_and_fills_gaps() -> None:
    migrator, dispatcher, link, stream = world()
    dispatcher.on_token_batch("w0", out(0, [10, 11]))
    task, mid = await started(migrator)
    [(src, start)] = link.of(StartMigration)
    assert src == "w0" and start.dst_address == "tcp://w1" and start.call_id == 7
    assert migrator.state.view.requests["r"].state == RequestState.MIGRATING
    # The destination's word first; the source's last token (index 2) is still on its way.
    migrator.on_message(
        "w1",
        MigratedIn(
            migration_id=mid,
            request_id="r",
            src_worker_id="w0",
            output_token_ids=[10, 11, 12],
            num_prompt_tokens=4,
        ),
    )
    assert stream.worker_id == "w1" and stream.next_index == 3
    dispatcher.on_token_batch("w0", out(2, [12]))  # late duplicate from the source: dropped
    dispatcher.on_token_batch("w1", out(3, [13]))
    assert stream.next_index == 4 and not link.of(AbortRequest)
    migrator.on_message("w0", MigrationEnded(migration_id=mid, request_id="r", committed=True))
    outcome = await task
    assert outcome.committed and outcome.kind == "kv"
    view = migrator.state.view
    assert view.requests["r"].worker_id == "w1" and "r" in view.worker_rows["w1"].request_blocks
    assert view.totals.num_migrations["kv"] == 1
    assert not migrator.active and not migrator.by_request


async def test_source_abort_first_then_destination_commit_is_undone() -> None:
    migrator, _, link, stream = world()
    task, mid = await started(migrator, "tokens")
    migrator.on_message(
        "w0",
        MigrationEnded(
            migration_id=mid, request_id="r", committed=False, reason="request finished"
        ),
    )
    outcome = await task
    assert not outcome.committed and outcome.reason == "request finished"
    migrator.on_message(
        "w1",
        MigratedIn(
            migration_id=mid,
            request_id="r",
            src_worker_id="w0",
            output_token_ids=[1],
            num_prompt_tokens=4,
        ),
    )
    assert link.of(AbortRequest) == [("w1", AbortRequest(["r"]))]
    assert stream.worker_id == "w0"
    assert migrator.state.view.totals.num_migrations_aborted == 1


async def test_source_resuming_after_commit_is_aborted_there() -> None:
    migrator, _, link, stream = world()
    task, mid = await started(migrator)
    migrator.on_message(
        "w1",
        MigratedIn(
            migration_id=mid,
            request_id="r",
            src_worker_id="w0",
            output_token_ids=[],
            num_prompt_tokens=4,
        ),
    )
    migrator.on_message(
        "w0", MigrationEnded(migration_id=mid, request_id="r", committed=False, reason="no answer")
    )
    assert (await task).committed
    assert link.of(AbortRequest) == [("w0", AbortRequest(["r"]))]
    assert stream.worker_id == "w1"


async def test_destination_lost_cancels_at_the_source() -> None:
    migrator, dispatcher, link, stream = world()
    task, mid = await started(migrator)
    migrator.on_worker_lost("w1")  # the link tells the migrator first, then the dispatcher
    dispatcher.on_worker_lost("w1", "silent")
    assert link.of(CancelMigration) == [("w0", CancelMigration(mid))]
    outcome = await task
    assert not outcome.committed and "lost" in outcome.reason
    assert stream.error is None and stream.worker_id == "w0"


async def test_no_outcome_in_time_aborts_and_cancels() -> None:
    migrator, _, link, _ = world(timeout_s=0.05)
    outcome = await migrator.migrate(Move("r", "w0", "w1", "kv"))
    assert not outcome.committed and outcome.reason == "no outcome in time"
    assert len(link.of(CancelMigration)) == 1
    assert not migrator.by_request


async def test_refused_moves_say_why() -> None:
    migrator, _, link, _ = world()
    with pytest.raises(NotFound):
        await migrator.migrate(Move("nope", "w0", "w1", "kv"))
    with pytest.raises(InvalidRequest, match="runs on w0"):
        await migrator.migrate(Move("r", "w1", "w0", "kv"))
    with pytest.raises(NotFound, match="no active worker"):
        await migrator.migrate(Move("r", "w0", "w9", "kv"))
    with pytest.raises(InvalidRequest, match="kind"):
        await migrator.migrate(Move("r", "w0", "w1", "teleport"))
    link.answer = False
    outcome = await migrator.migrate(Move("r", "w0", "w1", "auto"))
    assert not outcome.committed and outcome.kind in ("kv", "tokens")


async def test_source_word_overtaking_the_destinations_keeps_the_destination_copy() -> None:
    migrator, dispatcher, link, stream = world()
    task, mid = await started(migrator)
    migrator.on_message("w0", MigrationEnded(migration_id=mid, request_id="r", committed=True))
    assert (await task).committed and stream.worker_id == "w1"
    migrator.on_message(
        "w1",
        MigratedIn(migration_id=mid, request_id="r", src_worker_id="w0",
                   output_token_ids=[5], num_prompt_tokens=4),
    )  # fmt: skip
    assert not link.of(AbortRequest)
    assert stream.next_index == 1
    dispatcher.on_token_batch("w1", out(1, [6], "length"))
    assert stream.finish_reason == "length"
