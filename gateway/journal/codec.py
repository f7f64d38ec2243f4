"""Event envelopes as journal records.

The journal itself stores opaque bytes; the gateway's records are `EventEnvelope`s encoded as
MessagePack by msgspec (`mell.common.events`). This module is the one place that joins the two:
an append hook for `ClusterState`, and readers that decode records back into envelopes, naming
the segment and offset of a record that is intact on disk but is not an envelope.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import msgspec

from mell.common.events import EventEnvelope, decode_envelope, encode_envelope
from mell.gateway.journal.format import Record
from mell.gateway.journal.reader import CorruptRecord, read_records
from mell.gateway.journal.writer import Journal

encode = encode_envelope


def decode(record: Record) -> EventEnvelope:
    """The envelope in an event record; CorruptRecord (a JournalError) when it is not one."""
    try:
        return decode_envelope(record.payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        raise CorruptRecord(
            record.segment, record.offset, f"record {record.seq} is not an event envelope: {err}"
        ) from None


def journal_hook(journal: Journal) -> Callable[[EventEnvelope], int]:
    """An append hook for `ClusterState.add_append_hook`: journals each envelope (returns seq)."""
    append = journal.append

    def hook(envelope: EventEnvelope) -> int:
        return append(encode_envelope(envelope))

    return hook


def envelopes(records: Iterable[Record]) -> Iterator[tuple[Record, EventEnvelope]]:
    """The event records among `records`, each with its decoded envelope (snapshots skipped)."""
    for record in records:
        if record.kind == "event":
            yield record, decode(record)


def read_envelopes(
    directory: Path | str, *, from_snapshot: bool = False
) -> Iterator[tuple[Record, EventEnvelope]]:
    """Every event of a journal directory in order, decoded."""
    return envelopes(read_records(Path(directory), from_snapshot=from_snapshot))
