"""Shared helpers of the journal tests."""

from __future__ import annotations

import shutil
from pathlib import Path

from mell.gateway.journal import Journal, JournalConfig, read_records
from mell.gateway.journal.format import Frame, iter_frames, list_segments

SMALL = JournalConfig(segment_bytes=4096, fsync_interval_s=0.005)


def payload(i: int) -> bytes:
    return b"event-%06d-" % i + bytes(i % 7)


def write(directory: Path, n: int, config: JournalConfig = SMALL, start: int = 0) -> list[int]:
    with Journal.open(directory, config) as journal:
        return [journal.append(payload(i)) for i in range(start, start + n)]


def payloads(directory: Path, **kwargs: object) -> list[bytes]:
    return [r.payload for r in read_records(directory, **kwargs) if r.kind == "event"]


def frames(path: Path) -> list[Frame]:
    out = [f for f in iter_frames(path.read_bytes()) if isinstance(f, Frame)]
    return out


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "LOCK").unlink(missing_ok=True)
    return dst


def last_segment(directory: Path) -> Path:
    return list_segments(directory)[-1]


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
