"""All migrations of one worker: starts them, routes peer messages to them, watches deadlines.

The worker's engine loop calls `start` for a `StartMigration`, `handle` for every peer message,
and `poll` once per iteration. Finished machines are kept a while as tombstones, so a repeated
or late message still gets its answer (idempotency) and never re-creates a reservation.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from mell.common.messages import (
    MigrateAbort,
    MigrateAck,
    MigrateBlocks,
    MigrateCommit,
    MigrateReserve,
    MigrateStageEnd,
    PeerMessage,
    StartMigration,
)
from mell.workerd.engine.contract import MigratableEngine
from mell.workerd.migration.incoming import IncomingMigration
from mell.workerd.migration.outgoing import OutgoingMigration, OutState
from mell.workerd.migration.port import Port
from mell.workerd.migration.settings import MigrationSettings

log = structlog.get_logger("mell.workerd.migration")
TOMBSTONE_S = 60.0


class MigrationHub:
    def __init__(
        self,
        engine: MigratableEngine,
        port: Port,
        worker_id: str,
        self_address: str,
        settings: MigrationSettings | None = None,
        accepting: Callable[[], bool] = lambda: True,
        moved_out: Callable[[str], None] = lambda rid: None,
        moved_in: Callable[[str, int], None] = lambda rid, n: None,
    ) -> None:
        self.engine, self.port = engine, port
        self.worker_id, self.self_address = worker_id, self_address
        self.settings = settings or MigrationSettings()
        self.accepting, self.moved_out, self.moved_in = accepting, moved_out, moved_in
        self.outgoing: dict[str, OutgoingMigration] = {}
        self.incoming: dict[str, IncomingMigration] = {}
        self._ended: dict[str, float] = {}  # finished machine id -> when (tombstones)
        self._settled: set[str] = set()

    @property
    def busy(self) -> bool:
        """Some migration waits for something (the engine loop must not sleep long)."""
        return any(not m.done for m in self.outgoing.values()) or any(
            not m.done for m in self.incoming.values()
        )

    def migrating(self, request_id: str) -> bool:
        return any(m.request_id == request_id and not m.done for m in self.outgoing.values())

    # ------------------------------------------------------------ source

    def start(self, start: StartMigration, now: float | None = None) -> str | None:
        """Begin migrating a request away; None when started, else why not."""
        if start.kind not in ("kv", "tokens"):
            return f"unknown migration kind {start.kind!r}"
        if start.migration_id in self.outgoing:
            return None  # a repeat
        if self.engine.request_state(start.request_id) is None:
            return f"request {start.request_id!r} is not here"
        if self.migrating(start.request_id):
            return f"request {start.request_id!r} is already migrating"
        m = OutgoingMigration(
            start, self.engine, self.port, self.settings, self.self_address, self.worker_id
        )
        self.outgoing[m.id] = m
        m.begin(time.monotonic() if now is None else now)
        self._settle(m)
        return None

    def cancel(self, migration_id: str, reason: str) -> None:
        m = self.outgoing.get(migration_id)
        if m is not None and m.state < OutState.COMMITTING:
            m.abort(reason)

    # ------------------------------------------------------------ peer messages

    def handle(
        self, message: PeerMessage, frames: list[memoryview], now: float | None = None
    ) -> None:
        now = time.monotonic() if now is None else now
        match message:
            case MigrateAck():
                out = self.outgoing.get(message.migration_id)
                if out is not None:
                    out.on_ack(message, now)
                    self._settle(out)
            case MigrateReserve():
                self._incoming(message.migration_id, message.reply_to).reserve(
                    message, self.accepting(), now
                )
            case MigrateBlocks():
                if (into := self.incoming.get(message.migration_id)) is not None:
                    into.write(message, frames, now)
            case MigrateStageEnd():
                if (into := self.incoming.get(message.migration_id)) is not None:
                    into.stage_end(message, now)
            case MigrateCommit():
                into = self._incoming(message.migration_id, message.reply_to)
                if into.commit(message, self.accepting()):
                    r = message.request
                    self.moved_in(r.request_id, len(r.prompt_token_ids) + len(r.output_token_ids))
            case MigrateAbort():
                if (into := self.incoming.get(message.migration_id)) is not None:
                    into.abort(message.reason)
            case _:
                pass  # probes are the boundaries' business

    def take_blocks(self, message: PeerMessage, frames: list[memoryview], now: float) -> bool:
        """On the I/O thread, as KV arrives: write `MigrateBlocks` into the reserved blocks at
        once, however long the engine's step (under the migration's lock, which the engine
        thread takes to release or import a reservation); True when it was one. Any other
        message: False, and the engine thread gets it in order, after the blocks before it."""
        if not isinstance(message, MigrateBlocks):
            return False
        into = self.incoming.get(message.migration_id)
        if into is not None:
            try:
                into.write(message, frames, now)
            except Exception:  # the stage's frame count will not match: the source aborts
                log.exception("migrate_blocks_failed", migration_id=message.migration_id)
        return True

    def poll(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for out in list(self.outgoing.values()):
            out.poll(now)
            self._settle(out)
        for into in self.incoming.values():
            into.poll(now)
        for table in (self.outgoing, self.incoming):
            for mid in [mid for mid, m in table.items() if m.done]:
                ended = self._ended.setdefault(mid, now)
                if now - ended > TOMBSTONE_S:
                    del table[mid]
                    self._ended.pop(mid, None)
                    self._settled.discard(mid)

    def abort_all(self, reason: str) -> None:
        for out in self.outgoing.values():
            if out.state < OutState.COMMITTING:
                out.abort(reason)
        for into in self.incoming.values():
            into.abort(reason)

    # ------------------------------------------------------------ helpers

    def _incoming(self, migration_id: str, reply_to: str) -> IncomingMigration:
        m = self.incoming.get(migration_id)
        if m is None:
            m = IncomingMigration(
                migration_id, reply_to, self.engine, self.port, self.settings.incoming_timeout_s
            )
            self.incoming[migration_id] = m
        return m

    def _settle(self, m: OutgoingMigration) -> None:
        if m.state == OutState.COMMITTED and m.id not in self._settled:
            self._settled.add(m.id)
            self.moved_out(m.request_id)
