"""Paged attention in plain torch: the CPU backend and the reference for the others.

The runner lays a step out decode-first, each part sorted by context length. The plan cuts
each part into a few groups of similar lengths (padding less), and for each group builds the
padded page table and mask once; per layer, K and V pages are gathered with one `index_select`
each and `scaled_dot_product_attention` does the rest (GQA by `enable_gqa`). A query at absolute
position p sees cache positions 0..p. A group of fresh prompts (nothing cached before this
step) attends to its own new K/V directly, without gathering pages.

Each group has one mask per sliding window the model uses (a plain causal group without a
window needs none). Layers with a logit soft-cap run an eager attention (matmul, cap, masked
softmax in float32), since `scaled_dot_product_attention` cannot cap scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mell.workerd.model.attention import (
    AttentionBackend,
    AttentionBatch,
    AttentionShape,
    LayerAttention,
)

# Fixed cost of one more group (a few op launches), in (query, key) pairs of a model with
# num_kv_heads * head_dim == 64: a split must save more than this; wider models split sooner.
GROUP_OVERHEAD_PAIRS = 2048
MAX_SPLIT_DEPTH = 3  # at most 8 groups per part


@dataclass(slots=True)
class _Group:
    start: int  # first flat query row of the group
    end: int
    pages: torch.Tensor | None  # [B * max_pages] page ids (padded with page 0); None: fresh
    width: int  # max pages (0 when fresh)
    masks: dict[int | None, torch.Tensor | None]  # by window: [B, 1, Q, T] bool, True where
    # allowed; None: plain causal
    q_index: torch.Tensor | None  # [B, Q] flat rows of the queries (None: decode, Q == 1)
    q_valid: torch.Tensor | None  # [B, Q] bool


@dataclass(slots=True)
class TorchPlan:
    groups: list[_Group]


class TorchAttention(AttentionBackend):
    name = "torch"

    def __init__(self, shape: AttentionShape) -> None:
        super().__init__(shape)
        # Reused gather buffers: fresh multi-MB tensors every layer cost page faults.
        self._k_buf = torch.empty(0)
        self._v_buf = torch.empty(0)

    def plan(self, batch: AttentionBatch) -> TorchPlan:
        nd, n = batch.num_decode, len(batch.q_lens)
        starts = [0]
        for q_len in batch.q_lens:
            starts.append(starts[-1] + q_len)
        overhead = GROUP_OVERHEAD_PAIRS * 64 // (self.shape.num_kv_heads * self.shape.head_dim)
        groups = [self._decode_group(batch, lo, hi) for lo, hi in _split(batch, 0, nd, overhead)]
        groups += [
            self._prefill_group(batch, lo, hi, starts) for lo, hi in _split(batch, nd, n, overhead)
        ]
        return TorchPlan(groups)

    def forward(
        self,
        plan: object,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        layer: LayerAttention | None = None,
    ) -> torch.Tensor:
        assert isinstance(plan, TorchPlan)
        layer = layer or self.default_layer
        parts = [self._run_group(g, q, k, v, kv_cache, layer) for g in plan.groups]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    # -- planning ---------------------------------------------------------------------------

    def _pages(self, tables: list[list[int]]) -> tuple[torch.Tensor, int]:
        width = max(len(t) for t in tables)
        flat = [p for t in tables for p in (t + [0] * (width - len(t)))]
        return torch.tensor(flat, dtype=torch.long, device=self.shape.device), width

    def _decode_group(self, batch: AttentionBatch, lo: int, hi: int) -> _Group:
        dev = self.shape.device
        pages, width = self._pages(batch.block_tables[lo:hi])
        kv_lens = torch.tensor(batch.kv_lens[lo:hi], dtype=torch.long, device=dev)
        span = torch.arange(width * batch.block_size, device=dev)
        q_pos = (kv_lens - 1)[:, None]  # [B, 1]: one query each, the last position
        masks: dict[int | None, torch.Tensor | None] = {
            w: self._mask(span, q_pos, w)[:, None, :, :] for w in self._windows()
        }
        return _Group(lo, hi, pages, width, masks, None, None)

    def _prefill_group(self, batch: AttentionBatch, lo: int, hi: int, starts: list[int]) -> _Group:
        dev = self.shape.device
        q_lens, kv_lens = batch.q_lens[lo:hi], batch.kv_lens[lo:hi]
        fresh = q_lens == kv_lens
        width = max(q_lens)
        rows, positions, valid = [], [], []
        for i, (q_len, kv_len) in enumerate(zip(q_lens, kv_lens, strict=True)):
            start, pad = starts[lo + i], width - q_len
            rows.append(list(range(start, start + q_len)) + [start + q_len - 1] * pad)
            positions.append(list(range(kv_len - q_len, kv_len)) + [kv_len - 1] * pad)
            valid.append([True] * q_len + [False] * pad)
        q_pos = torch.tensor(positions, dtype=torch.long, device=dev)
        if fresh:
            # Query i sees keys 0..i: plain causal attention. Padding sits at the end, where
            # only padded queries (whose outputs are dropped) could see it.
            pages, page_width = None, 0
            span = torch.arange(width, device=dev)  # the new keys are positions 0..width-1
        else:
            pages, page_width = self._pages(batch.block_tables[lo:hi])
            span = torch.arange(page_width * batch.block_size, device=dev)
        masks: dict[int | None, torch.Tensor | None] = {
            w: None if fresh and w is None else self._mask(span, q_pos, w)[:, None, :, :]
            for w in self._windows()
        }
        return _Group(
            starts[lo],
            starts[hi],
            pages,
            page_width,
            masks,
            torch.tensor(rows, dtype=torch.long, device=dev),
            torch.tensor(valid, dtype=torch.bool, device=dev),
        )

    def _windows(self) -> list[int | None]:
        return list(dict.fromkeys(layer.window for layer in self.layers))

    @staticmethod
    def _mask(span: torch.Tensor, q_pos: torch.Tensor, window: int | None) -> torch.Tensor:
        """[B, Q, T]: key position t is visible from query position p (q_pos [B, Q])."""
        allowed = span[None, None, :] <= q_pos[:, :, None]
        if window is not None:
            allowed &= span[None, None, :] > q_pos[:, :, None] - window
        return allowed

    # -- running ----------------------------------------------------------------------------

    def _run_group(
        self,
        g: _Group,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        kv_cache: torch.Tensor,
        layer: LayerAttention,
    ) -> torch.Tensor:
        if g.pages is None:  # fresh prompts: their own K/V are all there is
            assert g.q_index is not None
            k = _rows(k_new, g.q_index).transpose(1, 2)
            v = _rows(v_new, g.q_index).transpose(1, 2)
        else:
            _, _, page_size, kv_heads, head_dim = kv_cache.shape
            n = g.pages.shape[0]
            shape = (n // g.width, g.width * page_size, kv_heads, head_dim)
            k_buf, v_buf = self._buffers(n, kv_cache)
            # One gather each for K and V (index_select copies whole pages); the rest are views.
            k = torch.index_select(kv_cache[:, 0], 0, g.pages, out=k_buf)
            v = torch.index_select(kv_cache[:, 1], 0, g.pages, out=v_buf)
            k, v = k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)
        if g.q_index is None:
            qg = q[g.start : g.end].unsqueeze(2)  # [B, H, 1, D]
        else:
            qg = _rows(q, g.q_index).transpose(1, 2)  # [B, H, Q, D]
        mask = g.masks[layer.window]
        if layer.soft_cap is not None:
            out = _soft_capped(qg, k, v, mask, layer.scale, layer.soft_cap)
        else:
            out = F.scaled_dot_product_attention(
                qg, k, v, attn_mask=mask, is_causal=mask is None, scale=layer.scale, enable_gqa=True
            )
        if g.q_valid is None:
            return out.squeeze(2)
        return out.transpose(1, 2)[g.q_valid]

    def _buffers(self, n: int, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        buf = self._k_buf
        if buf.shape[0] < n or buf.dtype != kv_cache.dtype or buf.device != kv_cache.device:
            size = max(n, 2 * self._k_buf.shape[0])
            page = kv_cache.shape[2:]
            dtype, device = kv_cache.dtype, kv_cache.device
            self._k_buf = torch.empty((size, *page), dtype=dtype, device=device)
            self._v_buf = torch.empty((size, *page), dtype=dtype, device=device)
        return self._k_buf[:n], self._v_buf[:n]


def _soft_capped(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    cap: float,
) -> torch.Tensor:
    """Attention with capped scores, as transformers' eager attention computes it.

    q [B, H, Q, D], k/v [B, Hkv, T, D] (query head h reads K/V head h // (H / Hkv)), mask
    [B, 1, Q, T] or None for plain causal (then T == Q)."""
    b, h, nq, d = q.shape
    kv_heads, t = k.shape[1], k.shape[2]
    grouped = q.reshape(b, kv_heads, h // kv_heads * nq, d)
    scores = torch.matmul(grouped, k.transpose(-1, -2)).view(b, h, nq, t) * scale
    scores = torch.tanh(scores / cap) * cap
    if mask is None:
        mask = torch.ones(nq, t, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs.view(b, kv_heads, h // kv_heads * nq, t), v)
    return out.view(b, h, nq, d)


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] for a 2-D index of rows, via index_select (much faster than advanced indexing)."""
    return torch.index_select(x, 0, index.view(-1)).view(*index.shape, *x.shape[1:])


def _split(
    batch: AttentionBatch, lo: int, hi: int, overhead: int, depth: int = 0
) -> list[tuple[int, int]]:
    """Cut requests lo..hi into groups whose padded area (n × max q × max kv) is small."""
    if hi - lo < 2 or depth >= MAX_SPLIT_DEPTH:
        return [(lo, hi)] if hi > lo else []
    q, kv = batch.q_lens, batch.kv_lens
    # prefix/suffix maxima of q and kv lengths
    pq, pk, sq, sk = (
        [0] * (hi - lo + 1),
        [0] * (hi - lo + 1),
        [0] * (hi - lo + 1),
        [0] * (hi - lo + 1),
    )
    for i in range(lo, hi):
        j = i - lo
        pq[j + 1], pk[j + 1] = max(pq[j], q[i]), max(pk[j], kv[i])
    for i in range(hi - 1, lo - 1, -1):
        j = i - lo
        sq[j], sk[j] = max(sq[j + 1], q[i]), max(sk[j + 1], kv[i])
    whole = (hi - lo) * pq[-1] * pk[-1]
    best, best_cost = 0, whole
    for j in range(1, hi - lo):
        cost = j * pq[j] * pk[j] + (hi - lo - j) * sq[j] * sk[j] + overhead
        if cost < best_cost:
            best, best_cost = j, cost
    if not best:
        return [(lo, hi)]
    mid = lo + best
    return _split(batch, lo, mid, overhead, depth + 1) + _split(batch, mid, hi, overhead, depth + 1)
