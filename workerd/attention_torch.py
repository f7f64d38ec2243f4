"""Paged attention in plain torch: the CPU backend and the reference for the others.

Pages are gathered with one index op per group (decode, prefill) per layer; the batch is padded
to its longest context and masked, and `scaled_dot_product_attention` does the rest (GQA by
`enable_gqa`). A query at absolute position p sees cache positions 0..p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mell.workerd.attention import AttentionBackend, AttentionBatch


@dataclass(slots=True)
class _Group:
    start: int  # first flat query row of the group
    end: int
    pages: torch.Tensor  # [B, max_pages] page ids (padded with page 0)
    mask: torch.Tensor  # [B, 1, Q, T] bool: True where attention is allowed
    q_index: torch.Tensor | None  # [B, Q] flat rows of the queries (prefill only)
    q_valid: torch.Tensor | None  # [B, Q] bool (prefill only)


@dataclass(slots=True)
class TorchPlan:
    groups: list[_Group]


class TorchAttention(AttentionBackend):
    name = "torch"

    def plan(self, batch: AttentionBatch) -> TorchPlan:
        nd = batch.num_decode
        groups = []
        if nd:
            groups.append(self._decode_group(batch, nd))
        if nd < len(batch.q_lens):
            groups.append(self._prefill_group(batch, nd))
        return TorchPlan(groups)

    def forward(self, plan: object, q: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        assert isinstance(plan, TorchPlan)
        parts = [self._run_group(g, q, kv_cache) for g in plan.groups]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    # -- planning ---------------------------------------------------------------------------

    def _pages(self, tables: list[list[int]]) -> torch.Tensor:
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        return torch.tensor(padded, dtype=torch.long, device=self.shape.device)

    def _decode_group(self, batch: AttentionBatch, nd: int) -> _Group:
        dev = self.shape.device
        pages = self._pages(batch.block_tables[:nd])
        kv_lens = torch.tensor(batch.kv_lens[:nd], dtype=torch.long, device=dev)
        span = torch.arange(pages.shape[1] * batch.block_size, device=dev)
        mask = (span[None, :] < kv_lens[:, None])[:, None, None, :]
        return _Group(0, nd, pages, mask, None, None)

    def _prefill_group(self, batch: AttentionBatch, nd: int) -> _Group:
        dev = self.shape.device
        q_lens, kv_lens = batch.q_lens[nd:], batch.kv_lens[nd:]
        pages = self._pages(batch.block_tables[nd:])
        width = max(q_lens)
        rows, positions, valid = [], [], []
        start = nd
        for q_len, kv_len in zip(q_lens, kv_lens, strict=True):
            pad = width - q_len
            rows.append(list(range(start, start + q_len)) + [start + q_len - 1] * pad)
            first = kv_len - q_len
            positions.append(list(range(first, kv_len)) + [kv_len - 1] * pad)
            valid.append([True] * q_len + [False] * pad)
            start += q_len
        q_pos = torch.tensor(positions, dtype=torch.long, device=dev)
        span = torch.arange(pages.shape[1] * batch.block_size, device=dev)
        mask = (span[None, None, :] <= q_pos[:, :, None])[:, None, :, :]
        return _Group(
            nd,
            start,
            pages,
            mask,
            torch.tensor(rows, dtype=torch.long, device=dev),
            torch.tensor(valid, dtype=torch.bool, device=dev),
        )

    # -- running ----------------------------------------------------------------------------

    def _run_group(self, g: _Group, q: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        b, width = g.pages.shape
        _, _, page_size, kv_heads, head_dim = kv_cache.shape
        kv = kv_cache[g.pages]  # [B, P, 2, S, Hkv, D]
        kv = kv.transpose(1, 2).reshape(b, 2, width * page_size, kv_heads, head_dim)
        k = kv[:, 0].transpose(1, 2)  # [B, Hkv, T, D]
        v = kv[:, 1].transpose(1, 2)
        # queries [B, H, Q, D]; decode has Q == 1
        qg = q[g.start : g.end].unsqueeze(2) if g.q_index is None else q[g.q_index].transpose(1, 2)
        out = F.scaled_dot_product_attention(
            qg, k, v, attn_mask=g.mask, scale=self.shape.scale, enable_gqa=True
        )
        if g.q_valid is None:
            return out.squeeze(2)
        return out.transpose(1, 2)[g.q_valid]
