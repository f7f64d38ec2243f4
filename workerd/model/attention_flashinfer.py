"""FlashInfer paged attention (CUDA only; imported lazily, never on a CPU-only machine).

Decode requests go to `BatchDecodeWithPagedKVCacheWrapper`, prefill chunks to
`BatchPrefillWithPagedKVCacheWrapper` (causal, aligned to the end of each request's context).
Both are planned once per step and run once per layer. Works with flashinfer-python 0.5.3 and
0.7.x: every `plan()` argument after `page_size` is passed by keyword, and the data types go
through `q_data_type` / `kv_data_type`.

Each kind of layer (`LayerAttention`) gets its own pair of planned wrappers: the softmax scale
goes to `sm_scale`, a sliding window of w tokens to `window_left=w - 1` (FlashInfer's query at
p sees keys p - window_left..p), a soft-cap to `logits_soft_cap`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from mell.workerd.model.attention import (
    AttentionBackend,
    AttentionBatch,
    AttentionShape,
    LayerAttention,
)

WORKSPACE_BYTES = 128 * 1024 * 1024


class PagedAttention(Protocol):
    """A planned FlashInfer wrapper: BatchDecode- or BatchPrefillWithPagedKVCacheWrapper."""

    def run(self, q: torch.Tensor, paged_kv_cache: torch.Tensor) -> torch.Tensor: ...


@dataclass(slots=True)
class KindPlan:
    """The planned wrappers of one kind of layer."""

    decode: PagedAttention | None
    prefill: PagedAttention | None


@dataclass(slots=True)
class FlashInferPlan:
    num_decode: int
    kinds: dict[LayerAttention, KindPlan]
    keep: tuple[torch.Tensor, ...]  # index tensors the plans read


class FlashInferAttention(AttentionBackend):
    name = "flashinfer"

    def __init__(self, shape: AttentionShape) -> None:
        super().__init__(shape)
        import flashinfer  # lazily: only ever on a CUDA machine

        self._fi = flashinfer
        self._pairs: list[tuple[Any, Any]] = []  # (decode, prefill) wrappers, per plan and kind
        self._next = 0

    def begin_step(self) -> None:
        self._next = 0

    def plan(self, batch: AttentionBatch) -> FlashInferPlan:
        nd, n = batch.num_decode, len(batch.q_lens)
        s = self.shape
        keep: list[torch.Tensor] = []
        decode_csr = prefill_csr = None
        qo_indptr = None
        if nd:
            decode_csr = self._page_csr(batch, 0, nd)
            keep += decode_csr
        if nd < n:
            prefill_csr = self._page_csr(batch, nd, n)
            qo = [0]
            for q_len in batch.q_lens[nd:]:
                qo.append(qo[-1] + q_len)
            qo_indptr = torch.tensor(qo, dtype=torch.int32, device=s.device)
            keep += [qo_indptr, *prefill_csr]
        kinds = {}
        for layer in self.layers:
            decode_w, prefill_w = self._wrappers()
            decode = prefill = None
            if decode_csr is not None:
                decode = self._plan_decode(decode_w, decode_csr, batch.block_size, layer)
            if prefill_csr is not None and qo_indptr is not None:
                prefill = self._plan_prefill(
                    prefill_w, qo_indptr, prefill_csr, batch.block_size, layer
                )
            kinds[layer] = KindPlan(decode, prefill)
        return FlashInferPlan(nd, kinds, tuple(keep))

    def _plan_decode(
        self,
        decode_w: Any,
        csr: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        block_size: int,
        layer: LayerAttention,
    ) -> PagedAttention:
        s = self.shape
        indptr, indices, last = csr
        decode_w.plan(
            indptr,
            indices,
            last,
            s.num_heads,
            s.num_kv_heads,
            s.head_dim,
            block_size,
            **self._plan_options(layer),
        )
        planned: PagedAttention = decode_w
        return planned

    def _plan_prefill(
        self,
        prefill_w: Any,
        qo_indptr: torch.Tensor,
        csr: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        block_size: int,
        layer: LayerAttention,
    ) -> PagedAttention:
        s = self.shape
        indptr, indices, last = csr
        prefill_w.plan(
            qo_indptr,
            indptr,
            indices,
            last,
            s.num_heads,
            s.num_kv_heads,
            s.head_dim,
            block_size,
            causal=True,
            **self._plan_options(layer),
        )
        planned: PagedAttention = prefill_w
        return planned

    def _plan_options(self, layer: LayerAttention) -> dict[str, Any]:
        """What `plan()` takes alike for decode and prefill: the layer's attention kind."""
        return {
            "pos_encoding_mode": "NONE",
            "window_left": _window_left(layer),
            "logits_soft_cap": layer.soft_cap,
            "sm_scale": layer.scale,
            "q_data_type": self.shape.dtype,
            "kv_data_type": self.shape.dtype,
        }

    def forward(
        self,
        plan: object,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        layer: LayerAttention | None = None,
    ) -> torch.Tensor:
        assert isinstance(plan, FlashInferPlan)
        nd = plan.num_decode
        q = q.contiguous()  # the model hands a view into its fused q/k/v projection
        kind = plan.kinds[layer or self.default_layer]
        decode, prefill = kind.decode, kind.prefill
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


def _window_left(layer: LayerAttention) -> int:
    return -1 if layer.window is None else layer.window - 1
