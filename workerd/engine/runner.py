"""The model runner: owns the weights, the KV tensors and the attention backend, turns a
scheduled batch into flat tensors, runs the model and samples.

The batch is laid out decode-first (requests computing one token), then prefill chunks.
Block tables are read per layer; when every request's layers share one table (the normal
case) the attention plan and the K/V slots are computed once for all layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mell.common.errors import ConfigError
from mell.common.sampling import TokenLogprobs
from mell.workerd.engine.block_manager import BlockManager
from mell.workerd.engine.scheduler import ScheduledBatch
from mell.workerd.engine.sequence import Sequence
from mell.workerd.model.attention import AttentionBatch, AttentionShape, make_attention_backend
from mell.workerd.model.config import ModelConfig
from mell.workerd.model.llama import ForwardBatch, LlamaModel
from mell.workerd.model.sampler import Sampler
from mell.workerd.model.weights import load_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class Sample:
    seq: Sequence
    token_id: int
    logprobs: TokenLogprobs | None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: CUDA is not available")
    return device


def resolve_dtype(name: str, checkpoint_dtype: str, device: torch.device) -> torch.dtype:
    """ "auto": the checkpoint's dtype, except float16 on CPU (→ float32) and float32 on CUDA
    (→ bfloat16, which FlashInfer needs)."""
    if name == "auto":
        name = checkpoint_dtype if checkpoint_dtype in DTYPES else "float32"
        if device.type == "cpu" and name == "float16":
            name = "float32"
        if device.type == "cuda" and name == "float32":
            name = "bfloat16"
    if device.type == "cpu" and name == "float16":
        raise ConfigError("dtype 'float16' is not supported on CPU (use float32 or bfloat16)")
    return DTYPES[name]


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block in every layer (K and V)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * elem


class ModelRunner:
    def __init__(
        self,
        model_dir: Path,
        cfg: ModelConfig,
        *,
        device: torch.device,
        dtype: torch.dtype,
        attention_backend: str,
        block_size: int,
        seed: int,
    ) -> None:
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        weights = load_weights(model_dir, cfg, dtype, device)
        shape = AttentionShape(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, dtype, device)
        self.attention = make_attention_backend(attention_backend, shape)
        self.model = LlamaModel(cfg, weights, self.attention, cfg.max_position_embeddings)
        self.sampler = Sampler(seed)
        self.kv_caches: list[torch.Tensor] = []
        self._host_bytes: list[np.ndarray] = []

    def allocate_kv_cache(self, num_blocks: int) -> None:
        shape = (num_blocks, 2, self.block_size, self.cfg.num_kv_heads, self.cfg.head_dim)
        self.kv_caches = [
            torch.zeros(shape, dtype=self.dtype, device=self.device)
            for _ in range(self.cfg.num_layers)
        ]
        # Byte views of the CPU caches, [num_blocks, block bytes]: migration copies blocks
        # with plain memcpy (no per-element kernels, no intra-op threads).
        self._host_bytes = (
            [c.view(torch.uint8).numpy().reshape(num_blocks, -1) for c in self.kv_caches]
            if self.device.type == "cpu"
            else []
        )

    @property
    def kv_block_bytes(self) -> int:
        """Bytes of one block of one layer (keys and values)."""
        cache = self.kv_caches[0]
        return cache[0].numel() * cache.element_size()

    def kv_frames(self, layer: int, block_ids: list[int]) -> list[tuple[int, memoryview]]:
        """Some blocks of one layer as bytes to send, in order: (number of blocks, bytes) per
        frame; the frames together hold `block_ids`. On CPU each run of consecutive blocks is
        a view of the cache itself (nothing copied; the blocks must not change until sent: full
        blocks never do). On CUDA the blocks are gathered into pinned host memory (the copy
        engine moves them; the host waits for this layer only), one frame."""
        if self.device.type == "cuda":
            index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
            gathered = self.kv_caches[layer].index_select(0, index)
            host = torch.empty(gathered.shape, dtype=gathered.dtype, pin_memory=True)
            host.copy_(gathered, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
            return [(len(block_ids), memoryview(host.view(torch.uint8).reshape(-1).numpy()))]
        cache = self._host_bytes[layer]
        return [
            (n, memoryview(cache[start : start + n].reshape(-1)))
            for _, start, n in block_runs(block_ids)
        ]

    def write_kv(self, layer: int, block_ids: list[int], frames: list[memoryview]) -> None:
        """Store blocks of one layer received from a peer: `frames` laid out as `kv_frames`
        makes them, together exactly `len(block_ids)` blocks, written in order."""
        done = 0
        for frame in frames:
            src = np.frombuffer(frame, dtype=np.uint8).reshape(-1, self.kv_block_bytes)
            self._write_blocks(layer, block_ids[done : done + len(src)], src)
            done += len(src)

    def _write_blocks(self, layer: int, block_ids: list[int], src: np.ndarray) -> None:
        if self.device.type == "cuda":
            cache = self.kv_caches[layer]
            staged = torch.empty(src.shape, dtype=torch.uint8, pin_memory=True)
            staged.numpy()[:] = src  # pinned: the copy to the device runs asynchronously
            index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
            host = staged.view(cache.dtype).view((-1, *cache.shape[1:]))
            cache.index_copy_(0, index, host.to(self.device, non_blocking=True))
            return
        cache = self._host_bytes[layer]
        for i, start, n in block_runs(block_ids):
            cache[start : start + n] = src[i : i + n]

    def execute(self, batch: ScheduledBatch, blocks: BlockManager) -> list[Sample]:
        # decode first, then prefill; each part by context length (see attention.py)
        order = sorted(
            range(len(batch.seqs)),
            key=lambda i: (
                batch.num_tokens[i] != 1,
                batch.seqs[i].num_computed + batch.num_tokens[i],
            ),
        )
        seqs = [batch.seqs[i] for i in order]
        counts = [batch.num_tokens[i] for i in order]
        fwd, samplers = self._prepare(seqs, counts, blocks)
        logits = self.model.forward(fwd, self.kv_caches)
        if not samplers:
            return []
        result = self.sampler(
            logits, [s.sampling for s in samplers], [s.generator for s in samplers]
        )
        return [
            Sample(seq, tok, lp)
            for seq, tok, lp in zip(samplers, result.token_ids, result.logprobs, strict=True)
        ]

    def _prepare(
        self, seqs: list[Sequence], counts: list[int], blocks: BlockManager
    ) -> tuple[ForwardBatch, list[Sequence]]:
        tokens: list[int] = []
        positions: list[int] = []
        logit_rows: list[int] = []
        samplers: list[Sequence] = []
        kv_lens: list[int] = []
        num_decode = 0
        for seq, n in zip(seqs, counts, strict=True):
            start = seq.num_computed
            end = start + n
            if n == 1:
                num_decode += 1
                tokens.append(seq.token_ids[start])
                positions.append(start)
            else:
                tokens.extend(seq.token_ids[start:end])
                positions.extend(range(start, end))
            kv_lens.append(end)
            if end == seq.num_tokens:
                logit_rows.append(len(tokens) - 1)
                samplers.append(seq)
        dev = self.device
        positions_t = torch.tensor(positions, dtype=torch.long, device=dev)
        q_lens = counts
        layer_tables = self._layer_tables(seqs, blocks)
        self.attention.begin_step()
        plans: dict[int, tuple[object, torch.Tensor]] = {}
        attn_plans: list[object] = []
        slot_pages: list[torch.Tensor] = []
        for tables in layer_tables:
            key = id(tables)
            if key not in plans:
                batch = AttentionBatch(num_decode, q_lens, kv_lens, tables, self.block_size)
                plans[key] = (self.attention.plan(batch), self._slot_pages(tables, seqs, counts))
            attn_plans.append(plans[key][0])
            slot_pages.append(plans[key][1])
        fwd = ForwardBatch(
            token_ids=torch.tensor(tokens, dtype=torch.long, device=dev),
            positions=positions_t,
            slot_pages=slot_pages,
            slot_offsets=positions_t % self.block_size,
            attn_plans=attn_plans,
            logit_rows=torch.tensor(logit_rows, dtype=torch.long, device=dev),
        )
        return fwd, samplers

    def _layer_tables(self, seqs: list[Sequence], blocks: BlockManager) -> list[list[list[int]]]:
        """Block tables per layer; the same list object for all layers when all are uniform."""
        ids = [s.request_id for s in seqs]
        if all(blocks.is_uniform(r) for r in ids):
            shared = [blocks.block_table(r, 0) for r in ids]
            return [shared] * self.cfg.num_layers
        return [[blocks.block_table(r, layer) for r in ids] for layer in range(self.cfg.num_layers)]

    def _slot_pages(
        self, tables: list[list[int]], seqs: list[Sequence], counts: list[int]
    ) -> torch.Tensor:
        size = self.block_size
        pages: list[int] = []
        for table, seq, n in zip(tables, seqs, counts, strict=True):
            start = seq.num_computed
            if n == 1:
                pages.append(table[start // size])
                continue
            end = start + n
            for j in range(start // size, (end - 1) // size + 1):  # per page, not per token
                pages.extend([table[j]] * (min(end, (j + 1) * size) - max(start, j * size)))
        return torch.tensor(pages, dtype=torch.long, device=self.device)


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
