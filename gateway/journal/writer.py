"""The journal writer: appends without blocking on the disk, fsyncs in groups.

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

import asyncio
import contextlib
import fcntl
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path

from mell.common.config import JournalConfig
from mell.common.errors import JournalError
from mell.gateway.journal.appender import FRAME_OVERHEAD, Appender, PyAppender
from mell.gateway.journal.format import (
    BODY_PREFIX,
    MAX_RECORD_BYTES,
    SEGMENT_HEADER,
    Kind,
    append_record,
    discard_prefix,
    list_segments,
    segment_first_seq,
    segment_header,
    segment_name,
)
from mell.gateway.journal.reader import SegmentEnd, TornTail, segment_frames

log = logging.getLogger("mell.journal")

LOCK_FILE = "LOCK"
MAX_PAYLOAD_BYTES = MAX_RECORD_BYTES - BODY_PREFIX.size
CHUNK_BYTES = 1 << 20  # the producer seals its buffer for the flusher past this size
_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024) if hasattr(os, "sysconf") else 16
SPARE_BUFFERS = 8  # emptied sealed buffers kept for the producer to refill


def lock_directory(directory: Path) -> int:
    """Take the journal's writer lock (one writer per directory); returns the lock fd."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise JournalError(f"journal {directory} is in use by another process") from None
    return fd


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _writev_all(fd: int, bufs: list[bytearray]) -> None:
    done = os.writev(fd, bufs)
    for buf in bufs:  # after a short write (rare for files), the rest one buffer at a time
        if done >= len(buf):
            done -= len(buf)
            continue
        _write_all(fd, memoryview(buf)[done:])
        done = 0


def _recover_tail(directory: Path) -> tuple[int, int | None, TornTail | None]:
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


