"""The producer's side of the journal writer: its state and `append`, in C or in Python.

`Appender` is `_frame.Appender` (one C call per event) when the optional extension was built,
else `PyAppender`; `writer.Journal` derives from it and supplies the slow paths.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mell.gateway.journal.format import BODY_PREFIX, RECORD_HEADER, append_record

FRAME_OVERHEAD = RECORD_HEADER.size + BODY_PREFIX.size  # bytes of a record besides its payload


class PyAppender:
    """The producer's state and `append`, in Python: the twin of `_frame.Appender`, which does
    the same in one C call and calls `_append_slow` (this `append`) when the segment is full.
    A base class of `Journal`, which provides `_make_room` and `_slow_path`."""

    _buf: bytearray  # the current buffer
    _next_seq: int
    _seg_room: int  # bytes the current segment may still take
    _limit: int  # past this len(_buf), `_slow_path`

    def append(self, payload: bytes) -> int:
        """Append one event record; returns its sequence number. Never waits for the disk
        under the "interval" and "never" policies (unless max_pending_bytes is exceeded)."""
        seq = self._next_seq
        room = self._seg_room - FRAME_OVERHEAD - len(payload)
        if room < 0:
            room = self._make_room(seq, len(payload))
        size = append_record(self._buf, 1, seq, payload)  # framed and appended in one call
        self._seg_room = room
        self._next_seq = seq + 1  # after the record is in the buffer: the flusher relies on it
        if size > self._limit:
            self._slow_path()
        return seq

    def _make_room(self, seq: int, n: int) -> int:
        """The record `seq` of an `n`-byte payload does not fit the current segment: make
        room (the subclass rotates); returns the segment's room left after it."""
        raise NotImplementedError

    def _slow_path(self) -> None:
        """The current buffer is past `_limit` (the subclass seals, writes or raises)."""
        raise NotImplementedError


if TYPE_CHECKING:  # the type checker reads the Python twin (`_frame.pyi`: the same members)
    Appender = PyAppender
else:
    try:
        from mell.gateway.journal._frame import Appender
    except ImportError:  # the extension was not built: the same records, slower
        Appender = PyAppender
