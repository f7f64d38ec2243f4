"""The KV cache: one tensor per layer, [num_blocks, 2 (K, V), block_size, kv heads, head dim],
and its blocks as bytes (what a migration sends and receives).

The block manager decides which blocks a request holds; this module only stores them. On CPU
the cache is read and written through byte views of the tensors (plain memcpy: no per-element
kernels, no intra-op threads), so `write` may run on another thread than the engine's (the
worker's I/O thread writes KV as it arrives). On CUDA blocks go through pinned host memory.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt
import torch

from mell.workerd.engine.contract import Frame
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
        shape = (num_blocks, 2, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.device = device
        self.storage = storage  # None: plain tensors, all memory held for good
        self.tensors = (
            storage.tensors
            if storage is not None
            else [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        )
        # Byte views of the CPU caches, [num_blocks, block bytes].
        self._host_bytes: list[npt.NDArray[np.uint8]] = (
            [c.view(torch.uint8).numpy().reshape(num_blocks, -1) for c in self.tensors]
            if device.type == "cpu"
            else []
        )

    @property
    def num_layers(self) -> int:
        return len(self.tensors)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one layer (keys and values)."""
        cache = self.tensors[0]
        return cache[0].numel() * cache.element_size()

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
        cache = self._host_bytes[layer]
        return [
            (n, _bytes_of(cache[start : start + n].reshape(-1)))
            for _, start, n in block_runs(block_ids)
        ]

    def write(self, layer: int, block_ids: list[int], frames: list[memoryview]) -> None:
        """Store blocks of one layer received from a peer: `frames` laid out as `read`
        makes them, together exactly `len(block_ids)` blocks, written in order."""
        done = 0
        for frame in frames:
            src = np.frombuffer(frame, dtype=np.uint8).reshape(-1, self.block_bytes)
            self._write_blocks(layer, block_ids[done : done + len(src)], src)
            done += len(src)

    def _write_blocks(self, layer: int, block_ids: list[int], src: npt.NDArray[np.uint8]) -> None:
        if self.device.type == "cuda":
            cache = self.tensors[layer]
            staged = torch.empty(src.shape, dtype=torch.uint8, pin_memory=True)
            staged.numpy()[:] = src  # pinned: the copy to the device runs asynchronously
            index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
            host = staged.view(cache.dtype).view((-1, *cache.shape[1:]))
            cache.index_copy_(0, index, host.to(self.device, non_blocking=True))
            return
        cache_bytes = self._host_bytes[layer]
        for i, start, n in block_runs(block_ids):
            cache_bytes[start : start + n] = src[i : i + n]


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
