"""The destination side of one live migration: a state machine (see `workerd/migration/`)."""

from __future__ import annotations

import threading
import time
from enum import IntEnum

import structlog

from mell.common.errors import MellError
from mell.common.messages import (
    FrameRef,
    MigrateAck,
    MigrateBlocks,
    MigrateCommit,
    MigratedIn,
    MigrateReserve,
    MigrateStageEnd,
)
from mell.workerd.engine.contract import MigratableEngine
from mell.workerd.migration.port import Port

log = structlog.get_logger("mell.workerd.migration")


class InState(IntEnum):
    RESERVING = 1  # holds blocks, receives stages
    COMMITTED = 2
    ABORTED = 3


def reservation_key(migration_id: str) -> str:
    return f"migrate-in:{migration_id}"


class IncomingMigration:
    """The destination side of one migration."""

    def __init__(
        self,
        migration_id: str,
        reply_to: str,
        engine: MigratableEngine,
        port: Port,
        timeout_s: float,
    ) -> None:
        self.id = migration_id
        self.key = reservation_key(migration_id)
        self.reply_to = reply_to
        self.engine, self.port, self.timeout_s = engine, port, timeout_s
        self.state = InState.RESERVING
        self.deadline = time.monotonic() + timeout_s
        self.request_id = ""
        self._answers: dict[tuple[int, str], MigrateAck] = {}
        self._seen: set[tuple[int, int, int]] = set()  # (stage, layer, first) written
        self._frames: dict[int, int] = {}  # stage -> distinct frames written
        # `write` may run on the I/O thread (MigrationHub.take_blocks): it and every change of
        # the reservation (abort, commit) hold this lock
        self.lock = threading.RLock()

    @property
    def done(self) -> bool:
        return self.state >= InState.COMMITTED

    def reserve(self, msg: MigrateReserve, accepting: bool, now: float) -> None:
        if self._repeat(msg.stage, "reserve"):
            return
        self.deadline = now + self.timeout_s
        if not accepting:
            self._answer(msg.stage, "reserve", False, "destination is draining")
        elif self.state != InState.RESERVING:
            self._answer(msg.stage, "reserve", False, f"migration is {self.state.name.lower()}")
        elif not self.engine.reserve(self.key, msg.num_blocks):
            self._answer(msg.stage, "reserve", False, f"no room for {msg.num_blocks} blocks")
        else:
            self._answer(msg.stage, "reserve", True)

    def write(self, msg: MigrateBlocks, frames: list[memoryview], now: float) -> None:
        with self.lock:
            self._write(msg, frames, now)

    def _write(self, msg: MigrateBlocks, frames: list[memoryview], now: float) -> None:
        if (
            self.state != InState.RESERVING
            or (msg.stage, "copy") in self._answers
            or (msg.stage, msg.layer, msg.first) in self._seen
        ):
            return  # over, or a repeat
        self.deadline = now + self.timeout_s
        table = self.engine.block_table(self.key, msg.layer)
        if table is None:
            return  # nothing reserved (refused): the stage will not be acknowledged
        n = sum(ref.shape[0] for ref in msg.data)
        ids = table[msg.first : msg.first + n]
        if len(ids) != n or not self._fits(msg.data, frames):
            return  # not what was reserved: the stage's frame count will not match
        self.engine.write_kv(self.key, msg.layer, ids, [frames[ref.index] for ref in msg.data])
        self._frames[msg.stage] = self._frames.get(msg.stage, 0) + 1
        self._seen.add((msg.stage, msg.layer, msg.first))

    def _fits(self, refs: list[FrameRef], frames: list[memoryview]) -> bool:
        """Every frame is there and holds whole blocks of this worker's layout."""
        block_bytes = self.engine.kv_layout.block_bytes
        return all(
            0 <= ref.index < len(frames)
            and len(ref.shape) == 2
            and ref.shape[1] == block_bytes
            and frames[ref.index].nbytes == ref.shape[0] * block_bytes
            for ref in refs
        )

    def stage_end(self, msg: MigrateStageEnd, now: float) -> None:
        if self._repeat(msg.stage, "copy"):
            return
        self.deadline = now + self.timeout_s
        with self.lock:
            got = self._frames.get(msg.stage, 0)
        if got != msg.num_frames:
            self._answer(msg.stage, "copy", False, f"{got} of {msg.num_frames} frames arrived")
        else:
            self._answer(msg.stage, "copy", True)

    def commit(self, msg: MigrateCommit, accepting: bool) -> bool:
        """Make the request ours; True when it joined the batch (just now)."""
        if self._repeat(0, "commit"):
            return False
        request = msg.request
        self.request_id = request.request_id
        reason = ""
        if not accepting:
            reason = "destination is draining"
        elif self.state != InState.RESERVING:
            reason = f"migration is {self.state.name.lower()}"
        else:
            try:
                with self.lock:
                    self.engine.import_request(self.key, request)
                    self.state = InState.COMMITTED
            except MellError as err:
                reason = err.message
        if reason:
            self.abort(reason)
            self._answer(0, "commit", False, reason)
            return False
        self.port.to_gateway(
            MigratedIn(
                migration_id=self.id,
                request_id=request.request_id,
                src_worker_id=msg.src_worker_id,
                output_token_ids=list(request.output_token_ids),
                num_prompt_tokens=len(request.prompt_token_ids),
            )
        )
        self._answer(0, "commit", True)
        return True

    def abort(self, reason: str) -> None:
        with self.lock:
            if self.state != InState.RESERVING:
                return
            self.engine.release(self.key)
            self.state = InState.ABORTED
        log.info("migration_in_aborted", migration_id=self.id, reason=reason)

    def poll(self, now: float) -> None:
        if self.state == InState.RESERVING and now > self.deadline:
            self.abort(f"source silent for {self.timeout_s} s")

    def _repeat(self, stage: int, step: str) -> bool:
        """A message already answered: answer the same again, change nothing."""
        answer = self._answers.get((stage, step))
        if answer is not None:
            self.port.to_peer(self.reply_to, answer)
        return answer is not None

    def _answer(self, stage: int, step: str, ok: bool, reason: str = "") -> None:
        ack = MigrateAck(migration_id=self.id, stage=stage, step=step, ok=ok, reason=reason)
        self._answers[(stage, step)] = ack
        self.port.to_peer(self.reply_to, ack)
