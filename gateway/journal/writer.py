"""The journal writer: appends without blocking on the disk, fsyncs in groups.

Threads. One *producer* thread (the gateway's event loop thread) calls `append` and
`write_snapshot`; they are not safe to call from two threads at once, and they take no lock:
`append` frames the record into an in-memory buffer and returns. A *flusher* thread wakes every
`fsync_interval_s`, writes what was buffered and fsyncs once for all of it (group commit), then
wakes the waiters of `wait_durable` / `durable`. `flush`, `wait_durable`, `durable`, `last_seq`,
`durable_seq` and `close` may be called from any thread.

The producer and the flusher share only a bytearray per segment: the producer appends whole
byte strings at its end, the flusher copies a prefix and deletes it. Each of those is one C call
made while holding the GIL, so a record is never lost or doubled between them (this relies on
the GIL: a free-threaded CPython build would need a lock here); a record may be written in two
parts, which on disk looks like a torn tail until the rest follows.

Start-up cost: `open` reads and checks the newest segment (up to `segment_bytes`); replay reads
from the last snapshot on.

Policies (`JournalConfig.fsync`):
- "interval": records are durable within about `fsync_interval_s` (plus the fsync itself);
  `await journal.durable(seq)` waits for a given record, `flush()` forces it now.
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
import zlib
from collections import deque
from pathlib import Path

from mell.common.config import JournalConfig
from mell.common.errors import JournalError
from mell.gateway.journal.format import (
    BODY_PREFIX,
    MAX_RECORD_BYTES,
    RECORD_HEADER,
    RECORD_MAGIC,
    SEGMENT_HEADER,
    Kind,
    encode_record,
    list_segments,
    segment_first_seq,
    segment_header,
    segment_name,
)
from mell.gateway.journal.reader import SegmentEnd, TornTail, segment_frames

log = logging.getLogger("mell.journal")

LOCK_FILE = "LOCK"
_FRAME_OVERHEAD = RECORD_HEADER.size + BODY_PREFIX.size
MAX_PAYLOAD_BYTES = MAX_RECORD_BYTES - BODY_PREFIX.size
_pack_prefix = BODY_PREFIX.pack
_pack_header = RECORD_HEADER.pack
_crc32 = zlib.crc32
_now = time.time


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


class Journal:
    """An open journal directory; see the module doc for threads and policies."""

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
        self._sealed: deque[tuple[int, bytearray]] = deque()  # rotated-away buffers
        self._limit = config.max_pending_bytes if config.fsync != "always" else -1
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

    def append(self, payload: bytes) -> int:
        """Append one event record; returns its sequence number. Never waits for the disk
        under the "interval" and "never" policies (unless max_pending_bytes is exceeded)."""
        seq = self._next_seq
        n = len(payload)
        room = self._seg_room - _FRAME_OVERHEAD - n
        if room < 0:
            room = self._make_room(seq, n)
        body = _pack_prefix(0x94, 1, 0xCF, seq, 0xCB, _now(), 0xC6, n) + payload
        buf = self._buf
        buf += _pack_header(RECORD_MAGIC, 25 + n, _crc32(body))
        buf += body
        self._seg_room = room
        self._next_seq = seq + 1
        if len(buf) > self._limit:
            self._slow_path()
        return seq

    def write_snapshot(self, payload: bytes) -> int:
        """Append a snapshot record as the first record of a new segment; returns its seq.

        Once it is durable, segments older than it beyond `retain_segments` are removed, and
        start-up replay begins at it.
        """
        seq = self._next_seq
        if self._seg_room < self._seg_capacity:  # the segment holds records: start a new one
            self._rotate(seq)
        frame = encode_record(Kind.SNAPSHOT, seq, _now(), payload)
        buf = self._buf
        buf += frame
        self._seg_room -= len(frame)
        self._retain_after = seq
        self._next_seq = seq + 1
        if len(buf) > self._limit:
            self._slow_path()
        return seq

    def _make_room(self, seq: int, n: int) -> int:
        """The record does not fit the current segment: rotate unless it is empty."""
        if n > MAX_PAYLOAD_BYTES:
            raise JournalError(f"journal record of {n} bytes is over the limit")
        if self._seg_room < self._seg_capacity:
            self._rotate(seq)
        return self._seg_room - _FRAME_OVERHEAD - n

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
        if self._error is not None:
            raise self._error
        if self._closed:
            raise JournalError("journal is closed")
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
        while not self._closed:
            self._wake.wait(interval)
            if self._closed:
                return
            with self._io_lock:
                if self._error is not None:
                    return
                try:
                    self._sync()
                except JournalError:
                    return  # failed for good; _sync logged it and woke the waiters

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
            error = JournalError(f"journal {self.directory}: write failed: {err}")
            self._fail(error)
            raise error from None

    def _drain(self) -> int:
        """Write every buffered byte in order; returns the last seq wholly written."""
        appended = self._next_seq - 1  # read before the buffers: those records are in them
        while True:
            if self._sealed:
                seg, buf = self._sealed[0]
                self._write_buffer(seg, buf)
                self._sealed.popleft()
                continue
            seg, buf = self._cur
            if self._sealed:  # the producer rotated meanwhile: older bytes first
                continue
            self._write_buffer(seg, buf)
            return appended

    def _write_buffer(self, seg: int, buf: bytearray) -> None:
        if seg != self._fd_seq:
            self._open_segment(seg)
        n = len(buf)
        if n:
            data = buf[:n]
            del buf[:n]
            _write_all(self._fd, data)  # type: ignore[arg-type]

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
