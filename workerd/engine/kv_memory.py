"""Virtual-memory storage for the KV pool (vTensor / kvcached, on the host): each layer's
tensor is a view of its own address-space reservation, backed by physical memory only where
blocks have been written, and the top of the pool can give its memory back.

Mechanism only: nothing here decides how big the pool should be (memory_budget.py does).
- `HostVirtualStorage` (CPU): one anonymous private mapping per layer, reserved with
  MAP_NORESERVE for the pool's maximum; the kernel commits a page when it is first written
  (reads of untouched pages see zeros); `discard(n)` returns every whole page above block
  `n` with madvise(MADV_DONTNEED) (they read as zeros again afterwards).
- CUDA: `kv_memory_cuda.CudaVirtualStorage` (driver VMM, 2 MiB granules), same contract.

Contract of a storage: `tensors` are [num_blocks, 2, block_size, kv heads, head dim] per
layer and never move; `commit(n)` makes blocks below `n` safe to write (a no-op where the
OS commits on write); `discard(n)` gives back blocks from `n` up (their content is lost);
`mapped_bytes()` is the memory it holds now (upper bound).
"""

from __future__ import annotations

import math
import mmap
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mell.workerd.engine.kv_memory_cuda import CudaVirtualStorage as CudaStorage

PAGE = mmap.PAGESIZE


class HostVirtualStorage:
    def __init__(self, num_layers: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        elem = torch.empty((), dtype=dtype).element_size()
        self.num_blocks = shape[0]
        self.layer_block_bytes = elem * math.prod(shape[1:])
        size = max(self.num_blocks * self.layer_block_bytes, 1)
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        self._maps = [mmap.mmap(-1, size, flags=flags) for _ in range(num_layers)]
        self.tensors = [
            torch.frombuffer(m, dtype=dtype, count=math.prod(shape)).view(shape) for m in self._maps
        ]
        self._top = 0  # blocks at or above this are known to hold no memory

    def commit(self, num_blocks: int) -> None:
        """Blocks below `num_blocks` may be written (the kernel commits pages on write)."""
        self._top = max(self._top, min(num_blocks, self.num_blocks))

    def discard(self, num_blocks: int) -> None:
        """Give back the memory of blocks `num_blocks` and up (whole pages only: a block
        smaller than a page may share its first page with the block below)."""
        start = -(-num_blocks * self.layer_block_bytes // PAGE) * PAGE
        size = self.num_blocks * self.layer_block_bytes
        if start < size:
            for m in self._maps:
                m.madvise(mmap.MADV_DONTNEED, start, size - start)
        self._top = min(self._top, num_blocks)

    def mapped_bytes(self) -> int:
        """Bytes that may be resident: every layer up to the highest block not discarded."""
        return self._top * self.layer_block_bytes * len(self._maps)


def make_storage(
    num_layers: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> HostVirtualStorage | CudaStorage:
    """Virtual storage for a pool of `shape` per layer on `device`."""
    if device.type == "cuda":
        from mell.workerd.engine.kv_memory_cuda import CudaVirtualStorage

        return CudaVirtualStorage(num_layers, shape, dtype, device)
    return HostVirtualStorage(num_layers, shape, dtype)
