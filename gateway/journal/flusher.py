"""The journal's flusher: the thread that writes what the producer buffered and fsyncs it in
groups (group commit), and the durability every other thread waits on.

The producer (`writer.Journal`) hands buffers over through the flusher's `sealed` queue and its
`current` buffer, and takes emptied buffers back from `spare` (see `writer` for the threads
and why no lock is needed between the producer and the flusher). Everything that touches the
segment files runs under `lock`: the flusher thread, `flush` from any thread, and the
producer's own writes under the "always" policy or past `max_pending_bytes`.

If a write or fsync fails the flusher is failed for good (after a failed fsync the kernel may
have dropped the dirty pages): `error` is set, the waiters are woken with it, and `on_fail`
tells the producer to stop taking its fast path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from mell.common.config import JournalConfig
from mell.common.errors import JournalError
from mell.gateway.journal.directory import fsync_directory
from mell.gateway.journal.format import (
    discard_prefix,
    list_segments,
    segment_first_seq,
    segment_name,
)

log = logging.getLogger("mell.journal")

CHUNK_BYTES = 1 << 20  # the producer seals its buffer for the flusher past this size
_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024) if hasattr(os, "sysconf") else 16
SPARE_BUFFERS = 8  # emptied sealed buffers kept for the producer to refill

_Waiter = tuple[int, asyncio.AbstractEventLoop, "asyncio.Future[None]"]


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
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


class Flusher:
    """Writes a journal's buffers to its segment files and makes them durable.

    `appended()` is the producer's last seq: every record up to it is in `sealed` or
    `current` when it is read. `on_fail` is called (under the waiters' lock) when the flusher
    fails, the close included."""

    def __init__(
        self,
        directory: Path,
        config: JournalConfig,
        appended: Callable[[], int],
        on_fail: Callable[[], None],
    ) -> None:
        self.directory = directory
        self.config = config
        self._appended = appended
        self._on_fail = on_fail
        # handed over by the producer
        self.current: tuple[int, bytearray] = (0, bytearray())  # (segment first seq, buffer)
        self.sealed: deque[tuple[int, bytearray]] = deque()  # buffers the producer let go
        self.spare: deque[bytearray] = deque()  # written and emptied, for the producer
        self.retain_after = 0  # snapshot seq whose durability triggers retention
        # the disk side, under `lock`
        self.lock = threading.Lock()
        self._fd: int | None = None
        self._fd_seq = 0
        self._dir_dirty = False
        # durability, under `_cond`
        self.durable_seq = 0  # every record up to this one is on disk
        self.error: JournalError | None = None
        self._cond = threading.Condition()
        self._waiters: list[_Waiter] = []
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- life -------------------------------------------------------------------------------

    def reopen(self, seg: int) -> None:
        """Append to the existing segment `seg` (open time); fsync what a killed writer left
        in the page cache: durable now."""
        path = self.directory / segment_name(seg)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        os.fsync(self._fd)
        self._fd_seq = seg

    def create_first(self) -> None:
        """Write the current buffer, creating its segment, and fsync it and the directory
        (open time: later segments are created by the flusher)."""
        with self.lock:
            self.drain()
            os.fsync(self._require_fd())
            fsync_directory(self.directory)
            self._dir_dirty = False

    def start(self) -> None:
        """Start the flusher thread (not under the "always" policy: the producer writes)."""
        self._thread = threading.Thread(target=self._run, name="journal-flusher", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """A buffer was sealed: write it now (the fsync still waits for the interval)."""
        self._wake.set()

    def stop(self) -> None:
        """Stop the thread and wait for it; what is buffered stays for `flush`."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def close_file(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- any thread -------------------------------------------------------------------------

    def flush(self, *, force: bool = False) -> int:
        """Write and fsync everything appended so far, now; returns the durable seq. With
        `force`, fsync even when nothing new was written."""
        with self.lock:
            self._sync(force=force)
        return self.durable_seq

    def wait_durable(self, seq: int, timeout: float | None = None) -> bool:
        """Block until record `seq` is durable; False on timeout. Raises if the journal failed."""
        with self._cond:
            self._cond.wait_for(lambda: self.durable_seq >= seq or bool(self.error), timeout)
        if self.durable_seq >= seq:
            return True
        if self.error is not None:
            raise self.error
        return False

    async def durable(self, seq: int) -> None:
        """Wait, without blocking the event loop, until record `seq` is durable."""
        if self.durable_seq >= seq:
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._cond:
            if self.error is not None:
                raise self.error
            if self.durable_seq >= seq:
                return
            self._waiters.append((seq, loop, fut))
        await fut

    def fail(self, error: JournalError, *, log_it: bool = True) -> None:
        """Fail for good with `error`: wake every waiter with it; `on_fail`."""
        if log_it:
            log.error("%s", error.message)
        with self._cond:
            self.error = error
            self._on_fail()
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for _, loop, fut in waiters:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, fut, error)

    # -- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        interval = self.config.fsync_interval_s
        deadline = time.monotonic() + interval
        while not self._stopping:
            self._wake.wait(max(deadline - time.monotonic(), 0.0))
            self._wake.clear()
            if self._stopping:
                return
            commit = time.monotonic() >= deadline
            if not self._flush_once(commit):
                return
            if commit:
                deadline = time.monotonic() + interval

    def _flush_once(self, commit: bool) -> bool:
        """Commit (write and fsync) or, woken for a sealed buffer, only write the sealed
        buffers; False once failed."""
        with self.lock:
            if self.error is not None:
                return False
            try:
                if commit:
                    self._sync()
                else:
                    self._write_sealed()
            except JournalError:
                return False  # failed for good; it was logged and the waiters woken
        return True

    # -- writing (under `lock`) -------------------------------------------------------------

    def _sync(self, *, force: bool = False) -> None:
        if self.error is not None:
            raise self.error
        try:
            appended = self.drain()
            if appended > self.durable_seq or force:
                if self.config.fsync != "never":
                    os.fdatasync(self._require_fd())
                    if self._dir_dirty:
                        fsync_directory(self.directory)
                        self._dir_dirty = False
                self._publish(appended)
            if self.retain_after and self.durable_seq >= self.retain_after:
                self._apply_retention(self.retain_after)
                self.retain_after = 0
        except OSError as err:
            raise self._write_failed(err) from None

    def _write_sealed(self) -> None:
        try:
            self._write_sealed_buffers()
        except OSError as err:
            raise self._write_failed(err) from None

    def _write_failed(self, err: OSError) -> JournalError:
        error = JournalError(f"journal {self.directory}: write failed: {err}")
        self.fail(error)
        return error

    def drain(self) -> int:
        """Write every buffered byte in order; returns the last seq wholly written."""
        appended = self._appended()  # read before the buffers: those records are in them
        while True:
            self._write_sealed_buffers()
            seg, buf = self.current
            if self.sealed:  # the producer sealed meanwhile: older bytes first
                continue
            if seg != self._fd_seq:
                self._open_segment(seg)
            n = len(buf)
            if n:  # the producer appends to it meanwhile: write a copy of what it holds now
                data = buf[:n]
                discard_prefix(buf, n)
                _write_all(self._require_fd(), data)
            return appended

    def _write_sealed_buffers(self) -> None:
        """Write the sealed buffers as they are (only this thread holds them), one writev per
        segment, then give them back to the producer to refill. Few calls matter: each one
        waits for the GIL, which the producer may hold for up to sys.getswitchinterval()."""
        sealed = self.sealed
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
            _writev_all(self._require_fd(), bufs)
            spare = self.spare
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

    def _require_fd(self) -> int:
        """The open segment's fd (there is one once a segment was opened or created)."""
        if self._fd is None:
            raise JournalError(f"journal {self.directory}: no segment is open")
        return self._fd

    def _publish(self, seq: int) -> None:
        with self._cond:
            self.durable_seq = max(self.durable_seq, seq)
            self._cond.notify_all()
            ready = [w for w in self._waiters if w[0] <= self.durable_seq]
            self._waiters = [w for w in self._waiters if w[0] > self.durable_seq]
        for _, loop, fut in ready:
            with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits
                loop.call_soon_threadsafe(_resolve, fut, None)

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


def _resolve(fut: asyncio.Future[None], error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)
