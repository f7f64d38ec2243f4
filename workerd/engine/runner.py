"""The model runner: owns the weights and the attention backend, turns a scheduled batch into
flat tensors, runs the model against the KV tensors it is given and samples.

The batch is laid out decode-first (requests computing one token), then prefill chunks, then
prompts staged to the host tier (their K/V skip the paged cache; `make_hooks` gets their rows).
Block tables come with the batch, per layer (the scheduler's output); when every request's
layers share one table (the normal case) the attention plan and the K/V slots are computed
once for all layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mell.common.errors import ConfigError
from mell.common.sampling import TokenLogprobs
from mell.workerd.engine.scheduler import ScheduledBatch
from mell.workerd.engine.sequence import Sequence
from mell.workerd.model.attention import AttentionBatch, AttentionShape, make_attention_backend
from mell.workerd.model.config import ModelConfig
from mell.workerd.model.llama import ForwardBatch, LayerHooks, LlamaModel
from mell.workerd.model.sampler import Sampler, prompt_logprobs
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

    def execute(
        self,
        batch: ScheduledBatch,
        kv_caches: list[torch.Tensor],
        make_hooks: Callable[[list[StagedRows]], LayerHooks | None] | None = None,
    ) -> list[Sample]:
        """Run one scheduled batch against the KV tensors (one per layer); the sampled tokens
        of the requests whose last token was computed. `make_hooks`, given the rows of the
        staged prompts, makes the step's per-layer hooks."""
        # decode first, then prefill, then staged; each part by context length (attention.py)
        staged = {id(s) for s in batch.staged}
        order = sorted(
            range(len(batch.seqs)),
            key=lambda i: (
                id(batch.seqs[i]) in staged,
                batch.num_tokens[i] != 1,
                batch.seqs[i].num_computed + batch.num_tokens[i],
            ),
        )
        seqs = [batch.seqs[i] for i in order]
        counts = [batch.num_tokens[i] for i in order]
        num_paged = len(seqs) - len(staged)
        prompt_rows: list[tuple[Sequence, int]] = []  # (request, prompt position) extra rows
        fwd, samplers = self._prepare(
            seqs, counts, _reordered(batch.layer_tables, order), num_paged, prompt_rows
        )
        if make_hooks is not None:
            fwd.hooks = make_hooks(_staged_rows(seqs, counts, num_paged))
        logits = self.model.forward(fwd, kv_caches)
        if prompt_rows:
            _record_prompt_logprobs(logits[len(samplers) :], prompt_rows)
            logits = logits[: len(samplers)]
        if not samplers:
            return []
        result = self.sampler(
            logits,
            [s.sampling for s in samplers],
            [s.token_generator(self.device) for s in samplers],
            samplers,
        )
        return [
            Sample(seq, tok, lp)
            for seq, tok, lp in zip(samplers, result.token_ids, result.logprobs, strict=True)
        ]

    def _prepare(
        self,
        seqs: list[Sequence],
        counts: list[int],
        layer_tables: list[list[list[int]]],
        num_paged: int,
        prompt_rows: list[tuple[Sequence, int]],
    ) -> tuple[ForwardBatch, list[Sequence]]:
        """The forward batch; the logit rows are the sampled ones, then (filling
        `prompt_rows`) the prompt positions whose next-token logprobs were asked for."""
        tokens: list[int] = []
        positions: list[int] = []
        logit_rows: list[int] = []
        samplers: list[Sequence] = []
        extra_rows: list[int] = []
        kv_lens: list[int] = []
        num_decode = 0
        for i, (seq, n) in enumerate(zip(seqs, counts, strict=True)):
            start = seq.num_computed
            end = start + n
            if n == 1 and i < num_paged:  # (a staged 1-token prompt is a fresh prefill)
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
            if seq.sampling.prompt_logprobs is not None:
                first_row = len(tokens) - n
                for pos in range(max(start, len(seq.prompt_logprobs)), end):
                    if pos + 1 < seq.num_prompt_tokens:
                        prompt_rows.append((seq, pos))
                        extra_rows.append(first_row + pos - start)
        dev = self.device
        positions_t = torch.tensor(positions, dtype=torch.long, device=dev)
        q_lens = counts
        self.attention.begin_step()
        plans: dict[int, tuple[object, torch.Tensor]] = {}
        attn_plans: list[object] = []
        slot_pages: list[torch.Tensor] = []
        for tables in layer_tables:
            key = id(tables)
            if key not in plans:
                batch = AttentionBatch(num_decode, q_lens, kv_lens, tables, self.block_size)
                pages = self._slot_pages(tables[:num_paged], seqs, counts)
                plans[key] = (self.attention.plan(batch), pages)
            attn_plans.append(plans[key][0])
            slot_pages.append(plans[key][1])
        fwd = ForwardBatch(
            token_ids=torch.tensor(tokens, dtype=torch.long, device=dev),
            positions=positions_t,
            slot_pages=slot_pages,
            slot_offsets=positions_t[: sum(counts[:num_paged])] % self.block_size,
            attn_plans=attn_plans,
            logit_rows=torch.tensor(logit_rows + extra_rows, dtype=torch.long, device=dev),
        )
        return fwd, samplers

    def _slot_pages(
        self, tables: list[list[int]], seqs: list[Sequence], counts: list[int]
    ) -> torch.Tensor:
        size = self.block_size
        pages: list[int] = []
        for table, seq, n in zip(tables, seqs, counts, strict=False):  # (staged ones: none)
            start = seq.num_computed
            if n == 1:
                pages.append(table[start // size])
                continue
            end = start + n
            for j in range(start // size, (end - 1) // size + 1):  # per page, not per token
                pages.extend([table[j]] * (min(end, (j + 1) * size) - max(start, j * size)))
        return torch.tensor(pages, dtype=torch.long, device=self.device)


StagedRows = tuple[str, int, int]  # request id, first row, end row of a staged prompt


def _staged_rows(seqs: list[Sequence], counts: list[int], num_paged: int) -> list[StagedRows]:
    start = sum(counts[:num_paged])
    rows = []
    for seq, n in zip(seqs[num_paged:], counts[num_paged:], strict=True):
        rows.append((seq.request_id, start, start + n))
        start += n
    return rows


def _record_prompt_logprobs(logits: torch.Tensor, rows: list[tuple[Sequence, int]]) -> None:
    """Append each request's prompt-token logprobs (row j predicts prompt token pos + 1)."""
    top_n = max(seq.sampling.prompt_logprobs or 0 for seq, _ in rows)
    entries = prompt_logprobs(logits, [seq.token_ids[pos + 1] for seq, pos in rows], top_n)
    for (seq, pos), entry in zip(rows, entries, strict=True):
        n = seq.sampling.prompt_logprobs or 0
        if pos == len(seq.prompt_logprobs):  # positions arrive in order, each once
            seq.prompt_logprobs.append(
                TokenLogprobs(
                    entry.logprob, entry.top_token_ids[:n], entry.top_logprobs[:n], entry.rank
                )
            )


def _reordered(layer_tables: list[list[list[int]]], order: list[int]) -> list[list[list[int]]]:
    """Per-layer tables in the batch's run order; layers that shared one list still do."""
    done: dict[int, list[list[int]]] = {}
    for tables in layer_tables:
        if id(tables) not in done:
            done[id(tables)] = [tables[i] for i in order]
    return [done[id(tables)] for tables in layer_tables]
