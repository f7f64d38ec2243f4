"""The source side of one live migration: a state machine (see `workerd/migration/`)."""

from __future__ import annotations

import time
from enum import IntEnum

import structlog

from mell.common.messages import (
    FrameRef,
    MigrateAbort,
    MigrateAck,
    MigrateBlocks,
    MigrateCommit,
    MigrateReserve,
    MigrateStageEnd,
    MigrationEnded,
    StartMigration,
)
from mell.workerd.engine.contract import MigratableEngine
from mell.workerd.migration.port import Port
from mell.workerd.migration.settings import MigrationSettings

log = structlog.get_logger("mell.workerd.migration")


class OutState(IntEnum):
    STARTING = 0
    RESERVING = 1
    COPYING = 2
    COMMITTING = 3
    COMMITTED = 4
    ABORTED = 5


class OutgoingMigration:
    """The source side of one migration."""

    def __init__(
        self,
        start: StartMigration,
        engine: MigratableEngine,
        port: Port,
        settings: MigrationSettings,
        self_address: str,
        worker_id: str,
    ) -> None:
        self.id = start.migration_id
        self.request_id = start.request_id
        self.kind = start.kind
        self.dst_address = start.dst_address
        self.engine, self.port, self.settings = engine, port, settings
        self.self_address, self.worker_id = self_address, worker_id
        self.state = OutState.STARTING
        self.stage = 0
        self.final = False  # the current stage is the last (the request is paused)
        self.copied = 0  # blocks the destination holds
        self.target = 0  # blocks it will hold after this stage
        self.deadline = float("inf")
        self.paused = False
        self.paused_at = 0.0
        self.stall_s = 0.0
        self.reason = ""
        self.copy_s = 0.0
        self.copy_bytes = 0
        self._copy_started = 0.0
        self._stage_bytes = 0
        state = engine.request_state(self.request_id)
        self._preemptions = state.num_preemptions if state is not None else -1

    @property
    def done(self) -> bool:
        return self.state >= OutState.COMMITTED

    # ------------------------------------------------------------ steps

    def begin(self, now: float) -> None:
        assert self.state == OutState.STARTING
        if (why := self._why_not()) is not None:
            self.abort(why)
        elif self.kind == "tokens":
            self._pause(now)
            self._commit(now)
        else:
            self._reserve(now)

    def _reserve(self, now: float) -> None:
        """Decide this stage's blocks (pausing for the last one) and ask the destination. A
        request whose KV waits on the host tier does not grow: one stage copies it all."""
        state = self.engine.request_state(self.request_id)
        if state is None:  # (checked by every caller just before)
            self.abort("request finished")
            return
        bs = self.engine.kv_layout.block_size
        every = -(-state.num_computed // bs)
        if state.kv_on_host or every - self.copied <= self.settings.last_stage_max_blocks:
            self._pause(now)
            self.final, self.target = True, -(-state.num_computed // bs)
        elif self.stage >= self.settings.max_stages:
            self.abort(f"stage limit ({self.settings.max_stages}) reached")
            return
        else:
            self.target = state.num_computed // bs  # full blocks only: the last one still grows
        self.stage += 1
        self.state = OutState.RESERVING
        self.deadline = now + self.settings.step_timeout_s
        self.port.to_peer(
            self.dst_address,
            MigrateReserve(
                migration_id=self.id,
                stage=self.stage,
                num_blocks=self.target,
                reply_to=self.self_address,
            ),
        )

    def _copy(self, now: float) -> None:
        """Send blocks [copied, target) layer by layer, in messages of about
        `message_bytes` (the destination writes one while the next is on the wire), then the
        stage's end."""
        layout = self.engine.kv_layout
        per_message = max(1, self.settings.message_bytes // layout.block_bytes)
        num_frames = 0
        self._copy_started, self._stage_bytes = time.monotonic(), 0
        for layer in range(layout.num_layers):  # (no message when nothing is to copy)
            table = self.engine.block_table(self.request_id, layer)
            if table is None:  # (a running request holds blocks; checked just before)
                self.abort("request holds no blocks")
                return
            for first in range(self.copied, self.target, per_message):
                ids = table[first : min(first + per_message, self.target)]
                frames = self.engine.read_kv(self.request_id, layer, ids)
                refs = [FrameRef(i, "uint8", [n, f.nbytes // n]) for i, (n, f) in enumerate(frames)]
                message = MigrateBlocks(
                    migration_id=self.id, stage=self.stage, layer=layer, first=first, data=refs
                )
                self.port.to_peer(self.dst_address, message, [f for _, f in frames])
                self._stage_bytes += sum(f.nbytes for _, f in frames)
                num_frames += 1
        self.state = OutState.COPYING
        self.deadline = now + self.settings.step_timeout_s
        self.port.to_peer(
            self.dst_address,
            MigrateStageEnd(migration_id=self.id, stage=self.stage, num_frames=num_frames),
        )

    def _commit(self, now: float) -> None:
        request = self.engine.export_request(self.request_id, with_kv=self.kind == "kv")
        self.state = OutState.COMMITTING
        self.deadline = now + self.settings.step_timeout_s
        self.port.to_peer(
            self.dst_address,
            MigrateCommit(
                migration_id=self.id,
                src_worker_id=self.worker_id,
                request=request,
                reply_to=self.self_address,
            ),
        )

    def _finish(self, now: float) -> None:
        """Committed at the destination: free the request here."""
        state = self.engine.request_state(self.request_id)
        num_tokens = state.num_tokens if state is not None else 0
        self.engine.abort(self.request_id)
        self.state = OutState.COMMITTED
        self.stall_s = now - self.paused_at
        self.port.to_gateway(
            MigrationEnded(
                migration_id=self.id,
                request_id=self.request_id,
                committed=True,
                num_blocks=self.copied,
                num_tokens=num_tokens,
                stall_s=self.stall_s,
                copy_s=self.copy_s,
                copy_bytes=self.copy_bytes,
            )
        )
        log.info(
            "migration_committed",
            migration_id=self.id,
            request_id=self.request_id,
            kind=self.kind,
            stages=self.stage,
            blocks=self.copied,
            stall_ms=round(self.stall_s * 1000, 2),
        )

    def abort(self, reason: str) -> None:
        """Give up: the request runs on here, the destination frees what it holds."""
        if self.done:
            return
        self.state, self.reason = OutState.ABORTED, reason
        self.engine.resume(self.request_id)
        self.port.to_peer(self.dst_address, MigrateAbort(migration_id=self.id, reason=reason))
        self.port.to_gateway(
            MigrationEnded(
                migration_id=self.id, request_id=self.request_id, committed=False, reason=reason
            )
        )
        log.info(
            "migration_aborted",
            migration_id=self.id,
            request_id=self.request_id,
            kind=self.kind,
            stage=self.stage,
            reason=reason,
        )

    # ------------------------------------------------------------ inputs

    def on_ack(self, ack: MigrateAck, now: float) -> None:
        expected = {
            OutState.RESERVING: "reserve",
            OutState.COPYING: "copy",
            OutState.COMMITTING: "commit",
        }.get(self.state)
        if ack.step != expected or (expected != "commit" and ack.stage != self.stage):
            return  # a late or repeated answer
        if not ack.ok:
            self.abort(f"destination: {ack.reason}")
            return
        if self.state == OutState.COMMITTING:
            self._finish(now)
            return
        if (why := self._why_not()) is not None:
            self.abort(why)
        elif self.state == OutState.RESERVING:
            self._copy(now)
        else:
            self.copied = self.target
            self.copy_s += now - self._copy_started  # `now`: when the answer arrived
            self.copy_bytes += self._stage_bytes
            if self.final:
                self._commit(now)
            else:
                self._reserve(now)

    def poll(self, now: float) -> None:
        if not self.done and now > self.deadline:
            self.abort(f"no answer from the destination in {self.settings.step_timeout_s} s")

    def _pause(self, now: float) -> None:
        self.engine.pause(self.request_id)
        self.paused, self.paused_at = True, now

    def _why_not(self) -> str | None:
        """Why the request cannot (or can no longer) migrate; None when it can."""
        state = self.engine.request_state(self.request_id)
        if state is None or state.is_finished:
            return "request finished"
        if state.num_preemptions != self._preemptions:
            return "request preempted"
        if self.kind == "kv" and not (self.paused or state.is_decoding or state.kv_on_host):
            return "request is not decoding"
        return None
