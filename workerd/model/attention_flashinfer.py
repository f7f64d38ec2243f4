"""FlashInfer paged attention (CUDA only; imported lazily, never on a CPU-only machine).

Decode requests go to `BatchDecodeWithPagedKVCacheWrapper`, prefill chunks to
`BatchPrefillWithPagedKVCacheWrapper` (causal, aligned to the end of each request's context).
Both are planned once per step and run once per layer. Works with flashinfer-python 0.5.3 and
0.7.x: every `plan()` argument after `page_size` is passed by keyword, and the data types go
through `q_data_type` / `kv_data_type`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from mell.workerd.model.attention import AttentionBackend, AttentionBatch, AttentionShape

WORKSPACE_BYTES = 128 * 1024 * 1024


class PagedAttention(Protocol):
    """A planned FlashInfer wrapper: BatchDecode- or BatchPrefillWithPagedKVCacheWrapper."""

    def run(self, q: torch.Tensor, paged_kv_cache: torch.Tensor) -> torch.Tensor: ...


@dataclass(slots=True)
class FlashInferPlan:
    num_decode: int
    decode: PagedAttention | None
    prefill: PagedAttention | None
    keep: tuple[torch.Tensor, ...]  # index tensors the plans read


class FlashInferAttention(AttentionBackend):
    name = "flashinfer"

    def __init__(self, shape: AttentionShape) -> None:
        super().__init__(shape)
        import flashinfer  # lazily: only ever on a CUDA machine

        self._fi = flashinfer
        self._pairs: list[tuple[Any, Any]] = []  # (decode, prefill) wrappers, one per plan
        self._next = 0

    def begin_step(self) -> None:
        self._next = 0

    def plan(self, batch: AttentionBatch) -> FlashInferPlan:
        decode_w, prefill_w = self._wrappers()
        nd, n = batch.num_decode, len(batch.q_lens)
        s = self.shape
        keep: list[torch.Tensor] = []
        decode = prefill = None
        if nd:
            indptr, indices, last = self._page_csr(batch, 0, nd)
            decode_w.plan(
                indptr,
                indices,
                last,
                s.num_heads,
                s.num_kv_heads,
                s.head_dim,
                batch.block_size,
                pos_encoding_mode="NONE",
                sm_scale=s.scale,
                q_data_type=s.dtype,
                kv_data_type=s.dtype,
            )
            decode = decode_w
            keep += [indptr, indices, last]
        if nd < n:
            indptr, indices, last = self._page_csr(batch, nd, n)
            qo = [0]
            for q_len in batch.q_lens[nd:]:
                qo.append(qo[-1] + q_len)
            qo_indptr = torch.tensor(qo, dtype=torch.int32, device=s.device)
            prefill_w.plan(
                qo_indptr,
                indptr,
                indices,
                last,
                s.num_heads,
                s.num_kv_heads,
                s.head_dim,
                batch.block_size,
                causal=True,
                pos_encoding_mode="NONE",
                sm_scale=s.scale,
                q_data_type=s.dtype,
                kv_data_type=s.dtype,
            )
            prefill = prefill_w
            keep += [qo_indptr, indptr, indices, last]
        return FlashInferPlan(nd, decode, prefill, tuple(keep))

    def forward(
        self,
        plan: object,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
    ) -> torch.Tensor:
        assert isinstance(plan, FlashInferPlan)
        nd = plan.num_decode
        q = q.contiguous()  # the model hands a view into its fused q/k/v projection
        decode, prefill = plan.decode, plan.prefill
        if decode is None or prefill is None:
            only = decode if prefill is None else prefill
            assert only is not None  # a plan covers at least one request
            return only.run(q, kv_cache)
        out = torch.empty_like(q)
        out[:nd] = decode.run(q[:nd], kv_cache)
        out[nd:] = prefill.run(q[nd:], kv_cache)
        return out

    def _wrappers(self) -> tuple[Any, Any]:
        if self._next == len(self._pairs):
            dev = self.shape.device
            fi = self._fi
            decode = fi.BatchDecodeWithPagedKVCacheWrapper(
                torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=dev),
                kv_layout="NHD",
                use_tensor_cores=True,
            )
            prefill = fi.BatchPrefillWithPagedKVCacheWrapper(
                torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=dev), kv_layout="NHD"
            )
            self._pairs.append((decode, prefill))
        pair = self._pairs[self._next]
        self._next += 1
        return pair

    def _page_csr(
        self, batch: AttentionBatch, lo: int, hi: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """indptr, indices, last_page_len (int32) for requests lo..hi."""
        size = batch.block_size
        indptr, indices, last = [0], [], []
        for table, kv_len in zip(batch.block_tables[lo:hi], batch.kv_lens[lo:hi], strict=True):
            pages = (kv_len + size - 1) // size
            indices.extend(table[:pages])
            indptr.append(indptr[-1] + pages)
            last.append(kv_len - (pages - 1) * size)
        dev = self.shape.device
        return (
            torch.tensor(indptr, dtype=torch.int32, device=dev),
            torch.tensor(indices, dtype=torch.int32, device=dev),
            torch.tensor(last, dtype=torch.int32, device=dev),
        )
