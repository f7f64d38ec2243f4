"""Live request migration between workers, as two explicit state machines (Llumnix §2.2).

`OutgoingMigration` runs on the source, `IncomingMigration` on the destination; each has a
`state` (IntEnum) and one method per protocol step. A step checks the state, does one thing,
moves to the next state and sends one message. KV transfer:

    source                                   destination
    RESERVING  --MigrateReserve(stage, n)-->  reserve n blocks in total   --MigrateAck-->
    COPYING    --MigrateBlocks per layer and
                 ~4 MiB (runs of blocks as frames),
                 MigrateStageEnd(stage)----->  write each frame as it comes --MigrateAck-->
    (repeat for the blocks added meanwhile; when at most k remain, pause the request first:
     the last stage copies the rest, the partly written block included)
    COMMITTING --MigrateCommit(request)----->  the reservation becomes the request; it joins the
                                               batch; MigratedIn to the gateway --MigrateAck-->
    COMMITTED: the source frees the request, tells the gateway `MigrationEnded(committed)`.

A token transfer is the same machine without the copy stages: pause, commit with the token ids
and sampling state (num_computed 0: the destination re-prefills). Every wait has a deadline;
any failure (request finished or preempted, no blocks at the destination, peer gone, deadline,
stage limit) aborts: the source resumes the request (nothing lost), the destination frees its
reservation (nothing leaked). Destination handlers are idempotent per (migration id, stage,
step): a repeated message gets the same answer and changes nothing.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Protocol

import structlog

from mell.common.errors import MellError
from mell.common.messages import (
    FrameRef,
    MigrateAbort,
    MigrateAck,
    MigrateBlocks,
    MigrateCommit,
    MigratedIn,
    MigrateReserve,
    MigrateStageEnd,
    MigrationEnded,
    StartMigration,
)
from mell.transport.codec import Buffer

log = structlog.get_logger("mell.workerd.migration")


@dataclass(frozen=True, slots=True)
class MigrationSettings:
    last_stage_max_blocks: int = 16  # k: pause and copy the rest when at most this many remain
    max_stages: int = 4  # copy stages before the last one; more aborts the migration
    message_bytes: int = 4 << 20  # KV bytes per MigrateBlocks (the copy's pipelining grain)
    step_timeout_s: float = 5.0  # the source's deadline on every answer it waits for
    incoming_timeout_s: float = 10.0  # a destination frees a reservation its source left


class Port(Protocol):
    """What the machines send through (the worker's I/O thread)."""

    def to_peer(self, address: str, message: Any, buffers: list[Buffer] | None = None) -> None: ...

    def to_gateway(self, message: Any) -> None: ...


class OutState(IntEnum):
    STARTING = 0
    RESERVING = 1
    COPYING = 2
    COMMITTING = 3
    COMMITTED = 4
    ABORTED = 5


class InState(IntEnum):
    RESERVING = 1  # holds blocks, receives stages
    COMMITTED = 2
    ABORTED = 3


def reservation_key(migration_id: str) -> str:
    return f"migrate-in:{migration_id}"


class OutgoingMigration:
    """The source side of one migration."""

    def __init__(
        self,
        start: StartMigration,
        engine: Any,
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
        seq = engine.sequence(self.request_id)
        self._preemptions = seq.num_preemptions if seq is not None else -1

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
        """Decide this stage's blocks (pausing for the last one) and ask the destination."""
        seq = self.engine.sequence(self.request_id)
        bs = self.engine.blocks.block_size
        every = -(-seq.num_computed // bs)
        if every - self.copied <= self.settings.last_stage_max_blocks:
            self._pause(now)
            self.final, self.target = True, -(-seq.num_computed // bs)
        elif self.stage >= self.settings.max_stages:
            self.abort(f"stage limit ({self.settings.max_stages}) reached")
            return
        else:
            self.target = seq.num_computed // bs  # full blocks only: the last one still grows
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
        blocks = self.engine.blocks
        runner = self.engine.runner
        per_message = max(1, self.settings.message_bytes // runner.kv_block_bytes)
        num_frames = 0
        self._copy_started, self._stage_bytes = time.monotonic(), 0
        for layer in range(blocks.num_layers):  # (no message when nothing is to copy)
            table = blocks.block_table(self.request_id, layer)
            for first in range(self.copied, self.target, per_message):
                ids = table[first : min(first + per_message, self.target)]
                frames = runner.kv_frames(layer, ids)
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
        seq = self.engine.sequence(self.request_id)
        num_tokens = seq.num_tokens if seq is not None else 0
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
        seq = self.engine.sequence(self.request_id)
        if seq is None or seq.is_finished:
            return "request finished"
        if seq.num_preemptions != self._preemptions:
            return "request preempted"
        if self.kind == "kv" and not self.paused and not seq.is_decoding:
            return "request is not decoding"
        return None


class IncomingMigration:
    """The destination side of one migration."""

    def __init__(
        self, migration_id: str, reply_to: str, engine: Any, port: Port, timeout_s: float
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
        if not self.engine.blocks.has(self.key):
            return  # nothing reserved (refused): the stage will not be acknowledged
        n = sum(ref.shape[0] for ref in msg.data)
        ids = self.engine.blocks.block_table(self.key, msg.layer)[msg.first : msg.first + n]
        if len(ids) != n or not self._fits(msg.data, frames):
            return  # not what was reserved: the stage's frame count will not match
        self.engine.runner.write_kv(msg.layer, ids, [frames[ref.index] for ref in msg.data])
        self._frames[msg.stage] = self._frames.get(msg.stage, 0) + 1
        self._seen.add((msg.stage, msg.layer, msg.first))

    def _fits(self, refs: list[FrameRef], frames: list[memoryview]) -> bool:
        """Every frame is there and holds whole blocks of this worker's layout."""
        block_bytes = self.engine.runner.kv_block_bytes
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
