"""The journal writer: appends without blocking on the disk, fsyncs in groups.

This module is the producer's side (`Journal`: open, append, rotation, sealing, close); the
flusher thread and durability are `flusher.Flusher`'s, the directory's lock and start-up check
`directory`'s.

Threads. One *producer* thread (the gateway's event loop thread) calls `append` and
`write_snapshot`; they are not safe to call from two threads at once, and they take no lock:
`append` frames the record into an in-memory buffer and returns. A *flusher* thread wakes every
`fsync_interval_s`, writes what was buffered and fsyncs once for all of it (group commit), then
wakes the waiters of `wait_durable` / `durable`. `flush`, `wait_durable`, `durable`, `last_seq`,
`durable_seq` and `close` may be called from any thread.

Buffers. `append` is the base class's: `_frame.Appender` (C: checks the room left in the segment,
frames the record onto the end of the current bytearray, counts, in one call) when the optional
extension was built, else `PyAppender` (the same in Python); both leave rotation and the rest of
the slow path to the Journal. When the current buffer passes `CHUNK_BYTES`, or the segment
rotates, the producer *seals* it: queues it and never touches it again, and wakes the flusher,
which writes it right away (write-behind; the fsync still waits for the interval) as it is, without
copying, then hands it back emptied, its memory kept, for the producer to refill. Of the current
buffer the flusher copies a prefix and deletes it when it commits. Appending, copying and deleting
are each one C call made while holding the GIL, so a record is never lost, doubled or split
between the threads (this relies on the GIL: a free-threaded CPython build would need a lock).

Start-up cost: `open` reads and checks the newest segment (up to `segment_bytes`); replay reads
from the last snapshot on.

Policies (`JournalConfig.fsync`):
- "interval": records are durable within about `fsync_interval_s` (plus the fsync itself);
  `await journal.durable(seq)` waits for a given record, `flush()` forces it now. When about
  `max_pending_bytes` wait in sealed buffers, `append` writes and fsyncs them itself.
- "always": `append` writes and fsyncs before it returns (blocks the caller on the disk).
- "never": written on the interval, never fsynced (tests, throwaway clusters).

If a write or fsync fails the journal is failed for good (after a failed fsync the kernel may
have dropped the dirty pages): every later call raises JournalError and the process should
restart, replaying what is on disk.
"""

from __future__ import annotations

import os
from pathlib import Path

from mell.common.config import JournalConfig
from mell.common.errors import JournalError
from mell.gateway.journal.appender import FRAME_OVERHEAD, Appender, PyAppender
from mell.gateway.journal.directory import lock_directory, recover_tail
from mell.gateway.journal.flusher import CHUNK_BYTES, Flusher
from mell.gateway.journal.format import (
    BODY_PREFIX,
    MAX_RECORD_BYTES,
    SEGMENT_HEADER,
    Kind,
    append_record,
    segment_header,
    segment_name,
)
from mell.gateway.journal.reader import TornTail

__all__ = ["CHUNK_BYTES", "MAX_PAYLOAD_BYTES", "Journal", "JournalConfig"]

MAX_PAYLOAD_BYTES = MAX_RECORD_BYTES - BODY_PREFIX.size


