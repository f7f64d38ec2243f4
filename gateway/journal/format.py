"""On-disk format of the journal: segment files of length-prefixed, CRC-checked records.

A journal is a directory of segment files named after the sequence number of their first record,
`00000000000000000001.seg`, in order. A segment is a 16-byte header followed by records:

    segment header  <8s Q      magic b"MELLJN\\x00\\x01", first sequence number
    record header   <4s I I    magic b"\\x89MJR", body length, zlib.crc32(body)
    record body     MessagePack array [kind, seq, timestamp, payload]

The body is plain MessagePack (the writer always uses uint64 seq, float64 timestamp and bin32
payload so that it can pack it with one struct call; readers accept any encoding). The per-record
magic lets a reader find the next intact record after damage, which is how a torn tail (nothing
valid after it) is told from corruption in the middle (valid records after it).

The writer frames records with `append_record` and empties its buffers with `discard_prefix`:
those of the C extension `_frame` (built at install when a C compiler is there), else their
pure-Python twins `append_record_py` and `discard_prefix_py`, which produce the same bytes.

Record kinds: 1 event, 2 snapshot (always the first record of its segment), 3 lost — a marker
that `repair` writes where records could not be recovered; its payload is the MessagePack pair
[first, last] of the lost sequence numbers and its own seq is `first`.
"""

from __future__ import annotations

import re
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import msgspec

SEGMENT_SUFFIX = ".seg"
SEGMENT_MAGIC = b"MELLJN\x00\x01"
SEGMENT_HEADER = struct.Struct("<8sQ")
RECORD_MAGIC = b"\x89MJR"
RECORD_HEADER = struct.Struct("<4sII")
# MessagePack prefix of a body: fixarray(4), fixint kind, uint64 seq, float64 ts, bin32 length.
BODY_PREFIX = struct.Struct(">BBBQBdBI")
MAX_RECORD_BYTES = 1 << 28  # a body longer than this is damage, not a record
_NAME = re.compile(r"^(\d{20})\.seg$")

_crc32 = zlib.crc32
_decode_body = msgspec.msgpack.Decoder(tuple[int, int, float, bytes]).decode
_decode_range = msgspec.msgpack.Decoder(tuple[int, int]).decode


class Kind(IntEnum):
    EVENT = 1
    SNAPSHOT = 2
    LOST = 3


KIND_NAMES = {Kind.EVENT: "event", Kind.SNAPSHOT: "snapshot", Kind.LOST: "lost"}


@dataclass(frozen=True, slots=True)
class Record:
    """One record as read back: where it is and what it holds."""

    kind: str  # "event" | "snapshot" | "lost"
    seq: int
    timestamp: float  # wall-clock seconds when it was appended
    payload: bytes
    segment: str  # file name of its segment
    offset: int  # byte offset of its header in the segment

    def lost_range(self) -> tuple[int, int]:
        """For a "lost" marker: the first and last lost sequence numbers."""
        return decode_lost(self.payload)


@dataclass(frozen=True, slots=True)
class Damage:
    """Bytes at `offset` in a segment that are not a valid record."""

    offset: int
    reason: str


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{SEGMENT_SUFFIX}"


