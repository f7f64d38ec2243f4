"""Mechanism of moving a running request between workers; it executes moves, never decides.

`migrate(move)` turns a policy's (or an operator's) `Move` into `StartMigration` to the source
and waits, with a timeout, for the outcome; a per-worker limit bounds migrations in flight (as
source or destination). The outcome is decided by the first word that reaches the gateway:

- `MigratedIn` from the destination (it committed; sent before any of its tokens) or
  `MigrationEnded(committed)` from the source: `MigrationCommitted` is recorded and the request's
  stream follows it to the destination (`Dispatcher.migrated`);
- `MigrationEnded(aborted)`, no answer in time, or a worker lost: `MigrationAborted`.

A late word that contradicts the decision is answered so that one copy survives: a destination
committing after the gateway recorded an abort has its copy aborted, a source resuming after the
gateway recorded a commit has its copy aborted. Tokens are numbered, so the stream delivers every
index once whichever copy sent it.

Collaborators come through the constructor: the worker port (an `Outbox`) it sends through,
the request streams (`StreamRoutes`, the dispatcher) that follow a committed move, and the
metrics it counts migrations in. The link hands it the workers' words (`on_message`).

"auto" moves get their kind from the adaptive choice (`migration_choice.choose_transfers`) over
the boundaries the workers measured (`BoundariesReport`), or profile constants until they have.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import msgspec
import structlog

from mell.common.errors import InvalidRequest, MellError, NoCapacity, NotFound
from mell.common.events import MigrationAborted, MigrationCommitted, MigrationStarted
from mell.common.ids import new_boot_id
from mell.common.messages import (
    AbortRequest,
    BoundariesReport,
    CancelMigration,
    MigratedIn,
    MigrationEnded,
    StartMigration,
)
from mell.gateway.cluster.metrics import Metrics
from mell.gateway.cluster.state import ClusterState
from mell.gateway.cluster.worker_port import Outbox
from mell.gateway.policy.base import Move, MoveKind, WorkerStatus
from mell.gateway.policy.migration_choice import TransferModel, choose_transfers
from mell.transport.rpc import CallTimeout

log = structlog.get_logger("mell.gateway")

DEFAULT_BYTES_PER_S = 1e9  # until a worker measured its links
DEFAULT_PREFILL_TPS = 5000.0
KV_BYTES_PER_TOKEN = 4096  # until known per model; only the KV/tokens ratio matters


class Decision(StrEnum):
    """What the gateway decided about a migration (once decided, never changed)."""

    UNDECIDED = ""
    COMMITTED = "committed"
    ABORTED = "aborted"


class StreamRoutes(Protocol):
    """The migrator's view of the request streams (the dispatcher)."""

    def worker_of(self, request_id: str) -> str | None: ...

    def migrated(self, request_id: str, src: str, dst: str) -> None: ...

    def fill(
        self, request_id: str, output_token_ids: list[int], num_prompt_tokens: int
    ) -> None: ...


_KINDS: dict[str, MoveKind] = {"kv": "kv", "tokens": "tokens", "auto": "auto"}


def move_kind(kind: str) -> MoveKind:
    """`kind` as a move's kind; InvalidRequest when it is none of them."""
    known = _KINDS.get(kind)
    if known is None:
        raise InvalidRequest(f"unknown migration kind {kind!r}", param="kind")
    return known


@dataclass(slots=True)
class Migration:
    migration_id: str
    request_id: str
    src: str
    dst: str
    kind: str
    done: asyncio.Future[str] = field(default_factory=lambda: _future())
    decided: Decision = Decision.UNDECIDED
    reason: str = ""
    ended: MigrationEnded | None = None  # the source's last word


@dataclass(slots=True)
class Outcome:
    migration_id: str
    committed: bool
    kind: str
    reason: str = ""
    ended: MigrationEnded | None = None  # the source's figures (stall, copy time and bytes)


