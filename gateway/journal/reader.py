"""Reading a journal directory: start-up replay and full-history reads.

Readers never write. A torn last record (bytes at the end of the newest segment with no valid
record after them) is skipped with a warning; `Journal.open` is what truncates it. Any other
damage raises `CorruptRecord`, a `JournalError` that names the segment and the offset.
Readers take no lock: they may read a journal that a gateway is writing, and see its last record
as torn while it is being written.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mell.common.errors import JournalError
from mell.gateway.journal.format import (
    KIND_NAMES,
    MAX_RECORD_BYTES,
    RECORD_HEADER,
    SEGMENT_HEADER,
    Damage,
    Frame,
    Kind,
    Record,
    check_segment_header,
    decode_lost,
    iter_frames,
    list_segments,
    parse_frame,
    resync,
    segment_first_seq,
)

log = logging.getLogger("mell.journal")
_FIRST = SEGMENT_HEADER.size + RECORD_HEADER.size  # bytes up to the first record's body


class CorruptRecord(JournalError):
    """Damage that is not a torn tail; start-up stops here until `mellctl journal repair`."""

    def __init__(self, segment: str, offset: int, reason: str) -> None:
        super().__init__(
            f"journal segment {segment} at offset {offset}: {reason} "
            f"(run `mellctl journal check` / `mellctl journal repair`)"
        )
        self.segment = segment
        self.offset = offset
        self.reason = reason


@dataclass(frozen=True, slots=True)
class TornTail:
    """Bytes at the end of the newest segment that hold no complete record."""

    segment: str
    offset: int  # where the valid part ends
    size: int  # the segment's size on disk
    reason: str

    @property
    def nbytes(self) -> int:
        return self.size - self.offset


@dataclass(slots=True)
class SegmentEnd:
    """What reading one segment found: where its valid part ends and the next expected seq."""

    valid_end: int
    next_seq: int
    torn: TornTail | None = None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise JournalError(f"journal segment {path.name} disappeared while reading") from None
    except OSError as err:
        raise JournalError(f"journal segment {path.name}: cannot read: {err.strerror}") from None


def _damage(path: Path, data: bytes, damage: Damage, *, last: bool) -> TornTail:
    """Classify damage: a TornTail when it is the newest segment's end, else raise."""
    if last:
        later = resync(data, damage.offset)
        if later is None:
            return TornTail(path.name, damage.offset, len(data), damage.reason)
        raise CorruptRecord(
            path.name,
            damage.offset,
            f"{damage.reason}; valid records follow at offset {later.offset}",
        )
    raise CorruptRecord(path.name, damage.offset, damage.reason)


def segment_frames(
    path: Path, data: bytes, expected: int, *, last: bool, end: SegmentEnd
) -> Iterator[Frame]:
    """Valid frames of one segment, checking sequence order; fills `end` when exhausted."""
    end.next_seq = expected
    end.valid_end = min(len(data), SEGMENT_HEADER.size)
    reason = check_segment_header(data, path.name)
    if reason is not None:
        if last and resync(data, -1) is None:
            end.valid_end = 0
            end.torn = TornTail(path.name, 0, len(data), reason)
            return
        raise CorruptRecord(path.name, 0, reason)
    for item in iter_frames(data):
        if isinstance(item, Damage):
            end.torn = _damage(path, data, item, last=last)
            return
        if item.seq != expected:
            raise CorruptRecord(
                path.name, item.offset, f"sequence {item.seq} where {expected} was expected"
            )
        expected = _after(item)
        end.next_seq = expected
        end.valid_end = item.end
        yield item


def _after(frame: Frame) -> int:
    """The sequence number expected after `frame` (a lost marker skips its range)."""
    if frame.kind == Kind.LOST:
        return decode_lost(frame.payload)[1] + 1
    return frame.seq + 1


def _record(frame: Frame, segment: str) -> Record:
    return Record(
        KIND_NAMES[Kind(frame.kind)],
        frame.seq,
        frame.timestamp,
        frame.payload,
        segment,
        frame.offset,
    )


def first_frame(path: Path) -> Frame | Damage:
    """The first record of a segment, reading only as much of the file as it needs."""
    try:
        with path.open("rb") as f:
            head = f.read(_FIRST)
            if check_segment_header(head, path.name) is not None:
                return Damage(0, "bad segment header")
            item = parse_frame(head, SEGMENT_HEADER.size)
            if isinstance(item, Damage) and len(head) == _FIRST:
                _, length, _ = RECORD_HEADER.unpack_from(head, SEGMENT_HEADER.size)
                f.seek(0)
                item = parse_frame(
                    f.read(_FIRST + min(length, MAX_RECORD_BYTES)), SEGMENT_HEADER.size
                )
            return item
    except OSError as err:
        raise JournalError(f"journal segment {path.name}: cannot read: {err.strerror}") from None


def _start_index(segments: list[Path]) -> int:
    """Index of the newest segment that starts with an intact snapshot, else 0."""
    for i in range(len(segments) - 1, -1, -1):
        item = first_frame(segments[i])
        if isinstance(item, Frame) and item.kind == Kind.SNAPSHOT:
            return i
    return 0


def read_records(
    directory: Path, *, from_snapshot: bool = False, include_lost: bool = False
) -> Iterator[Record]:
    """Every record of the journal in order (or from the last snapshot on).

    Raises CorruptRecord at the first damage that is not a torn tail; a torn tail ends the
    iteration with a warning. Lost markers (left by `repair`) are logged and skipped unless
    `include_lost`.
    """
    directory = Path(directory)
    segments = list_segments(directory)
    if not segments:
        return
    start = _start_index(segments) if from_snapshot else 0
    expected = segment_first_seq(segments[start].name) or 0
    for i in range(start, len(segments)):
        path = segments[i]
        named = segment_first_seq(path.name) or 0
        if named != expected and i != start:
            raise CorruptRecord(
                path.name, 0, f"records {expected}..{named - 1} are missing before this segment"
            )
        last = i == len(segments) - 1
        end = SegmentEnd(0, expected)
        for frame in segment_frames(path, _read(path), named, last=last, end=end):
            if frame.kind == Kind.LOST:
                first, final = _record(frame, path.name).lost_range()
                log.warning("journal records %d..%d were lost (repaired journal)", first, final)
                if not include_lost:
                    continue
            yield _record(frame, path.name)
        if end.torn is not None:
            log.warning(
                "journal segment %s: torn last record at offset %d (%d bytes: %s), ignored",
                end.torn.segment,
                end.torn.offset,
                end.torn.nbytes,
                end.torn.reason,
            )
        expected = end.next_seq


def verify_before_snapshot(directory: Path) -> tuple[int, list[CorruptRecord]]:
    """Check the segments start-up replay skips (those before the newest one that begins with
    a snapshot): (how many were checked, the first damage found in each). The view does not
    need them, so their damage does not stop start-up; `mellctl journal repair` removes it."""
    segments = list_segments(Path(directory))
    start = _start_index(segments) if segments else 0
    damage: list[CorruptRecord] = []
    for path in segments[:start]:
        end = SegmentEnd(0, 0)
        named = segment_first_seq(path.name) or 0
        try:
            for _ in segment_frames(path, _read(path), named, last=False, end=end):
                pass
        except CorruptRecord as err:
            damage.append(err)
    return start, damage


def replay(directory: Path) -> Iterator[Record]:
    """Start-up replay: the last snapshot (if any), then every record after it."""
    return read_records(directory, from_snapshot=True)