class Journal(Appender):
    """An open journal directory; see the module doc for threads and policies.

    `append(payload) -> seq` comes from the base class (`_frame.Appender` or `PyAppender`)."""

    _append_slow = PyAppender.append

    def __init__(self, directory: Path, config: JournalConfig) -> None:
        """Use `Journal.open`."""
        self.directory = directory
        self.config = config
        self.truncated: TornTail | None = None  # what open() cut off, if anything
        self._lock_fd = -1
        self._next_seq = 1
        self._seg_capacity = config.segment_bytes - SEGMENT_HEADER.size
        self._seg_room = 0  # bytes the current segment may still take (< capacity: not empty)
        self._buf = bytearray()  # the current segment's buffer (producer's reference)
        self._flusher = Flusher(directory, config, self._last_appended, self._stop_fast_path)
        self._flusher.current = (0, self._buf)
        chunk = min(CHUNK_BYTES, config.max_pending_bytes)
        self._max_sealed = max(1, config.max_pending_bytes // max(chunk, 1))
        # append takes the slow path once the current buffer is past this (always, when -1)
        self._limit = chunk if config.fsync != "always" else -1
        self._closed = False

    @classmethod
    def open(cls, directory: Path | str, config: JournalConfig | None = None) -> Journal:
        """Open (creating if needed) for appending; truncates a torn last record; replays nothing.

        Raises CorruptRecord when the newest segment is damaged other than at its end, and
        JournalError when another process holds the directory.
        """
        config = config or JournalConfig()
        if not 4096 <= config.segment_bytes <= MAX_RECORD_BYTES or config.fsync_interval_s <= 0:
            raise JournalError(
                f"journal: segment_bytes must be in [4096, {MAX_RECORD_BYTES}] "
                "and fsync_interval_s > 0"
            )
        directory = Path(directory)
        self = cls(directory, config)
        self._lock_fd = lock_directory(directory)
        try:
            self._resume(directory)
        except BaseException:
            self._release()
            raise
        if config.fsync != "always":
            self._flusher.start()
        return self

    def _resume(self, directory: Path) -> None:
        """Continue the newest segment after its last whole record, or create the first."""
        next_seq, seg, self.truncated = recover_tail(directory)
        self._next_seq = next_seq
        self._flusher.durable_seq = next_seq - 1
        if seg is None:
            self._start_buffer(next_seq)
            self._flusher.create_first()
            return
        size = (directory / segment_name(seg)).stat().st_size
        self._flusher.reopen(seg)
        self._buf = bytearray()
        self._flusher.current = (seg, self._buf)
        self._seg_room = self.config.segment_bytes - size

    # -- producer side (one thread) -------------------------------------------------------

    def write_snapshot(self, payload: bytes) -> int:
        """Append a snapshot record as the first record of a new segment; returns its seq.

        Once it is durable, segments older than it beyond `retain_segments` are removed, and
        start-up replay begins at it.
        """
        seq = self._next_seq
        if self._seg_room < self._seg_capacity:  # the segment holds records: start a new one
            self._rotate(seq)
        size = append_record(self._buf, Kind.SNAPSHOT, seq, payload)
        self._seg_room -= FRAME_OVERHEAD + len(payload)
        self._flusher.retain_after = seq
        self._next_seq = seq + 1
        if size > self._limit:
            self._slow_path()
        return seq

    def _make_room(self, seq: int, n: int) -> int:
        """The record does not fit the current segment: rotate unless it is empty."""
        if n > MAX_PAYLOAD_BYTES:
            raise JournalError(f"journal record of {n} bytes is over the limit")
        if self._seg_room < self._seg_capacity:
            self._rotate(seq)
        return self._seg_room - FRAME_OVERHEAD - n

    def _rotate(self, first_seq: int) -> None:
        """Start a new segment at `first_seq`: seal the current buffer, then switch."""
        self._flusher.sealed.append(self._flusher.current)
        self._start_buffer(first_seq)

    def _start_buffer(self, first_seq: int) -> None:
        self._buf = bytearray(segment_header(first_seq))
        self._flusher.current = (first_seq, self._buf)
        self._seg_room = self._seg_capacity

    def _slow_path(self) -> None:
        """The current buffer is past `_limit`: raise if failed or closed; under "always" write
        and fsync now; else seal the buffer, and write and fsync if too much is pending."""
        flusher = self._flusher
        if flusher.error is not None:
            raise flusher.error
        if self._closed:
            raise JournalError("journal is closed")
        if self._limit >= 0:
            seg = flusher.current[0]
            flusher.sealed.append(flusher.current)
            self._buf = flusher.spare.pop() if flusher.spare else bytearray()  # only we pop
            flusher.current = (seg, self._buf)
            if len(flusher.sealed) < self._max_sealed:
                flusher.wake()  # the flusher writes it now and fsyncs on its interval
                return
        self.flush()

    def _last_appended(self) -> int:
        return self._next_seq - 1

    def _stop_fast_path(self) -> None:
        """The flusher failed (or the journal closed): every append takes `_slow_path`."""
        self._limit = -1

    # -- any thread -------------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """Sequence number of the last record appended (0 when none)."""
        return self._next_seq - 1

    @property
    def durable_seq(self) -> int:
        """Every record up to this one is on disk (fsynced, under the fsync policies)."""
        return self._flusher.durable_seq

    def flush(self) -> int:
        """Write and fsync everything appended so far, now; returns the durable seq."""
        return self._flusher.flush()

    def wait_durable(self, seq: int, timeout: float | None = None) -> bool:
        """Block until record `seq` is durable; False on timeout. Raises if the journal failed."""
        return self._flusher.wait_durable(seq, timeout)

    async def durable(self, seq: int) -> None:
        """Wait, without blocking the event loop, until record `seq` is durable."""
        await self._flusher.durable(seq)

    def close(self) -> None:
        """Flush, fsync and release the directory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        flusher = self._flusher
        flusher.stop()
        try:
            if flusher.error is None:
                flusher.flush(force=self.config.fsync != "never")
        finally:
            self._release()
            if flusher.error is None:
                flusher.fail(JournalError("journal is closed"), log_it=False)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _release(self) -> None:
        self._flusher.close_file()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