class Journal(Appender):  # type: ignore[valid-type,misc]
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
        self._cur: tuple[int, bytearray] = (0, self._buf)  # (segment first seq, its buffer)
        self._sealed: deque[tuple[int, bytearray]] = deque()  # buffers handed to the flusher
        self._spare: deque[bytearray] = deque()  # written and emptied by the flusher
        chunk = min(CHUNK_BYTES, config.max_pending_bytes)
        self._max_sealed = max(1, config.max_pending_bytes // max(chunk, 1))
        # append takes the slow path once the current buffer is past this (always, when -1)
        self._limit = chunk if config.fsync != "always" else -1
        self._retain_after = 0  # snapshot seq whose durability triggers retention
        # flusher side
        self._io_lock = threading.Lock()
        self._fd: int | None = None
        self._fd_seq = 0
        self._dir_dirty = False
        self._durable_seq = 0
        self._error: JournalError | None = None
        self._cond = threading.Condition()
        self._waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None

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
            next_seq, seg, self.truncated = _recover_tail(directory)
            self._next_seq = next_seq
            self._durable_seq = next_seq - 1
            if seg is None:
                self._new_segment(next_seq)
            else:
                path = directory / segment_name(seg)
                size = path.stat().st_size
                self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
                os.fsync(self._fd)  # what a killed writer left in the page cache: durable now
                self._fd_seq = seg
                self._buf = bytearray()
                self._cur = (seg, self._buf)
                self._seg_room = config.segment_bytes - size
        except BaseException:
            self._release()
            raise
        if config.fsync != "always":
            self._thread = threading.Thread(target=self._run, name="journal-flusher", daemon=True)
            self._thread.start()
        return self

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
        self._retain_after = seq
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
        self._sealed.append(self._cur)
        self._start_buffer(first_seq)

    def _start_buffer(self, first_seq: int) -> None:
        self._buf = bytearray(segment_header(first_seq))
        self._cur = (first_seq, self._buf)
        self._seg_room = self._seg_capacity

    def _new_segment(self, first_seq: int) -> None:
        """Create the first segment at open time (the flusher creates later ones)."""
        self._start_buffer(first_seq)
        with self._io_lock:
            self._drain()
            os.fsync(self._fd)  # type: ignore[arg-type]
            fsync_directory(self.directory)
            self._dir_dirty = False

    def _slow_path(self) -> None:
        """The current buffer is past `_limit`: raise if failed or closed; under "always" write
        and fsync now; else seal the buffer, and write and fsync if too much is pending."""
        if self._error is not None:
            raise self._error
        if self._closed:
            raise JournalError("journal is closed")
        if self._limit >= 0:
            self._sealed.append(self._cur)
            self._buf = self._spare.pop() if self._spare else bytearray()  # only we pop
            self._cur = (self._cur[0], self._buf)
            if len(self._sealed) < self._max_sealed:
                self._wake.set()  # the flusher writes it now and fsyncs on its interval
                return
        self.flush()

    # -- any thread -------------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """Sequence number of the last record appended (0 when none)."""
        return self._next_seq - 1

    @property
    def durable_seq(self) -> int:
        """Every record up to this one is on disk (fsynced, under the fsync policies)."""
        return self._durable_seq

    def flush(self) -> int:
        """Write and fsync everything appended so far, now; returns the durable seq."""
        with self._io_lock:
            self._sync()
        return self._durable_seq

    def wait_durable(self, seq: int, timeout: float | None = None) -> bool:
        """Block until record `seq` is durable; False on timeout. Raises if the journal failed."""
        with self._cond:
            self._cond.wait_for(lambda: self._durable_seq >= seq or bool(self._error), timeout)
        if self._durable_seq >= seq:
            return True
        if self._error is not None:
            raise self._error
        return False

    async def durable(self, seq: int) -> None:
        """Wait, without blocking the event loop, until record `seq` is durable."""
        if self._durable_seq >= seq:
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._cond:
            if self._error is not None:
                raise self._error
            if self._durable_seq >= seq:
                return
            self._waiters.append((seq, loop, fut))
        await fut

    def close(self) -> None:
        """Flush, fsync and release the directory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if self._error is None:
                with self._io_lock:
                    self._sync(force=self.config.fsync != "never")
        finally:
            self._release()
            if self._error is None:
                self._fail(JournalError("journal is closed"), log_it=False)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- flusher side (under _io_lock) ----------------------------------------------------

    def _run(self) -> None:
        interval = self.config.fsync_interval_s
        deadline = time.monotonic() + interval
        while not self._closed:
            self._wake.wait(max(deadline - time.monotonic(), 0.0))
            self._wake.clear()
            if self._closed:
                return
            commit = time.monotonic() >= deadline
            with self._io_lock:
                if self._error is not None:
                    return
                try:
                    if commit:
                        self._sync()
                    else:  # woken for a sealed buffer: write it now, fsync on the interval
                        self._write_sealed()
                except JournalError:
                    return  # failed for good; it was logged and the waiters woken
            if commit:
                deadline = time.monotonic() + interval

    def _sync(self, *, force: bool = False) -> None:
        if self._error is not None:
            raise self._error
        try:
            appended = self._drain()
            if appended > self._durable_seq or force:
                if self.config.fsync != "never":
                    os.fdatasync(self._fd)  # type: ignore[arg-type]
                    if self._dir_dirty:
                        fsync_directory(self.directory)
                        self._dir_dirty = False
                self._publish(appended)
            if self._retain_after and self._durable_seq >= self._retain_after:
                self._apply_retention(self._retain_after)
                self._retain_after = 0
        except OSError as err:
            raise self._write_failed(err) from None

    def _write_sealed(self) -> None:
        try:
            self._write_sealed_buffers()
        except OSError as err:
            raise self._write_failed(err) from None

    def _write_failed(self, err: OSError) -> JournalError:
        error = JournalError(f"journal {self.directory}: write failed: {err}")
        self._fail(error)
        return error

    def _drain(self) -> int:
        """Write every buffered byte in order; returns the last seq wholly written."""
        appended = self._next_seq - 1  # read before the buffers: those records are in them
        while True:
            self._write_sealed_buffers()
            seg, buf = self._cur
            if self._sealed:  # the producer sealed meanwhile: older bytes first
                continue
            if seg != self._fd_seq:
                self._open_segment(seg)
            n = len(buf)
            if n:  # the producer appends to it meanwhile: write a copy of what it holds now
                data = buf[:n]
                discard_prefix(buf, n)
                _write_all(self._fd, data)  # type: ignore[arg-type]
            return appended

    def _write_sealed_buffers(self) -> None:
        """Write the sealed buffers as they are (only this thread holds them), one writev per
        segment, then give them back to the producer to refill. Few calls matter: each one
        waits for the GIL, which the producer may hold for up to sys.getswitchinterval()."""
        sealed = self._sealed
        while sealed:
            seg = sealed[0][0]
            bufs = []
            for i in range(min(len(sealed), _IOV_MAX)):  # the producer appends at the right only
                buf_seg, buf = sealed[i]
                if buf_seg != seg:
                    break
                bufs.append(buf)
            if seg != self._fd_seq:
                self._open_segment(seg)
            _writev_all(self._fd, bufs)  # type: ignore[arg-type]
            spare = self._spare
            for buf in bufs:
                sealed.popleft()
                if len(spare) < SPARE_BUFFERS and len(buf) <= 2 * CHUNK_BYTES:
                    discard_prefix(buf, len(buf))
                    spare.append(buf)

    def _open_segment(self, seg: int) -> None:
        if self._fd is not None:
            if self.config.fsync != "never":
                os.fdatasync(self._fd)
            os.close(self._fd)
            self._fd = None
        path = self.directory / segment_name(seg)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        self._fd = os.open(path, flags, 0o644)
        self._fd_seq = seg
        self._dir_dirty = True

    def _publish(self, seq: int) -> None:
        with self._cond:
            self._durable_seq = max(self._durable_seq, seq)
            self._cond.notify_all()
            ready = [w for w in self._waiters if w[0] <= self._durable_seq]
            self._waiters = [w for w in self._waiters if w[0] > self._durable_seq]
        for _, loop, fut in ready:
            with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits
                loop.call_soon_threadsafe(_resolve, fut, None)

    def _fail(self, error: JournalError, *, log_it: bool = True) -> None:
        if log_it:
            log.error("%s", error.message)
        with self._cond:
            self._error = error
            self._limit = -1
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for _, loop, fut in waiters:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, fut, error)

    def _apply_retention(self, snapshot_seq: int) -> None:
        older = [
            p
            for p in list_segments(self.directory)
            if (segment_first_seq(p.name) or 0) < snapshot_seq
        ]
        keep = max(self.config.retain_segments, 0)
        doomed = older[: len(older) - keep] if keep else older
        for path in doomed:
            path.unlink(missing_ok=True)
        if doomed:
            fsync_directory(self.directory)
            log.info("journal: removed %d segments before snapshot %d", len(doomed), snapshot_seq)

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _resolve(fut: asyncio.Future[None], error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)
