"""The journal directory on disk: its writer lock, its fsync, and the check of its newest
segment at open time (a torn last record is truncated)."""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from mell.common.errors import JournalInUse
from mell.gateway.journal.format import SEGMENT_HEADER, list_segments, segment_first_seq
from mell.gateway.journal.reader import SegmentEnd, TornTail, segment_frames

log = logging.getLogger("mell.journal")

LOCK_FILE = "LOCK"


def lock_directory(directory: Path) -> int:
    """Take the journal's writer lock (one writer per directory); returns the lock fd."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise JournalInUse(
            f"journal {directory} is in use: locked by another process (a gateway already running "
            "on this data directory?)"
        ) from None
    return fd


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover_tail(directory: Path) -> tuple[int, int | None, TornTail | None]:
    """Validate the newest segment, truncate a torn tail; (next seq, open segment, torn)."""
    segments = list_segments(directory)
    if not segments:
        return 1, None, None
    path = segments[-1]
    named = segment_first_seq(path.name) or 1
    data = path.read_bytes()
    end = SegmentEnd(0, named)
    for _ in segment_frames(path, data, named, last=True, end=end):
        pass
    torn = end.torn
    if torn is not None:
        log.warning(
            "journal segment %s: torn last record at offset %d (%d bytes: %s), truncated",
            torn.segment,
            torn.offset,
            torn.nbytes,
            torn.reason,
        )
        if end.valid_end < SEGMENT_HEADER.size:  # not even a header: the file holds nothing
            path.unlink()
            fsync_directory(directory)
            return end.next_seq, None, torn
        with path.open("r+b") as f:
            f.truncate(end.valid_end)
            os.fsync(f.fileno())
    return end.next_seq, named, torn
