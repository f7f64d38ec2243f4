"""Durable journal: append-only segment files of length-prefixed, CRC-checked MessagePack records.

Generic over opaque byte payloads (the gateway stores encoded event envelopes). See `format` for
the bytes on disk, `writer` for appending (`appender` its hot path), `flusher` for the thread that
writes and fsyncs in groups (group commit), `directory` for the writer lock and the start-up
check, `reader` for replay, `repair` for `check` and `repair`.
"""

from mell.gateway.journal.format import Record
from mell.gateway.journal.reader import (
    CorruptRecord,
    TornTail,
    read_records,
    replay,
    verify_before_snapshot,
)
from mell.gateway.journal.repair import CheckReport, Problem, RepairReport, check, repair
from mell.gateway.journal.writer import Journal, JournalConfig

__all__ = [
    "CheckReport",
    "CorruptRecord",
    "Journal",
    "JournalConfig",
    "Problem",
    "Record",
    "RepairReport",
    "TornTail",
    "check",
    "read_records",
    "repair",
    "replay",
    "verify_before_snapshot",
]
