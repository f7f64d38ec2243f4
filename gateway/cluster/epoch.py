"""The epoch loop: every epoch the policy plans its moves from the cluster view, the migrator
runs them.

Each epoch: (1) when the set of live workers changed, ask every worker to measure its links to
the others (the migration boundaries); (2) `plan_epoch` (pure policy) gives moves; (3) moves of
requests already migrating, or touching a worker at its migration limit, wait for a later epoch;
"auto" kinds are resolved by the adaptive choice within the epoch's budgets (the rest wait); (4)
the chosen moves start as background migrations (owned by this loop's task group, bounded by the
migrator's per-worker limit). A draining worker's requests are moved away too: the policy's
`place` picks each one's destination, so that a drained worker empties with nothing lost.

Without a migrator (`EpochMigrations`) the loop only logs what the policy planned.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Container
from typing import Protocol

import structlog

from mell.common.messages import MeasurePeers, PeerAddress
from mell.gateway.cluster.view import ClusterView, RequestState
from mell.gateway.cluster.worker_port import Outbox
from mell.gateway.policy.base import Arrival, Move, Placement, Policy, WorkerStatus
from mell.gateway.policy.migration_choice import TransferModel, choose_transfers

log = structlog.get_logger("mell.gateway")


class EpochMigrations(Protocol):
    """What the epoch loop needs of the migrator."""

    @property
    def by_request(self) -> Container[str]: ...

    @property
    def max_per_worker(self) -> int: ...

    @property
    def outbox(self) -> Outbox: ...

    def busy(self, worker_id: str) -> bool: ...

    def transfer_model(self) -> TransferModel: ...

    async def migrate(self, move: Move) -> object: ...


async def run_epochs(
    policy: Policy, view: ClusterView, epoch_s: float, migrator: EpochMigrations | None = None
) -> None:
    tasks: set[asyncio.Task[None]] = set()
    members: frozenset[str] = frozenset()
    try:
        while True:
            await asyncio.sleep(epoch_s)
            try:
                if migrator is not None:
                    members = _measure_if_changed(view, migrator, members)
                moves = policy.plan_epoch(view, time.monotonic())
                if migrator is not None:
                    moves = moves + drain_moves(policy, view, migrator)
            except Exception:
                log.exception("epoch_failed", policy=policy.name)
                continue
            if not moves:
                continue
            if migrator is None:
                log.info("epoch_moves_planned", policy=policy.name, applied=False, n=len(moves))
                continue
            for move in runnable(moves, view, migrator):
                task = asyncio.create_task(_run(migrator, move), name=f"migrate-{move.request_id}")
                tasks.add(task)
                task.add_done_callback(tasks.discard)
    finally:
        for task in tasks:
            task.cancel()
        for task in list(tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def runnable(moves: list[Move], view: ClusterView, migrator: EpochMigrations) -> list[Move]:
    """The moves that can start now, with their kinds resolved. A `Move.group` larger than
    the per-worker limit starts in parts over several epochs (the policy re-plans the rest);
    the part that can start goes whole or waits."""
    seen: set[str] = set()
    ready: list[Move] = []
    load: dict[str, int] = {}
    for move in moves:
        req = view.requests.get(move.request_id)
        if (
            req is None
            or move.request_id in seen
            or move.request_id in migrator.by_request
            or req.worker_id != move.src
            or req.state != RequestState.RUNNING  # not before its first token
        ):
            continue
        if any(
            migrator.busy(w) or load.get(w, 0) >= migrator.max_per_worker
            for w in (move.src, move.dst)
        ):
            continue
        seen.add(move.request_id)
        for w in (move.src, move.dst):
            load[w] = load.get(w, 0) + 1
        ready.append(move)
    tokens = {m.request_id: view.requests[m.request_id].num_tokens for m in ready}
    plan = choose_transfers(ready, tokens, migrator.transfer_model())
    return plan.chosen


def drain_moves(policy: Policy, view: ClusterView, migrator: EpochMigrations) -> list[Move]:
    """Move the requests of draining workers to where the policy would place them now."""
    moves = []
    for row in view.worker_rows.values():
        if row.status != WorkerStatus.DRAINING:
            continue
        for rid in list(row.request_blocks):
            req = view.requests.get(rid)
            if req is None or rid in migrator.by_request:
                continue
            arrival = Arrival(rid, req.model, req.num_tokens, max(1, req.max_tokens))
            decision = policy.place(view, arrival)
            if isinstance(decision, Placement) and decision.worker_id != row.worker_id:
                moves.append(Move(rid, row.worker_id, decision.worker_id, "auto"))
    return moves


async def _run(migrator: EpochMigrations, move: Move) -> None:
    try:
        await migrator.migrate(move)
    except Exception as err:  # refused before it started (raced with the request's end)
        log.info("migration_skipped", request_id=move.request_id, reason=str(err))


def _measure_if_changed(
    view: ClusterView, migrator: EpochMigrations, members: frozenset[str]
) -> frozenset[str]:
    live = [w for w in view.worker_rows.values() if w.status == WorkerStatus.ACTIVE]
    now = frozenset(w.worker_id for w in live)
    if now != members and len(live) > 1:
        peers = [PeerAddress(w.worker_id, w.data_address) for w in live]
        for w in live:
            migrator.outbox.send_quietly(w.worker_id, MeasurePeers(peers))
    return now
