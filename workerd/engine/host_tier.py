"""The host KV tier (LayerKV): host tensors shaped like the device pool, their blocks (a second
BlockManager), and the copies between the tiers with the fences they need.

Mechanism only; the scheduler decides who goes where. A request is in one of these places:
- on the device only (the normal case: this module knows nothing of it);
- staged: its prompt is being prefilled straight to host blocks, layer by layer (`stage`, then
  `stage_layer` from the model's layer loop);
- on the host (swapped out or parked): its KV in host blocks, perhaps still being copied;
- loading: device blocks given back to it, being written from the host (`swap_in`); the step
  waits for layer l's copy before layer l (`wait_layer`).

A request on the host can also leave for another worker (a live migration reads its host
blocks in place, `read`), and a destination short of device blocks can receive one into host
blocks (`reserve`, `write`): it arrives parked.

Every copy is a whole run of blocks of one layer (copy_engine.py). Blocks a copy still reads
or writes are fenced when their request lets go of them, and freed by `poll` once the copy is
done; so a request may be released (finished, aborted) at any time, even mid-copy.
"""

from __future__ import annotations

import torch

from mell.common.errors import ConfigError
from mell.workerd.engine.block_manager import BlockManager
from mell.workerd.engine.contract import Frame
from mell.workerd.engine.copy_engine import D2H, H2D, CopyEngine, Rows, Ticket
from mell.workerd.engine.kv_cache import byte_rows, frame_blocks, read_block_runs, write_block_runs


