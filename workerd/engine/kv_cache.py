"""The KV cache: one tensor per layer, [num_blocks, 2 (K, V), block_size, kv heads, head dim],
and its blocks as bytes (what a migration sends and receives).

The block manager decides which blocks a request holds; this module only stores them. On CPU
the cache is read and written through byte views of the tensors (plain memcpy: no per-element
kernels, no intra-op threads), so `write` may run on another thread than the engine's (the
worker's I/O thread writes KV as it arrives). On CUDA blocks go through pinned host memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import numpy.typing as npt
import torch

from mell.workerd.engine.contract import Frame
from mell.workerd.heap import give_back_free_memory
from mell.workerd.model.config import ModelConfig


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block in every layer (K and V)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * elem


class KVStorage(Protocol):
    """Where the layer tensors live when the pool is elastic (kv_memory.py): reserved for the
    most blocks, backed only below what was committed and not discarded."""

    tensors: list[torch.Tensor]

    def commit(self, num_blocks: int) -> None: ...

    def discard(self, num_blocks: int) -> None: ...

    def mapped_bytes(self) -> int: ...


class KVCache:
    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        storage: KVStorage | None = None,
    ) -> None:
        self.device = device
        self.dtype = dtype
        self.shape = (num_blocks, 2, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.num_layers = cfg.num_layers
        self.tensors: list[torch.Tensor] = []
        self.storage = storage  # None: plain tensors (made by `restore`, dropped by `release`)
        self._released = True
        # Byte views of the CPU caches, [num_blocks, block bytes].
        self._host_bytes: list[npt.NDArray[np.uint8]] = []
        self.restore()

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one layer (keys and values)."""
        return math.prod(self.shape[1:]) * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes of the whole cache, every layer (held or not)."""
        return self.num_layers * self.shape[0] * self.block_bytes

    @property
    def mapped_bytes(self) -> int:
        """Bytes the cache holds now: what a virtual pool has mapped, else the whole cache
        (0 while released)."""
        if self.storage is not None:
            return self.storage.mapped_bytes()
        return 0 if self.released else self.nbytes

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> int:
        """Drop the storage (every block's content is lost) and give its memory back: on CPU
        the C heap is trimmed (the tensors below glibc's mmap threshold sit in the heap), on
        CUDA the caching allocator frees its cached blocks; a virtual pool (`storage`) keeps
        its address space and discards every block. The bytes given back (0 when already
        released); nothing may read or write blocks until `restore`."""
        if self.released:
            return 0
        held = self.mapped_bytes
        self._released = True
        if self.storage is not None:  # (the address space stays, its memory goes back)
            self.storage.discard(0)
            return held
        self._host_bytes.clear()
        self.tensors.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        else:
            give_back_free_memory()
        return held

    def restore(self) -> int:
        """Make the storage again, zeroed (no-op when it is there); the bytes allocated (0 for
        a virtual pool: its memory comes back as blocks are written)."""
        if not self.released:
            return 0
        self._released = False
        if self.storage is not None and self.tensors:
            return 0
        self.tensors.extend(
            self.storage.tensors
            if self.storage is not None
            else (
                torch.zeros(self.shape, dtype=self.dtype, device=self.device)
                for _ in range(self.num_layers)
            )
        )
        if self.device.type == "cpu":
            self._host_bytes.extend(byte_rows(c) for c in self.tensors)
        return 0 if self.storage is not None else self.nbytes

    @property
    def on_host(self) -> bool:
        """The cache is in host memory: `write` may run on any thread."""
        return self.device.type == "cpu"

    def move_blocks(self, layer: int, moves: list[tuple[int, int]]) -> None:
        """Compaction: copy blocks (old, new) of one layer (on the device's stream)."""
        if moves:
            cache = self.tensors[layer]
            src = torch.tensor([o for o, _ in moves], dtype=torch.long, device=self.device)
            dst = torch.tensor([n for _, n in moves], dtype=torch.long, device=self.device)
            cache.index_copy_(0, dst, cache.index_select(0, src))

    def read(self, layer: int, block_ids: list[int]) -> list[Frame]:
        """Some blocks of one layer as bytes to send, in order: (number of blocks, bytes) per
        frame; the frames together hold `block_ids`. On CPU each run of consecutive blocks is
        a view of the cache itself (nothing copied; the blocks must not change until sent: full
        blocks never do). On CUDA the blocks are gathered into pinned host memory (the copy
        engine moves them; the host waits for this layer only), one frame."""
        if self.device.type == "cuda":
            index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
            gathered = self.tensors[layer].index_select(0, index)
            host = torch.empty(gathered.shape, dtype=gathered.dtype, pin_memory=True)
            host.copy_(gathered, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
            return [(len(block_ids), _bytes_of(host.view(torch.uint8).reshape(-1).numpy()))]
        return read_block_runs(self._host_bytes[layer], block_ids)

    def copy_blocks(self, copies: list[tuple[int, int] | None]) -> None:
        """Per layer, copy block `src` to block `dst` ((src, dst); None: nothing), on the
        cache's device (a forked request's copy-on-write block)."""
        for cache, copy in zip(self.tensors, copies, strict=True):
            if copy is not None:
                cache[copy[1]].copy_(cache[copy[0]])

    def write(self, layer: int, block_ids: list[int], frames: list[memoryview]) -> None:
        """Store blocks of one layer received from a peer: `frames` laid out as `read`
        makes them, together exactly `len(block_ids)` blocks, written in order."""
        for ids, src in frame_blocks(self.block_bytes, block_ids, frames):
            self._write_blocks(layer, ids, src)

    def _write_blocks(self, layer: int, block_ids: list[int], src: npt.NDArray[np.uint8]) -> None:
        if self.device.type == "cuda":
            cache = self.tensors[layer]
            staged = torch.empty(src.shape, dtype=torch.uint8, pin_memory=True)
            staged.numpy()[:] = src  # pinned: the copy to the device runs asynchronously
            index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
            host = staged.view(cache.dtype).view((-1, *cache.shape[1:]))
            cache.index_copy_(0, index, host.to(self.device, non_blocking=True))
            return
        write_block_runs(self._host_bytes[layer], block_ids, src)


def byte_rows(tensor: torch.Tensor) -> npt.NDArray[np.uint8]:
    """A paged layer tensor in host memory as bytes, [num_blocks, block bytes] (a view)."""
    return tensor.view(torch.uint8).numpy().reshape(tensor.shape[0], -1)


def read_block_runs(rows: npt.NDArray[np.uint8], block_ids: list[int]) -> list[Frame]:
    """Blocks of host memory (`byte_rows`) as frames: one view per run of consecutive blocks
    (nothing copied: the blocks must not change until sent)."""
    return [
        (n, _bytes_of(rows[start : start + n].reshape(-1))) for _, start, n in block_runs(block_ids)
    ]


def write_block_runs(
    rows: npt.NDArray[np.uint8], block_ids: list[int], src: npt.NDArray[np.uint8]
) -> None:
    """Store `src` [len(block_ids), block bytes] into blocks of host memory, run by run."""
    for i, start, n in block_runs(block_ids):
        rows[start : start + n] = src[i : i + n]


def frame_blocks(
    block_bytes: int, block_ids: list[int], frames: list[memoryview]
) -> Iterator[tuple[list[int], npt.NDArray[np.uint8]]]:
    """Received frames (together exactly `len(block_ids)` blocks, laid out as `read` makes
    them) cut into their blocks: (the ids, their bytes [n, block bytes]) per frame, in order."""
    done = 0
    for frame in frames:
        src = np.frombuffer(frame, dtype=np.uint8).reshape(-1, block_bytes)
        yield block_ids[done : done + len(src)], src
        done += len(src)


def _bytes_of(array: npt.NDArray[np.uint8]) -> memoryview:
    """A flat byte view of a contiguous array (no copy)."""
    return array.data.cast("B")


def block_runs(block_ids: list[int]) -> list[tuple[int, int, int]]:
    """Runs of consecutive block ids: (index of the run's first id, first block, length)."""
    runs: list[tuple[int, int, int]] = []
    for i, b in enumerate(block_ids):
        if runs and runs[-1][1] + runs[-1][2] == b:
            first, start, n = runs[-1]
            runs[-1] = (first, start, n + 1)
        else:
            runs.append((i, b, 1))
    return runs