def segment_first_seq(name: str) -> int | None:
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def list_segments(directory: Path) -> list[Path]:
    """Segment files of `directory` in sequence order (other files are ignored)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if segment_first_seq(p.name) is not None)


def segment_header(first_seq: int) -> bytes:
    return SEGMENT_HEADER.pack(SEGMENT_MAGIC, first_seq)


def encode_record(kind: int, seq: int, timestamp: float, payload: bytes) -> bytes:
    """One framed record, header included (the writer's hot path inlines the same steps)."""
    prefix = BODY_PREFIX.pack(0x94, kind, 0xCF, seq, 0xCB, timestamp, 0xC6, len(payload))
    crc = _crc32(payload, _crc32(prefix))
    return RECORD_HEADER.pack(RECORD_MAGIC, len(prefix) + len(payload), crc) + prefix + payload


def append_record_py(
    buf: bytearray,
    kind: int,
    seq: int,
    payload: bytes | bytearray | memoryview,
    timestamp: float | None = None,
) -> int:
    """Frame one record onto the end of `buf` (one extend); returns len(buf) afterwards.

    `timestamp` None means time.time(). The pure-Python twin of `_frame.append_record`.
    """
    if timestamp is None:
        timestamp = time.time()
    body = BODY_PREFIX.pack(0x94, kind, 0xCF, seq, 0xCB, timestamp, 0xC6, len(payload)) + payload
    buf += RECORD_HEADER.pack(RECORD_MAGIC, len(body), _crc32(body)) + body
    return len(buf)


def discard_prefix_py(buf: bytearray, n: int) -> None:
    """Delete the first `n` bytes of `buf` (the twin of `_frame.discard_prefix`, which also keeps
    the buffer's memory for refilling)."""
    del buf[:n]


try:
    from mell.gateway.journal._frame import append_record as append_record
    from mell.gateway.journal._frame import discard_prefix as discard_prefix
except ImportError:  # the extension was not built (no C compiler at install): same bytes, slower
    append_record, discard_prefix = append_record_py, discard_prefix_py


def decode_lost(payload: bytes) -> tuple[int, int]:
    """The (first, last) lost sequence numbers of a lost marker's payload."""
    return _decode_range(payload)


def encode_lost(seq_first: int, seq_last: int, timestamp: float) -> bytes:
    payload = msgspec.msgpack.encode((seq_first, seq_last))
    return encode_record(Kind.LOST, seq_first, timestamp, payload)


def check_segment_header(data: bytes | memoryview, name: str) -> str | None:
    """None when the header is intact and matches the file name, else the reason."""
    if len(data) < SEGMENT_HEADER.size:
        return f"segment header cut short ({len(data)} of {SEGMENT_HEADER.size} bytes)"
    magic, first = SEGMENT_HEADER.unpack_from(data, 0)
    if magic != SEGMENT_MAGIC:
        return "not a mell journal segment (bad magic)"
    expected = segment_first_seq(name)
    if expected is not None and first != expected:
        return f"segment header says first seq {first}, file name says {expected}"
    return None


@dataclass(frozen=True, slots=True)
class Frame:
    """A valid record found at `offset`, ending at `end`."""

    offset: int
    end: int
    kind: int
    seq: int
    timestamp: float
    payload: bytes


def parse_frame(data: bytes, offset: int) -> Frame | Damage:
    """The record starting at `offset`, or why there is none there."""
    size = len(data)
    if size - offset < RECORD_HEADER.size:
        return Damage(offset, f"record header cut short ({size - offset} bytes left)")
    magic, length, crc = RECORD_HEADER.unpack_from(data, offset)
    if magic != RECORD_MAGIC:
        return Damage(offset, "bad record magic")
    start = offset + RECORD_HEADER.size
    if length > MAX_RECORD_BYTES:
        return Damage(offset, f"record length {length} is over the limit")
    end = start + length
    if end > size:
        return Damage(offset, f"record cut short ({size - start} of {length} bytes)")
    body = data[start:end]
    if _crc32(body) != crc:
        return Damage(offset, "CRC mismatch")
    try:
        kind, seq, ts, payload = _decode_body(body)
    except msgspec.DecodeError as err:
        return Damage(offset, f"record body does not decode: {err}")
    if kind not in KIND_NAMES:
        return Damage(offset, f"unknown record kind {kind}")
    if kind == Kind.LOST:
        try:
            first, last = _decode_range(payload)
        except msgspec.DecodeError:
            first, last = -1, -2
        if first != seq or last < first:
            return Damage(offset, "malformed lost-records marker")
    return Frame(offset, end, kind, seq, ts, payload)


def iter_frames(data: bytes, offset: int = SEGMENT_HEADER.size) -> Iterator[Frame | Damage]:
    """Frames from `offset` on; a Damage, if any, is the last item."""
    size = len(data)
    while offset < size:
        item = parse_frame(data, offset)
        yield item
        if isinstance(item, Damage):
            return
        offset = item.end


def resync(data: bytes, after: int) -> Frame | None:
    """The first valid record that starts after offset `after`, if any."""
    pos = data.find(RECORD_MAGIC, after + 1)
    while pos != -1:
        item = parse_frame(data, pos)
        if isinstance(item, Frame):
            return item
        pos = data.find(RECORD_MAGIC, pos + 1)
    return None
