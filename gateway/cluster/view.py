"""The cluster view: workers, model pools, requests and migrations, as a fold of cluster events.

`ClusterView.apply(envelope)` is the only code that changes the fold. Beside it the view keeps
one piece of soft state, each worker's newest prefix cache summary, which changes through one
other door, `note_prefixes` (the worker link calls it with each load report; see
`prefix_summaries.py`): a hint for placement, not journaled, not in snapshots. The fold is a
function of the *set* of envelopes, not of the order in which different sources' envelopes
arrive:

- an envelope whose seq is not above the last one folded from its source is skipped, so
  replaying a duplicated suffix of the history changes nothing;
- every value written by more than one source is a last-writer-wins register stamped with
  (ts, source, seq) of the envelope that wrote it (the gateway's `ClusterState` keeps ts
  strictly increasing), so any interleaving that keeps each source's own order folds to the
  same view. A worker's status is one such register (its own joins, activations and drains;
  the gateway's undrains and losses); a request's size is another (the placement's estimate,
  then the newest load report that lists it, from any worker);
- facts that arrive before what they are about are kept until it arrives: a placement before
  its worker's join, a load report before the placement of a request it lists, a loss before
  the join it ends;
- a request is live while it has not ended (finished or aborted) and it came to its worker
  (placement or migration commit) after the worker's last loss or exit. A request gone with its
  worker is kept as a tombstone, so a commit stamped before the exit but folded after it still
  moves it away, whatever the order.

Derived state (a worker row's load and `request_blocks`; `requests` and `migrations`, the live
subsets) is recomputed from the registers. A worker's row keeps its newest `WorkerLoad` whole
(the stats its engine measured, `mell.common.workers`): `/metrics` reads it through one table
(`view_metrics.py`), the admin API through the row. The view implements the policies' `PolicyView`
(the policy contract, `policy/base.py`); placement, the dispatcher, `/metrics` and the admin API
read it. Liveness timing is not here: the worker link decides when a worker is lost and records
`WorkerLost`.
`snapshot()` / `from_snapshot()` give the journal a compact image of the fold (registers and
tombstones included) so that snapshot + tail folds like the whole history. Loads of requests it
does not hold, and tombstones, are forgotten past a horizon (`_HORIZON_S`): only an event folded
that much later than its peers can depend on the order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import assert_never

import msgspec

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
    RequestResumed,
    WorkerActivated,
    WorkerDrained,
    WorkerDrainStarted,
    WorkerJoined,
    WorkerLost,
    WorkerUndrained,
)
from mell.common.workers import CachedPrefixes, WorkerIdentity, WorkerLoad
from mell.gateway.cluster.prefix_summaries import PrefixSummaries
from mell.gateway.policy.base import PrefixHit, WorkerInfo, WorkerStatus

Stamp = tuple[float, str, int]  # (ts, source, seq) of an envelope: a total order of the history
NEVER: Stamp = (float("-inf"), "", 0)
_HORIZON_S = 60.0  # loads of requests the view does not hold, and tombstones, are kept this long


class RequestState(StrEnum):
    PLACED = "placed"  # sent to its worker, no token yet
    RUNNING = "running"  # tokens are flowing
    MIGRATING = "migrating"


@dataclass(slots=True)
class WorkerRow:
    """One worker as the view sees it: its identity as it joined, its load as last reported
    (idle before the first report and once lost), and what the view derives."""

    identity: WorkerIdentity
    status: WorkerStatus
    joined_at: float
    load: WorkerLoad
    drained: bool = False  # reported empty after a drain: idle and releasable
    lost_reason: str = ""
    request_blocks: dict[str, int] = field(default_factory=dict)

    @property
    def worker_id(self) -> str:
        return self.identity.worker_id

    @property
    def boot_id(self) -> str:
        return self.identity.boot_id

    @property
    def model(self) -> str:
        return self.identity.model

    @property
    def block_size(self) -> int:
        return self.identity.block_size

    @property
    def max_model_len(self) -> int:
        return self.identity.max_model_len

    @property
    def data_address(self) -> str:
        return self.identity.data_address

    @property
    def capacity_blocks(self) -> int:
        return self.load.num_total_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.load.num_free_blocks

    @property
    def num_running(self) -> int:
        return self.load.num_running

    @property
    def num_waiting(self) -> int:
        return self.load.num_waiting

    @property
    def num_preemptions_total(self) -> int:
        return self.load.num_preemptions_total

    @property
    def num_used_blocks(self) -> int:
        return self.capacity_blocks - self.num_free_blocks

    @property
    def sleeping(self) -> bool:
        """Its KV memory is given back (as last reported); work given to it wakes it."""
        return self.load.sleeping and self.status != WorkerStatus.LOST

    @property
    def kv_bytes_released(self) -> int:
        return self.load.kv_bytes_released if self.sleeping else 0

    @property
    def kv_pool_mapped_bytes(self) -> int:
        """The memory its KV pool holds (as last reported; 0 once lost)."""
        return self.load.kv_pool_mapped_bytes if self.status != WorkerStatus.LOST else 0

    @property
    def releasable(self) -> bool:
        """Holds nothing and is not lost: its device could be given back."""
        busy = self.request_blocks or self.num_running or self.num_waiting
        return self.status in (WorkerStatus.ACTIVE, WorkerStatus.DRAINING) and not busy

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.worker_id,
            model=self.model,
            status=self.status,
            capacity_blocks=self.capacity_blocks,
            block_size=self.block_size,
            request_blocks=MappingProxyType(self.request_blocks),
            num_free_blocks=self.capacity_blocks - sum(self.request_blocks.values()),
            sleeping=self.sleeping,
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
    moved_stamp: Stamp = NEVER  # when it came to worker_id (placement or migration commit)
    size_stamp: Stamp = NEVER  # who wrote num_blocks / num_tokens last


@dataclass(slots=True)
class MigrationRow:
    """A migration in flight (started, neither committed nor aborted yet)."""

    migration_id: str
    request_id: str
    src: str
    dst: str
    kind: str
    started_at: float


@dataclass(slots=True)
class Totals:
    num_finished: int = 0
    num_aborted: int = 0
    num_migrations: dict[str, int] = field(default_factory=lambda: {"kv": 0, "tokens": 0})
    num_migrations_aborted: int = 0
    num_resumed: int = 0  # requests that continued elsewhere after their worker was lost


class WorkerRegisters(msgspec.Struct, kw_only=True):
    """Everything folded about one worker id; its `WorkerRow` is derived from these."""

    joined: WorkerIdentity | None = None
    joined_stamp: Stamp = NEVER
    status: int = WorkerStatus.JOINING
    drained: bool = False
    lost_reason: str = ""
    status_stamp: Stamp = NEVER
    load: WorkerLoad | None = None  # the newest since the join
    gone: Stamp = NEVER  # last loss or exit: requests that came to it before are not live
    exited: Stamp = NEVER  # last exiting drain: the row is gone unless it joined again since


class ViewSnapshot(msgspec.Struct, kw_only=True):
    """The fold as of `last_seq` (tombstones included): what a journal snapshot record holds."""

    models: list[str]
    last_seq: dict[str, int]
    totals: Totals
    workers: dict[str, WorkerRegisters]
    requests: dict[str, RequestRow]
    reported: dict[str, tuple[Stamp, int, int]]
    migrations: dict[str, MigrationRow] = {}


class ClusterView:
    """Workers by id, requests by id, the models; a PolicyView."""

    def __init__(self, models: Sequence[str] = ()) -> None:
        self._configured: list[str] = list(models)
        self.model_names: list[str] = list(models)
        self.worker_rows: dict[str, WorkerRow] = {}
        self.requests: dict[str, RequestRow] = {}  # the live ones (derived from `_rows`)
        self.totals = Totals()
        self.last_seq: dict[str, int] = {}
        self.last_stamp: Stamp = NEVER
        self._regs: dict[str, WorkerRegisters] = {}
        self._reported: dict[str, tuple[Stamp, int, int]] = {}  # request -> newest load of it
        self._rows: dict[str, RequestRow] = {}  # every request not ended: live or tombstone
        self._flights: dict[str, MigrationRow] = {}  # every migration in flight, by id
        self._loads_since_prune = 0
        self._prefixes = PrefixSummaries()  # soft state, not folded (see `note_prefixes`)

    # ------------------------------------------------------------ PolicyView

    def models(self) -> Sequence[str]:
        return self.model_names

    def workers(self, model: str) -> Sequence[WorkerInfo]:
        """Sleeping workers last: a policy that opens the first idle worker opens an awake one
        while there is one (waking one costs the KV allocation)."""
        rows = self.worker_rows.values()
        live = [w for w in rows if w.model == model and w.status != WorkerStatus.LOST]
        return [w.info() for w in sorted(live, key=lambda w: w.sleeping)]

    def prefix_hits(self, model: str, prefix_hashes: Sequence[int]) -> dict[str, PrefixHit]:
        """PrefixView, from the workers' reported cache summaries (see `note_prefixes`)."""
        hits = {}
        for w in self.workers(model):
            hit = self._prefixes.hit(w.worker_id, prefix_hashes, w.block_size)
            if hit is not None:
                hits[w.worker_id] = hit
        return hits

    # ------------------------------------------------------------ soft state

    def note_prefixes(self, worker_id: str, prefixes: CachedPrefixes | None) -> None:
        """A worker's newest prefix cache summary (None: it caches nothing): the one door of
        the view's soft state. Not an event: a hint for placement, lost on a gateway restart
        until the next report; ignored for a worker the view has no row for."""
        if worker_id not in self.worker_rows:
            prefixes = None
        self._prefixes.note(worker_id, prefixes)

    # ------------------------------------------------------------ queries

    @property
    def migrations(self) -> dict[str, MigrationRow]:
        """Migrations in flight of live requests, by migration id."""
        return {m: f for m, f in self._flights.items() if f.request_id in self.requests}

    def live_workers(self, model: str | None = None) -> list[WorkerRow]:
        rows = self.worker_rows.values()
        return [w for w in rows if w.status == WorkerStatus.ACTIVE and model in (None, w.model)]

    def requests_on(self, worker_id: str) -> list[str]:
        row = self.worker_rows.get(worker_id)
        return list(row.request_blocks) if row else []

    def releasable_workers(self) -> list[WorkerRow]:
        return [w for w in self.worker_rows.values() if w.releasable]

    def unended(self, request_id: str) -> RequestRow | None:
        """The request if it has not ended: live, or gone with its worker (a tombstone)."""
        return self._rows.get(request_id)

    # ------------------------------------------------------------ the fold

    def apply(self, envelope: EventEnvelope) -> None:
        """Fold one event into the view: the only mutator of the fold (the soft state has its
        own door, `note_prefixes`). An envelope already folded (its seq is not above its
        source's last) is skipped."""
        source, seq = envelope.source, envelope.seq
        if seq <= self.last_seq.get(source, 0):
            return
        self.last_seq[source] = seq
        stamp = (envelope.ts, source, seq)
        self.last_stamp = max(self.last_stamp, stamp)
        event = envelope.event
        match event:
            case WorkerJoined():
                self._joined(event, stamp)
            case WorkerActivated(worker_id=wid):
                self._status(wid, stamp, WorkerStatus.ACTIVE)
            case LoadReported():
                self._load(event, stamp)
            case WorkerDrainStarted(worker_id=wid):
                self._status(wid, stamp, WorkerStatus.DRAINING)
            case WorkerUndrained(worker_id=wid):
                self._status(wid, stamp, WorkerStatus.ACTIVE)
            case WorkerDrained(worker_id=wid, exiting=exiting):
                self._drained(wid, exiting, stamp)
            case WorkerLost(worker_id=wid, reason=reason):
                self._status(wid, stamp, WorkerStatus.LOST, reason=reason)
                self._gone(wid, stamp)
            case RequestPlaced():
                self._placed(event, envelope.ts, stamp)
            case RequestResumed():
                self.totals.num_resumed += 1
                self._resumed(event, envelope.ts, stamp)
            case RequestAdmitted(request_id=rid):
                if (req := self._rows.get(rid)) is not None:
                    req.state = RequestState.RUNNING
            case RequestFinished(request_id=rid):
                self.totals.num_finished += 1
                self._forget(rid)
            case RequestAborted(request_id=rid):
                self.totals.num_aborted += 1
                self._forget(rid)
            case MigrationStarted():
                self._migration_started(event, envelope.ts)
            case MigrationCommitted():
                self._flights.pop(event.migration_id, None)
                self._migrated(event, stamp)
            case MigrationAborted(request_id=rid):
                self._flights.pop(event.migration_id, None)
                self.totals.num_migrations_aborted += 1
                if (req := self._rows.get(rid)) is not None:
                    req.state = RequestState.RUNNING
            case _:
                assert_never(event)

    # ------------------------------------------------------------ workers

    def _registers(self, worker_id: str) -> WorkerRegisters:
        return self._regs.setdefault(worker_id, WorkerRegisters())

    def _joined(self, e: WorkerJoined, stamp: Stamp) -> None:
        identity = e.identity
        regs = self._registers(identity.worker_id)
        regs.joined, regs.joined_stamp, regs.load = identity, stamp, None
        self._status(identity.worker_id, stamp, WorkerStatus.JOINING)
        if identity.model not in self.model_names:
            extra = {m for m in self.model_names if m not in self._configured} | {identity.model}
            self.model_names = self._configured + sorted(extra)

    def _status(
        self,
        worker_id: str,
        stamp: Stamp,
        status: WorkerStatus,
        *,
        drained: bool = False,
        reason: str = "",
    ) -> None:
        regs = self._registers(worker_id)
        if stamp > regs.status_stamp:
            regs.status_stamp, regs.status = stamp, int(status)
            regs.drained, regs.lost_reason = drained, reason
        self._refresh(worker_id)

    def _drained(self, worker_id: str, exiting: bool, stamp: Stamp) -> None:
        if not exiting:
            self._status(worker_id, stamp, WorkerStatus.DRAINING, drained=True)
            return
        regs = self._registers(worker_id)
        regs.exited = max(regs.exited, stamp)
        self._gone(worker_id, stamp)

    def _gone(self, worker_id: str, stamp: Stamp) -> None:
        """A loss or exit: requests that came to the worker before `stamp` become tombstones."""
        regs = self._registers(worker_id)
        regs.gone = max(regs.gone, stamp)
        for req in [r for r in self._rows.values() if r.worker_id == worker_id]:
            self._sync(req)
        self._refresh(worker_id)

    def _load(self, e: LoadReported, stamp: Stamp) -> None:
        regs = self._registers(e.worker_id)
        if stamp > regs.joined_stamp:
            regs.load = e.load
        reported = self._reported
        for load in e.load.requests:
            rid = load.request_id
            known = reported.get(rid)
            if known is None or stamp > known[0]:
                reported[rid] = (stamp, load.num_blocks, load.num_tokens)
            if (req := self._rows.get(rid)) is not None:
                self._resize(req)
        self._refresh(e.worker_id)
        self._loads_since_prune += 1
        if self._loads_since_prune >= 256:
            self._prune()

    def _refresh(self, worker_id: str) -> None:
        """Recompute the worker's row from its registers (and the requests that name it)."""
        regs = self._regs.get(worker_id)
        joined = regs.joined if regs is not None else None
        if regs is None or joined is None or regs.exited > regs.joined_stamp:
            self.worker_rows.pop(worker_id, None)
            self._prefixes.forget(worker_id)
            return
        row = self.worker_rows.get(worker_id)
        if row is None or row.boot_id != joined.boot_id or row.joined_at != regs.joined_stamp[0]:
            self._prefixes.forget(worker_id)  # (a new process: its cache starts empty)
            row = self.worker_rows[worker_id] = self._new_row(joined, regs.joined_stamp[0])
        row.status = WorkerStatus(regs.status)
        row.drained, row.lost_reason = regs.drained, regs.lost_reason
        load = regs.load
        if load is None:
            row.load = WorkerLoad.idle(joined.capacity_blocks)
        elif row.status == WorkerStatus.LOST:
            row.load = WorkerLoad.idle(load.num_total_blocks, load.num_preemptions_total)
        else:
            row.load = load

    def _new_row(self, identity: WorkerIdentity, joined_at: float) -> WorkerRow:
        return WorkerRow(
            identity=identity,
            status=WorkerStatus.JOINING,
            joined_at=joined_at,
            load=WorkerLoad.idle(identity.capacity_blocks),
            request_blocks={
                r.request_id: r.num_blocks
                for r in self.requests.values()
                if r.worker_id == identity.worker_id
            },
        )

    # ------------------------------------------------------------ requests

    def _placed(self, e: RequestPlaced, ts: float, stamp: Stamp) -> None:
        if (old := self._rows.get(e.request_id)) is not None:
            self._detach(old)  # placed again (its worker died before the first token)
        req = self._rows[e.request_id] = RequestRow(
            request_id=e.request_id,
            model=e.model,
            worker_id=e.worker_id,
            state=RequestState.PLACED,
            num_prompt_tokens=e.num_prompt_tokens,
            max_tokens=e.max_tokens,
            num_blocks=e.num_blocks,
            num_tokens=e.num_prompt_tokens,
            placed_at=ts,
            moved_stamp=stamp,
            size_stamp=stamp,
        )
        self._resize(req)
        self._sync(req)

    def _resumed(self, e: RequestResumed, ts: float, stamp: Stamp) -> None:
        old = self._rows.get(e.request_id)
        if old is not None:
            self._detach(old)
        req = self._rows[e.request_id] = RequestRow(
            request_id=e.request_id,
            model=e.model,
            worker_id=e.worker_id,
            state=RequestState.RUNNING if e.num_output_tokens else RequestState.PLACED,
            num_prompt_tokens=e.num_prompt_tokens,
            max_tokens=e.max_tokens,
            num_blocks=e.num_blocks,
            num_tokens=e.num_prompt_tokens + e.num_output_tokens,
            placed_at=old.placed_at if old is not None else ts,
            moved_stamp=stamp,
            size_stamp=stamp,
        )
        self._resize(req)
        self._sync(req)

    def _resize(self, req: RequestRow) -> None:
        """Take the newest reported size of the request if it is newer than what it has."""
        known = self._reported.get(req.request_id)
        if known is not None and known[0] > req.size_stamp:
            req.size_stamp, req.num_blocks, req.num_tokens = known
            if req.request_id in self.requests:
                self._attach(req)

    def _gone_at(self, req: RequestRow) -> Stamp:
        """The last loss or exit of the request's worker (NEVER if none is folded)."""
        regs = self._regs.get(req.worker_id)
        return regs.gone if regs is not None else NEVER

    def _sync(self, req: RequestRow) -> None:
        """Derive the request's presence in `requests` and its worker's row: live iff it came
        to its worker after the worker's last loss or exit (whatever the order of folding)."""
        if self._gone_at(req) < req.moved_stamp:
            self.requests[req.request_id] = req
            self._attach(req)
        else:
            self.requests.pop(req.request_id, None)
            self._detach(req)

    def _attach(self, req: RequestRow) -> None:
        if (row := self.worker_rows.get(req.worker_id)) is not None:
            row.request_blocks[req.request_id] = req.num_blocks

    def _detach(self, req: RequestRow) -> None:
        if (row := self.worker_rows.get(req.worker_id)) is not None:
            row.request_blocks.pop(req.request_id, None)

    def _forget(self, request_id: str) -> None:
        """The request ended (its last word): forget it, live or tombstone, and its loads."""
        if (req := self._rows.pop(request_id, None)) is not None:
            self.requests.pop(request_id, None)
            self._detach(req)
        for mid in [m for m, flight in self._flights.items() if flight.request_id == request_id]:
            del self._flights[mid]
        self._reported.pop(request_id, None)

    def _migration_started(self, e: MigrationStarted, ts: float) -> None:
        req = self._rows.get(e.request_id)
        if req is None:
            return
        req.state = RequestState.MIGRATING
        mid = e.migration_id
        self._flights[mid] = MigrationRow(mid, e.request_id, e.src, e.dst, e.kind, ts)

    def _migrated(self, e: MigrationCommitted, stamp: Stamp) -> None:
        self.totals.num_migrations[e.kind] = self.totals.num_migrations.get(e.kind, 0) + 1
        req = self._rows.get(e.request_id)
        if req is None:
            return
        self._detach(req)
        req.worker_id, req.state, req.moved_stamp = e.dst, RequestState.RUNNING, stamp
        self._sync(req)

    def _prune(self) -> None:
        """Forget loads of requests the view does not hold, and tombstones, past the horizon."""
        self._loads_since_prune = 0
        horizon = self.last_stamp[0] - _HORIZON_S
        for rid, (stamp, _, _) in list(self._reported.items()):
            if rid not in self._rows and stamp[0] < horizon:
                del self._reported[rid]
        for rid, req in list(self._rows.items()):
            if rid not in self.requests and self._gone_at(req)[0] < horizon:
                self._forget(rid)

    # ------------------------------------------------------------ snapshots

    def snapshot(self) -> ViewSnapshot:
        """The fold so far, for a journal snapshot record (shares no mutable state)."""
        image = ViewSnapshot(
            models=list(self._configured),
            last_seq=dict(self.last_seq),
            totals=self.totals,
            workers=self._regs,
            requests=self._rows,
            reported=self._reported,  # also loads folded before their placement
            migrations=self._flights,
        )
        return msgspec.msgpack.decode(msgspec.msgpack.encode(image), type=ViewSnapshot)

    @classmethod
    def from_snapshot(cls, snap: ViewSnapshot, models: Sequence[str] = ()) -> ClusterView:
        """A view holding the fold of `snap`; `models` adds configured models it lacks."""
        configured = list(snap.models) + [m for m in models if m not in snap.models]
        view = cls(configured)
        view.last_seq = dict(snap.last_seq)
        view.totals = snap.totals
        view._rows = dict(snap.requests)
        view._flights = dict(snap.migrations)
        view._reported = dict(snap.reported)
        view._regs = dict(snap.workers)
        stamps = [s for r in view._regs.values() for s in (r.status_stamp, r.gone, r.exited)]
        stamps += [s for r in view._rows.values() for s in (r.size_stamp, r.moved_stamp)]
        view.last_stamp = max([NEVER, *stamps])
        extra = {r.joined.model for r in view._regs.values() if r.joined is not None}
        view.model_names = configured + sorted(extra - set(configured))
        for req in view._rows.values():
            view._sync(req)
        for worker_id in view._regs:
            view._refresh(worker_id)
        return view
