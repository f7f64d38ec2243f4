"""The knobs of a live migration (`workerd/migration/`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MigrationSettings:
    last_stage_max_blocks: int = 16  # k: pause and copy the rest when at most this many remain
    max_stages: int = 4  # copy stages before the last one; more aborts the migration
    message_bytes: int = 4 << 20  # KV bytes per MigrateBlocks (the copy's pipelining grain)
    step_timeout_s: float = 5.0  # the source's deadline on every answer it waits for
    incoming_timeout_s: float = 10.0  # a destination frees a reservation its source left