class Migrator:
    def __init__(
        self,
        state: ClusterState,
        outbox: Outbox,
        streams: StreamRoutes,
        metrics: Metrics,
        *,
        max_per_worker: int = 2,
        start_timeout_s: float = 5.0,
        timeout_s: float = 60.0,
        epoch_s: float = 0.25,
    ) -> None:
        self.state, self.outbox, self.streams, self.metrics = state, outbox, streams, metrics
        self.max_per_worker = max_per_worker
        self.start_timeout_s, self.timeout_s, self.epoch_s = start_timeout_s, timeout_s, epoch_s
        self.active: dict[str, Migration] = {}
        self.by_request: dict[str, Migration] = {}
        self.boundaries: dict[str, BoundariesReport] = {}
        self._load: Counter[str] = Counter()
        self._ids = itertools.count(1)
        self._prefix = new_boot_id()[:8]

    # ------------------------------------------------------------ moves

    def busy(self, worker_id: str) -> bool:
        return self._load[worker_id] >= self.max_per_worker

    def check(self, move: Move) -> None:
        """Raise a clear error when `move` cannot start now."""
        view = self.state.view
        req = view.requests.get(move.request_id)
        if req is None:
            raise NotFound(f"no request {move.request_id!r} in flight", param="request_id")
        if req.worker_id != move.src:
            raise InvalidRequest(f"request {move.request_id!r} runs on {req.worker_id}")
        if move.request_id in self.by_request:
            raise InvalidRequest(f"request {move.request_id!r} is already migrating")
        if move.src == move.dst:
            raise InvalidRequest(f"request {move.request_id!r} already runs on {move.dst}")
        dst = view.worker_rows.get(move.dst)
        if dst is None or dst.status != WorkerStatus.ACTIVE:
            raise NotFound(f"no active worker {move.dst!r}", param="to")
        if dst.model != req.model:
            raise InvalidRequest(f"worker {move.dst!r} serves {dst.model}, not {req.model}")
        move_kind(move.kind)
        if self.busy(move.src) or self.busy(move.dst):
            raise NoCapacity(f"too many migrations in flight on {move.src} or {move.dst}")

    async def migrate(self, move: Move) -> Outcome:
        """Run one move to its end (committed or aborted); errors before it starts raise."""
        self.check(move)
        kind = self.choose_kind(move) if move.kind == "auto" else move.kind
        dst_row = self.state.view.worker_rows[move.dst]
        m = Migration(
            f"{self._prefix}-{next(self._ids)}", move.request_id, move.src, move.dst, kind
        )
        self._begin(m)
        start = StartMigration(
            call_id=0,
            migration_id=m.migration_id,
            request_id=m.request_id,
            dst_worker_id=m.dst,
            dst_address=dst_row.data_address,
            kind=kind,
        )
        try:
            await self.outbox.call(
                m.src,
                lambda call_id: msgspec_replace(start, call_id),
                self.start_timeout_s,
            )
            reason = await asyncio.wait_for(asyncio.shield(m.done), self.timeout_s)
        except (CallTimeout, TimeoutError):
            self.outbox.send_quietly(m.src, CancelMigration(m.migration_id))
            self._decide(m, Decision.ABORTED, "no outcome in time")
            reason = m.reason
        except MellError as err:  # the source refused
            self._decide(m, Decision.ABORTED, err.message)
            reason = m.reason
        return Outcome(m.migration_id, m.decided == Decision.COMMITTED, kind, reason, m.ended)

    def choose_kind(self, move: Move) -> str:
        req = self.state.view.requests.get(move.request_id)
        tokens = req.num_tokens if req is not None else 0
        plan = choose_transfers([move], {move.request_id: tokens}, self.transfer_model())
        chosen = plan.chosen
        return chosen[0].kind if chosen else "tokens"

    def transfer_model(self) -> TransferModel:
        """Links and prefill speeds as the workers measured them (profile constants before)."""
        links = {
            f"{src}>{dst}": bw
            for src, report in self.boundaries.items()
            for dst, bw in report.peer_bytes_per_s.items()
        }
        prefill = {w: r.prefill_tokens_per_s for w, r in self.boundaries.items()}

        def link_of(src: str, dst: str) -> str:
            return f"{src}>{dst}" if f"{src}>{dst}" in links else "default"

        links["default"] = DEFAULT_BYTES_PER_S
        return TransferModel(
            kv_bytes_per_token=self.kv_bytes_per_token(),
            link_of=link_of,
            link_bytes_per_s=links,
            prefill_tokens_per_s=prefill,
            default_prefill_tps=DEFAULT_PREFILL_TPS,
            epoch_s=self.epoch_s,
        )

    def kv_bytes_per_token(self) -> int:
        known = [r.kv_bytes_per_token for r in self.boundaries.values() if r.kv_bytes_per_token]
        return max(known) if known else KV_BYTES_PER_TOKEN

    # ------------------------------------------------------------ from workers

    def on_message(
        self, worker_id: str, message: MigratedIn | MigrationEnded | BoundariesReport
    ) -> None:
        match message:
            case MigratedIn():
                self._migrated_in(worker_id, message)
            case MigrationEnded():
                self._ended(worker_id, message)
            case BoundariesReport():
                self.boundaries[worker_id] = message
                log.info(
                    "boundaries_reported",
                    worker_id=worker_id,
                    prefill_tokens_per_s=round(message.prefill_tokens_per_s),
                    peers=len(message.peer_bytes_per_s),
                )

    def on_worker_lost(self, worker_id: str) -> None:
        self.boundaries.pop(worker_id, None)
        for m in list(self.active.values()):
            if m.dst == worker_id and not m.decided:
                self.outbox.send_quietly(m.src, CancelMigration(m.migration_id))
                self._decide(m, Decision.ABORTED, f"destination {worker_id} lost")
            elif m.src == worker_id:
                self._decide(m, Decision.ABORTED, f"source {worker_id} lost")
                self._finish(m)

    def _migrated_in(self, dst: str, msg: MigratedIn) -> None:
        m = self.active.get(msg.migration_id)
        reader = self.streams.worker_of(msg.request_id)
        if m is None and reader == dst:
            # Committed already on the source's word (it can overtake this one): fill in.
            self.streams.fill(msg.request_id, msg.output_token_ids, msg.num_prompt_tokens)
            return
        if m is None or m.decided == Decision.ABORTED or reader is None:
            # Nobody reads it there (aborted, or the client left): drop that copy.
            self.outbox.send_quietly(dst, AbortRequest([msg.request_id]))
            return
        if not m.decided:
            self._decide(m, Decision.COMMITTED)
        self.streams.fill(msg.request_id, msg.output_token_ids, msg.num_prompt_tokens)

    def _ended(self, src: str, msg: MigrationEnded) -> None:
        m = self.active.get(msg.migration_id)
        if m is None:
            return
        m.ended = msg
        if msg.committed:
            if not m.decided:
                self._decide(m, Decision.COMMITTED)
        elif m.decided == Decision.COMMITTED:
            # The source gave up waiting for the commit's answer and resumed, but the
            # destination committed: the destination's copy is the one the stream follows.
            self.outbox.send_quietly(src, AbortRequest([msg.request_id]))
        elif not m.decided:
            self._decide(m, Decision.ABORTED, msg.reason)
        self._finish(m)

    # ------------------------------------------------------------ bookkeeping

    def _begin(self, m: Migration) -> None:
        self.active[m.migration_id] = m
        self.by_request[m.request_id] = m
        self._load[m.src] += 1
        self._load[m.dst] += 1
        fields = _fields(m)
        self.state.record(MigrationStarted(**fields))
        log.info("migration_started", **fields)

    def _decide(self, m: Migration, outcome: Decision, reason: str = "") -> None:
        if m.decided:
            return
        m.decided, m.reason = outcome, reason
        fields = _fields(m)
        if outcome == Decision.COMMITTED:
            self.streams.migrated(m.request_id, m.src, m.dst)
            self.state.record(MigrationCommitted(**fields))
            self.metrics.migrations.labels(m.kind).inc()
        else:
            self.state.record(MigrationAborted(**fields, reason=reason))
        log.info("migration_" + outcome.value, **fields, reason=reason or None)
        if outcome == Decision.ABORTED:
            self._finish(m)

    def _finish(self, m: Migration) -> None:
        """Forget a migration once decided and its source had its last word (or is gone)."""
        if self.active.pop(m.migration_id, None) is None:
            return
        if self.by_request.get(m.request_id) is m:
            del self.by_request[m.request_id]
        for worker in (m.src, m.dst):
            self._load[worker] -= 1
            if self._load[worker] <= 0:
                del self._load[worker]
        if not m.done.done():
            m.done.set_result(m.reason)


def _fields(m: Migration) -> dict[str, str]:
    """What every migration event and log line names: the migration, its request and move."""
    return {
        "migration_id": m.migration_id,
        "request_id": m.request_id,
        "src": m.src,
        "dst": m.dst,
        "kind": m.kind,
    }


def msgspec_replace(start: StartMigration, call_id: int) -> StartMigration:
    return msgspec.structs.replace(start, call_id=call_id)


def _future() -> asyncio.Future[str]:
    return asyncio.get_running_loop().create_future()
