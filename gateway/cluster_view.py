"""The cluster view: workers, model pools and requests, as a fold of cluster events.

`ClusterView.apply(envelope)` is the only code that changes it; folding the same envelopes
gives the same view. It implements the policies' `PolicyView` (contract C), and `/metrics`
and the admin API read it. Liveness timing is not here: the worker link decides when a worker
is lost and records `WorkerLost`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import assert_never

from mell.common.events import (
    EventEnvelope,
    LoadReported,
    MigrationAborted,
    MigrationCommitted,
    MigrationStarted,
    RequestAborted,
    RequestAdmitted,
    RequestFinished,
    RequestPlaced,
    WorkerActivated,
    WorkerDrained,
    WorkerDrainStarted,
    WorkerJoined,
    WorkerLost,
    WorkerUndrained,
)
from mell.gateway.policy.base import WorkerInfo, WorkerStatus


class RequestState(StrEnum):
    PLACED = "placed"  # sent to its worker, no token yet
    RUNNING = "running"  # tokens are flowing
    MIGRATING = "migrating"


@dataclass(slots=True)
class WorkerRow:
    worker_id: str
    boot_id: str
    model: str
    status: WorkerStatus
    capacity_blocks: int
    block_size: int
    max_model_len: int
    data_address: str
    joined_at: float
    num_free_blocks: int
    num_running: int = 0
    num_waiting: int = 0
    num_preemptions_total: int = 0
    lost_reason: str = ""
    request_blocks: dict[str, int] = field(default_factory=dict)

    @property
    def num_used_blocks(self) -> int:
        return self.capacity_blocks - self.num_free_blocks

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.worker_id,
            model=self.model,
            status=self.status,
            capacity_blocks=self.capacity_blocks,
            block_size=self.block_size,
            request_blocks=MappingProxyType(self.request_blocks),
            num_free_blocks=self.capacity_blocks - sum(self.request_blocks.values()),
        )


@dataclass(slots=True)
class RequestRow:
    request_id: str
    model: str
    worker_id: str
    state: RequestState
    num_prompt_tokens: int
    max_tokens: int
    num_blocks: int
    num_tokens: int  # prompt + generated so far, as last reported
    placed_at: float


@dataclass(slots=True)
class Totals:
    num_finished: int = 0
    num_aborted: int = 0
    num_migrations: dict[str, int] = field(default_factory=lambda: {"kv": 0, "tokens": 0})
    num_migrations_aborted: int = 0


class ClusterView:
    """Workers by id, requests by id, the configured models; a PolicyView."""

    def __init__(self, models: Sequence[str] = ()) -> None:
        self.model_names: list[str] = list(models)
        self.worker_rows: dict[str, WorkerRow] = {}
        self.requests: dict[str, RequestRow] = {}
        self.totals = Totals()
        self.last_seq: dict[str, int] = {}

    # ------------------------------------------------------------ PolicyView

    def models(self) -> Sequence[str]:
        return self.model_names

    def workers(self, model: str) -> Sequence[WorkerInfo]:
        return [
            w.info()
            for w in self.worker_rows.values()
            if w.model == model and w.status != WorkerStatus.LOST
        ]

    # ------------------------------------------------------------ queries

    def live_workers(self, model: str | None = None) -> list[WorkerRow]:
        return [
            w
            for w in self.worker_rows.values()
            if w.status == WorkerStatus.ACTIVE and (model is None or w.model == model)
        ]

    def requests_on(self, worker_id: str) -> list[str]:
        row = self.worker_rows.get(worker_id)
        return list(row.request_blocks) if row else []

    # ------------------------------------------------------------ the fold

    def apply(self, envelope: EventEnvelope) -> None:
        """Fold one event into the view. The only mutator."""
        self.last_seq[envelope.source] = envelope.seq
        event = envelope.event
        match event:
            case WorkerJoined():
                self._joined(event, envelope.ts)
            case WorkerActivated(worker_id=wid):
                self._set_status(wid, WorkerStatus.ACTIVE)
            case LoadReported():
                self._load(event)
            case WorkerDrainStarted(worker_id=wid):
                self._set_status(wid, WorkerStatus.DRAINING)
            case WorkerUndrained(worker_id=wid):
                self._set_status(wid, WorkerStatus.ACTIVE)
            case WorkerDrained(worker_id=wid, exiting=exiting):
                self._drained(wid, exiting)
            case WorkerLost(worker_id=wid, reason=reason):
                self._lost(wid, reason)
            case RequestPlaced():
                self._placed(event, envelope.ts)
            case RequestAdmitted(request_id=rid):
                if (row := self.requests.get(rid)) is not None:
                    row.state = RequestState.RUNNING
            case RequestFinished(request_id=rid):
                self.totals.num_finished += 1
                self._forget(rid)
            case RequestAborted(request_id=rid):
                self.totals.num_aborted += 1
                self._forget(rid)
            case MigrationStarted(request_id=rid):
                if (row := self.requests.get(rid)) is not None:
                    row.state = RequestState.MIGRATING
            case MigrationCommitted():
                self._migrated(event)
            case MigrationAborted(request_id=rid):
                self.totals.num_migrations_aborted += 1
                if (row := self.requests.get(rid)) is not None:
                    row.state = RequestState.RUNNING
            case _:
                assert_never(event)

    def _joined(self, e: WorkerJoined, ts: float) -> None:
        self.worker_rows[e.worker_id] = WorkerRow(
            worker_id=e.worker_id,
            boot_id=e.boot_id,
            model=e.model,
            status=WorkerStatus.JOINING,
            capacity_blocks=e.capacity_blocks,
            block_size=e.block_size,
            max_model_len=e.max_model_len,
            data_address=e.data_address,
            joined_at=ts,
            num_free_blocks=e.capacity_blocks,
        )
        if e.model not in self.model_names:
            self.model_names.append(e.model)

    def _set_status(self, worker_id: str, status: WorkerStatus) -> None:
        row = self.worker_rows.get(worker_id)
        if row is not None and row.status != WorkerStatus.LOST:
            row.status = status

    def _load(self, e: LoadReported) -> None:
        row = self.worker_rows.get(e.worker_id)
        if row is None:
            return
        row.num_running, row.num_waiting = e.num_running, e.num_waiting
        row.capacity_blocks, row.num_free_blocks = e.num_total_blocks, e.num_free_blocks
        row.num_preemptions_total = e.num_preemptions_total
        for load in e.requests:
            req = self.requests.get(load.request_id)
            if req is not None and req.worker_id == e.worker_id:
                req.num_blocks, req.num_tokens = load.num_blocks, load.num_tokens
                row.request_blocks[load.request_id] = load.num_blocks

    def _drained(self, worker_id: str, exiting: bool) -> None:
        if exiting:
            row = self.worker_rows.pop(worker_id, None)
            for rid in list(row.request_blocks) if row else []:
                self.requests.pop(rid, None)

    def _lost(self, worker_id: str, reason: str) -> None:
        row = self.worker_rows.get(worker_id)
        if row is None:
            return
        row.status, row.lost_reason = WorkerStatus.LOST, reason
        row.num_running = row.num_waiting = 0
        row.num_free_blocks = row.capacity_blocks
        for rid in row.request_blocks:
            self.requests.pop(rid, None)
        row.request_blocks.clear()

    def _placed(self, e: RequestPlaced, ts: float) -> None:
        self.requests[e.request_id] = RequestRow(
            request_id=e.request_id,
            model=e.model,
            worker_id=e.worker_id,
            state=RequestState.PLACED,
            num_prompt_tokens=e.num_prompt_tokens,
            max_tokens=e.max_tokens,
            num_blocks=e.num_blocks,
            num_tokens=e.num_prompt_tokens,
            placed_at=ts,
        )
        row = self.worker_rows.get(e.worker_id)
        if row is not None:
            row.request_blocks[e.request_id] = e.num_blocks

    def _forget(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None and (row := self.worker_rows.get(req.worker_id)) is not None:
            row.request_blocks.pop(request_id, None)

    def _migrated(self, e: MigrationCommitted) -> None:
        self.totals.num_migrations[e.kind] = self.totals.num_migrations.get(e.kind, 0) + 1
        req = self.requests.get(e.request_id)
        if req is None:
            return
        if (src := self.worker_rows.get(e.src)) is not None:
            src.request_blocks.pop(e.request_id, None)
        if (dst := self.worker_rows.get(e.dst)) is not None:
            dst.request_blocks[e.request_id] = req.num_blocks
        req.worker_id, req.state = e.dst, RequestState.RUNNING
