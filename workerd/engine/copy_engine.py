"""The copy engine: moves KV between the device pool and the host tier, off the step path.

A copy is one layer's share of one request: a *whole* span of blocks (or, for a prompt being
prefilled straight to the host, its freshly computed K/V rows), never block by block. On CPU it
is one gather and one scatter; on CUDA a gather into a contiguous buffer on the device and one
transfer per run of consecutive host blocks. Copies are asynchronous: `copy` returns a
`Ticket` at once, and nothing here synchronizes the device.

- `ThreadCopyEngine` (CPU): one worker thread runs copies in submission order (torch drops
  the GIL in `copy_`); an optional emulated link speed paces them (benchmarks).
- `CudaCopyEngine`: one stream per direction; each copy first waits for the compute stream
  (its source is what the step wrote), ends with an event; the compute stream waits on that
  event (`Ticket.wait`) before it reads what the copy wrote.

A copy's source and destination must stay untouched until its ticket is done: the caller fences
the blocks (block_manager.py) and the copy holds references to any staging tensors.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mell.workerd.engine.kv_cache import block_runs

_cuda: Any = torch.cuda  # (its Stream and Event are untyped)

D2H, H2D = "d2h", "h2d"


@dataclass(slots=True)
class Rows:
    """A copy's source that is not paged: K and V rows [tokens, kv heads, head dim] of one
    layer, to land at the start of the destination blocks (a prompt staged to the host)."""

    k: torch.Tensor
    v: torch.Tensor


class Ticket(ABC):
    """One submitted copy."""

    direction: str
    nbytes: int

    @abstractmethod
    def done(self) -> bool:
        """The copy has finished (never blocks)."""

    @abstractmethod
    def wait(self) -> None:
        """Make what the copy wrote visible to the step: on CPU the calling thread waits for
        this copy only; on CUDA the compute stream waits for its event (the host does not)."""

    @abstractmethod
    def join(self) -> None:
        """Block the calling thread until the copy is done (the host reads what it wrote: a
        migration sending host blocks); waits for this copy only, never the whole device."""


class CopyEngine(ABC):
    def __init__(self) -> None:
        self.bytes_moved = {D2H: 0, H2D: 0}

    @abstractmethod
    def copy(
        self,
        src: torch.Tensor | Rows,
        src_blocks: list[int],
        dst: torch.Tensor,
        dst_blocks: list[int],
        direction: str,
        after: Ticket | None = None,
    ) -> Ticket:
        """Copy blocks `src_blocks` of `src` (a paged layer tensor) into `dst_blocks` of `dst`,
        or `Rows` into the first blocks of `dst_blocks`; after `after` (a copy that must land
        first), if given."""

    def close(self) -> None:  # noqa: B027 (optional hook, no-op by default)
        """Stop (finishing the copies already submitted)."""


def _nbytes(src: torch.Tensor | Rows, n_blocks: int, dst: torch.Tensor) -> int:
    if isinstance(src, Rows):
        return 2 * src.k.numel() * src.k.element_size()
    return n_blocks * dst[0].numel() * dst.element_size()


def _rows_as_blocks(rows: Rows, num_blocks: int, block_size: int) -> torch.Tensor:
    """K/V rows as whole blocks [num_blocks, 2, block_size, kv heads, head dim], contiguous
    (the tail of the last block zero)."""
    k = rows.k
    out = torch.zeros((num_blocks, 2, block_size, *k.shape[1:]), dtype=k.dtype, device=k.device)
    n = k.shape[0]
    full, rest = divmod(n, block_size)
    for half, x in ((0, k), (1, rows.v)):
        if full:
            out[:full, half] = x[: full * block_size].view(full, block_size, *x.shape[1:])
        if rest:
            out[full, half, :rest] = x[full * block_size :]
    return out


# -- CPU ------------------------------------------------------------------------------------


class _ThreadTicket(Ticket):
    __slots__ = ("_event", "direction", "nbytes")

    def __init__(self, direction: str, nbytes: int) -> None:
        self.direction, self.nbytes = direction, nbytes
        self._event = threading.Event()

    def done(self) -> bool:
        return self._event.is_set()

    def wait(self) -> None:
        self._event.wait()

    def join(self) -> None:
        self._event.wait()


@dataclass(slots=True)
class _Job:
    run: Callable[[], None]
    ticket: _ThreadTicket
    after: Ticket | None = None
    keep: list[object] = field(default_factory=list)


class ThreadCopyEngine(CopyEngine):
    """CPU copies on one worker thread, in submission order; `link_bytes_per_s` > 0 paces
    them as a link of that speed would (a copy is done when the link would have delivered it)."""

    def __init__(self, link_bytes_per_s: float = 0.0) -> None:
        super().__init__()
        self.link_bytes_per_s = link_bytes_per_s
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._link_free_at = 0.0
        self._thread = threading.Thread(target=self._loop, name="kv-copy", daemon=True)
        self._thread.start()
        # Stopped when collected or at exit, if nobody called close().
        self._stop = weakref.finalize(self, _stop_thread, self._jobs, self._thread)

    def copy(
        self,
        src: torch.Tensor | Rows,
        src_blocks: list[int],
        dst: torch.Tensor,
        dst_blocks: list[int],
        direction: str,
        after: Ticket | None = None,
    ) -> Ticket:
        nbytes = _nbytes(src, len(dst_blocks), dst)
        ticket = _ThreadTicket(direction, nbytes)
        self.bytes_moved[direction] += nbytes
        if isinstance(src, Rows):
            rows = src

            def run() -> None:
                blocks = _rows_as_blocks(rows, len(dst_blocks), dst.shape[2])
                dst.index_copy_(0, torch.tensor(dst_blocks, dtype=torch.long), blocks)
        else:
            paged = src

            def run() -> None:
                index = torch.tensor(dst_blocks, dtype=torch.long)
                dst.index_copy_(0, index, paged.index_select(0, torch.tensor(src_blocks)))

        self._jobs.put(_Job(run, ticket, after))
        return ticket

    def close(self) -> None:
        self._stop()

    def _loop(self) -> None:
        with torch.inference_mode():
            while (job := self._jobs.get()) is not None:
                if job.after is not None:
                    job.after.wait()  # (FIFO already orders them; kept for clarity of contract)
                start = time.monotonic()
                job.run()
                if self.link_bytes_per_s > 0:
                    begin = max(start, self._link_free_at)
                    self._link_free_at = begin + job.ticket.nbytes / self.link_bytes_per_s
                    pause = self._link_free_at - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)
                job.ticket._event.set()


def _stop_thread(jobs: queue.SimpleQueue[_Job | None], thread: threading.Thread) -> None:
    jobs.put(None)
    if thread is not threading.current_thread():
        thread.join()


# -- CUDA -----------------------------------------------------------------------------------


class _CudaTicket(Ticket):
    __slots__ = ("_event", "_keep", "direction", "nbytes")

    def __init__(self, direction: str, nbytes: int, event: Any, keep: list[object]) -> None:
        self.direction, self.nbytes = direction, nbytes
        self._event = event
        self._keep = keep  # tensors the copy reads or writes, alive until it is done

    def done(self) -> bool:
        if self._event.query():
            self._keep = []
            return True
        return False

    def wait(self) -> None:
        torch.cuda.current_stream().wait_event(self._event)

    def join(self) -> None:
        self._event.synchronize()


class CudaCopyEngine(CopyEngine):
    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self._streams = {D2H: _cuda.Stream(device), H2D: _cuda.Stream(device)}

    def copy(
        self,
        src: torch.Tensor | Rows,
        src_blocks: list[int],
        dst: torch.Tensor,
        dst_blocks: list[int],
        direction: str,
        after: Ticket | None = None,
    ) -> Ticket:
        nbytes = _nbytes(src, len(dst_blocks), dst)
        self.bytes_moved[direction] += nbytes
        stream = self._streams[direction]
        stream.wait_stream(torch.cuda.current_stream(self.device))
        if isinstance(after, _CudaTicket):
            stream.wait_event(after._event)
        keep: list[object] = [dst]
        with torch.cuda.stream(stream):
            if direction == D2H:
                if isinstance(src, Rows):
                    src.k.record_stream(stream)
                    src.v.record_stream(stream)
                    keep += [src.k, src.v]
                    gathered = _rows_as_blocks(src, len(dst_blocks), dst.shape[2])
                else:  # one gather into a contiguous buffer on the device
                    gathered = src.index_select(0, self._index(src_blocks, keep))
                keep.append(gathered)
                for first, start, count in block_runs(dst_blocks):  # a transfer per host run
                    dst[start : start + count].copy_(
                        gathered[first : first + count], non_blocking=True
                    )
            else:
                assert isinstance(src, torch.Tensor)
                shape = (len(src_blocks), *src.shape[1:])
                staged = torch.empty(shape, dtype=src.dtype, device=self.device)
                for first, start, count in block_runs(src_blocks):  # a transfer per host run
                    staged[first : first + count].copy_(
                        src[start : start + count], non_blocking=True
                    )
                dst.index_copy_(0, self._index(dst_blocks, keep), staged)
                keep += [staged, src]
            event = _cuda.Event()
            event.record(stream)
        return _CudaTicket(direction, nbytes, event, keep)

    def _index(self, blocks: list[int], keep: list[object]) -> torch.Tensor:
        """Block ids on the device, sent from pinned memory (a pageable copy would wait for
        the stream, and so for the compute stream it follows)."""
        host = torch.tensor(blocks, dtype=torch.long).pin_memory()
        keep.append(host)
        return host.to(self.device, non_blocking=True)


def make_copy_engine(device: torch.device, link_bytes_per_s: float) -> CopyEngine:
    if device.type == "cuda":
        return CudaCopyEngine(device)
    return ThreadCopyEngine(link_bytes_per_s)
