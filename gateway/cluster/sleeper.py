"""The sleeper: puts to sleep the workers that have been idle for their `sleep_after_s` (the
worker's config, said in its hello; 0: never) and that their pool does not need
(`policy/sleep.py`). A sleeping worker wakes by itself when the placement sends it a request
(the worker wakes before it queues it), so nothing here wakes workers.

Every epoch: a worker is idle from the first tick that sees it releasable (no request, nothing
running or queued) until one that does not; one worker per model at most is put to sleep per
tick, so the next decision sees the pool without it. A refusal (a request placed meanwhile: the
worker answers that it is busy) is logged and the worker's idle clock starts again.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import structlog

from mell.gateway.cluster.view import ClusterView, WorkerRow
from mell.gateway.policy.base import WorkerStatus
from mell.gateway.policy.sleep import not_needed

log = structlog.get_logger("mell.gateway")


class SleepLink(Protocol):
    async def sleep(self, worker_id: str, timeout_s: float = 5.0) -> None: ...


class Sleeper:
    def __init__(self, view: ClusterView) -> None:
        self.view = view
        self._idle_since: dict[str, float] = {}

    def due(self, now: float) -> list[str]:
        """The workers to put to sleep now (at most one per model); keeps the idle clocks."""
        rows = self.view.worker_rows
        for wid in [w for w in self._idle_since if w not in rows]:
            del self._idle_since[wid]
        chosen: dict[str, str] = {}
        for row in rows.values():
            if not self._idle(row):
                self._idle_since.pop(row.worker_id, None)
                continue
            since = self._idle_since.setdefault(row.worker_id, now)
            after = row.identity.sleep_after_s
            if after <= 0 or now - since < after or row.model in chosen:
                continue
            if not_needed(self.view.workers(row.model), row.worker_id):
                chosen[row.model] = row.worker_id
        return list(chosen.values())

    def restart_clock(self, worker_id: str, now: float) -> None:
        self._idle_since[worker_id] = now

    @staticmethod
    def _idle(row: WorkerRow) -> bool:
        return row.status == WorkerStatus.ACTIVE and row.releasable and not row.sleeping


async def run_sleeper(view: ClusterView, link: SleepLink, epoch_s: float) -> None:
    sleeper = Sleeper(view)
    while True:
        await asyncio.sleep(epoch_s)
        for worker_id in sleeper.due(time.monotonic()):
            try:
                await link.sleep(worker_id)
                log.info("worker_put_to_sleep", worker_id=worker_id)
            except Exception as err:  # busy meanwhile, lost, or no answer: try again later
                log.info("worker_sleep_refused", worker_id=worker_id, reason=str(err))
                sleeper.restart_clock(worker_id, time.monotonic())