class HostTier:
    def __init__(
        self,
        device_tensors: list[torch.Tensor],
        num_blocks: int,
        copies: CopyEngine,
    ) -> None:
        cache = device_tensors[0]
        pin = cache.device.type == "cuda"
        shape = (num_blocks, *cache.shape[1:])
        try:
            self.tensors = [
                torch.zeros(shape, dtype=cache.dtype, pin_memory=pin) for _ in device_tensors
            ]
        except RuntimeError as err:
            size = num_blocks * cache[0].numel() * cache.element_size() * len(device_tensors)
            raise ConfigError(
                f"host_kv_bytes: cannot pin {size} bytes of host memory for the KV host tier "
                f"({str(err).splitlines()[0]})"
            ) from None
        self._bytes = [byte_rows(t) for t in self.tensors]  # (views: a migration's frames)
        self.device_tensors = device_tensors
        self.blocks = BlockManager(num_blocks, cache.shape[2], len(device_tensors))
        self.copies = copies
        self.loading: set[str] = set()  # requests whose device blocks are being written
        self._tickets: dict[str, list[Ticket | None]] = {}  # per layer: the latest copy
        self._fences: list[tuple[Ticket, BlockManager, int, list[int]]] = []

    @property
    def num_layers(self) -> int:
        return len(self.tensors)

    def has_room(self, num_tokens: int) -> bool:
        return self.blocks.blocks_for(num_tokens) <= self.blocks.num_free()

    def holds(self, request_id: str) -> bool:
        """The request has host blocks (swapped out, parked or being staged)."""
        return self.blocks.has(request_id)

    def in_flight(self) -> int:
        """Copies whose blocks are still fenced."""
        return len(self._fences)

    # -- moves ------------------------------------------------------------------------------

    def swap_out(self, request_id: str, device: BlockManager, num_tokens: int) -> None:
        """Copy the request's first `num_tokens` tokens of KV to new host blocks, layer by
        layer; its device blocks are fenced until their layer's copy is done."""
        self.blocks.allocate(request_id, num_tokens)
        count = self.blocks.blocks_for(num_tokens)
        before = self._tickets.get(request_id) or [None] * self.num_layers
        tickets: list[Ticket | None] = []
        for layer in range(self.num_layers):
            tickets.append(
                self.copies.copy(
                    self.device_tensors[layer],
                    device.block_table(request_id, layer)[:count],
                    self.tensors[layer],
                    self.blocks.block_table(request_id, layer),
                    D2H,
                    after=before[layer],
                )
            )
        self._fence_all(device, device.fence(request_id), tickets)
        self._tickets[request_id] = tickets
        self.loading.discard(request_id)

    def stage(self, request_id: str, num_tokens: int) -> None:
        """Host blocks for a prompt about to be prefilled straight to the host."""
        self.blocks.allocate(request_id, num_tokens)
        self._tickets[request_id] = [None] * self.num_layers

    def stage_layer(self, request_id: str, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """A staged prompt's K/V rows of one layer (just computed) go to its host blocks; the
        copy holds `k` and `v` until it is done."""
        self._tickets[request_id][layer] = self.copies.copy(
            Rows(k, v), [], self.tensors[layer], self.blocks.block_table(request_id, layer), D2H
        )

    def swap_in(self, request_id: str, device: BlockManager) -> None:
        """Copy the request's host KV into the device blocks it was just given, layer by
        layer (each after that layer's copy to the host, if still in flight); its host blocks
        are fenced until their layer is loaded."""
        before = self._tickets.get(request_id) or [None] * self.num_layers
        tickets: list[Ticket | None] = []
        for layer in range(self.num_layers):
            src = self.blocks.block_table(request_id, layer)
            tickets.append(
                self.copies.copy(
                    self.tensors[layer],
                    src,
                    self.device_tensors[layer],
                    device.block_table(request_id, layer)[: len(src)],
                    H2D,
                    after=before[layer],
                )
            )
        self._fence_all(self.blocks, self.blocks.fence(request_id), tickets)
        self._tickets[request_id] = tickets
        self.loading.add(request_id)

    def read(self, request_id: str, layer: int, block_ids: list[int]) -> list[Frame]:
        """Host blocks of one layer as frames to send (a migration), once that layer's copy
        from the device (if still in flight) has landed: views of host memory, a frame per
        run of consecutive blocks; they must stay held until sent."""
        tickets = self._tickets.get(request_id)
        ticket = tickets[layer] if tickets is not None else None
        if ticket is not None:
            ticket.join()
        return read_block_runs(self._bytes[layer], block_ids)

    def reserve(self, key: str, num_tokens: int) -> bool:
        """Hold host blocks for `num_tokens` in total under `key` (a migration received into
        the host tier); False, nothing changed, if short."""
        if not self.blocks.can_append(key, num_tokens):
            return False
        self.blocks.append(key, num_tokens)
        return True

    def write(self, layer: int, block_ids: list[int], frames: list[memoryview]) -> None:
        """Store received blocks of one layer (laid out as `read` makes them) in host blocks
        reserved for them; plain memory copies, so any thread may call it."""
        block_bytes = self._bytes[layer].shape[1]
        for ids, src in frame_blocks(block_bytes, block_ids, frames):
            write_block_runs(self._bytes[layer], ids, src)

    def wait_layer(self, request_id: str, layer: int) -> None:
        """Before the step touches this layer of a loading request (see Ticket.wait)."""
        ticket = self._tickets[request_id][layer]
        if ticket is not None:
            ticket.wait()

    def release(self, request_id: str, device: BlockManager) -> None:
        """The request is gone (finished, aborted, dropped for recompute): its blocks in both
        tiers are freed, those a copy still touches once it is done."""
        tickets = self._tickets.pop(request_id, None)
        self.loading.discard(request_id)
        if tickets is None:
            device.free(request_id)
            self.blocks.free(request_id)
            return
        for blocks in (device, self.blocks):
            self._fence_all(blocks, blocks.fence(request_id), tickets)

    def poll(self) -> None:
        """Free the fenced blocks whose copies are done; a loading request whose every layer
        has landed is an ordinary device request again."""
        if self._fences:
            pending = []
            for fence in self._fences:
                ticket, blocks, layer, ids = fence
                if ticket.done():
                    blocks.unfence(layer, ids)
                else:
                    pending.append(fence)
            self._fences = pending
        for request_id in [r for r in self.loading if self._landed(r)]:
            self.loading.discard(request_id)
            del self._tickets[request_id]

    def _landed(self, request_id: str) -> bool:
        return all(t is None or t.done() for t in self._tickets[request_id])

    def _fence_all(
        self, blocks: BlockManager, fenced: list[list[int]], tickets: list[Ticket | None]
    ) -> None:
        for layer, (ids, ticket) in enumerate(zip(fenced, tickets, strict=True)):
            if not ids:
                continue
            if ticket is None or ticket.done():
                blocks.unfence(layer, ids)
            else:
                self._fences.append((ticket, blocks, layer, ids))
