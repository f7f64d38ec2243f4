"""The attention backend interface, and the choice of backend.

A step's batch is laid out decode-first: the first `num_decode` requests have one query token
each, the rest are prefill chunks (each part sorted by context length, which lets the torch
backend group similar lengths). The backend is planned once per step (per distinct set of
block tables, normally one for all layers) and then run once per layer. K/V of the step's new
tokens are already written into the paged cache when `forward` runs.

KV cache of one layer: `[num_pages, 2, page_size, num_kv_heads, head_dim]` (FlashInfer NHD),
`[:, 0]` is K and `[:, 1]` is V.

Layers may attend differently (a `LayerAttention`: softmax scale, sliding window, logit
soft-cap). The model tells the backend the distinct kinds once (`use_layers`), each plan covers
all of them, and each per-layer call names its kind.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mell.common.errors import ConfigError


@dataclass(slots=True)
class AttentionBatch:
    """Host-side description of one step's attention work for one set of block tables."""

    num_decode: int
    q_lens: list[int]  # query tokens per request (1 for the first num_decode)
    kv_lens: list[int]  # tokens in the cache per request, this step's new ones included
    block_tables: list[list[int]]  # pages per request, in order
    block_size: int


@dataclass(frozen=True, slots=True)
class AttentionShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def scale(self) -> float:
        return math.pow(self.head_dim, -0.5)  # (as head_dim**-0.5, typed)


@dataclass(frozen=True, slots=True)
class LayerAttention:
    """How one layer attends. A query at position p sees keys at positions k <= p, and with a
    `window` only p - window < k (transformers' sliding window). With a `soft_cap` the scores
    (already scaled) become soft_cap * tanh(score / soft_cap) before the softmax."""

    scale: float
    window: int | None = None
    soft_cap: float | None = None


class AttentionBackend(ABC):
    """Paged attention over the cache: plan once per step, run per layer."""

    name: str

    def __init__(self, shape: AttentionShape) -> None:
        self.shape = shape
        self.layers: tuple[LayerAttention, ...] = (LayerAttention(shape.scale),)

    @property
    def default_layer(self) -> LayerAttention:
        return self.layers[0]

    def use_layers(self, layers: Sequence[LayerAttention]) -> None:
        """The ways the model's layers attend (before the first plan); plans cover each."""
        self.layers = tuple(dict.fromkeys(layers)) or self.layers

    def begin_step(self) -> None:  # noqa: B027 (optional hook, no-op by default)
        """Called once before the step's plans (backends that pool per-plan state reset it)."""

    @abstractmethod
    def plan(self, batch: AttentionBatch) -> object:
        """Build whatever the per-layer calls need (index tensors, kernel plans)."""

    @abstractmethod
    def forward(
        self,
        plan: object,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        layer: LayerAttention | None = None,
    ) -> torch.Tensor:
        """q [tokens, num_heads, head_dim] → output of the same shape.

        k, v [tokens, num_kv_heads, head_dim] are this step's new keys and values, already
        written into `kv_cache`; a backend may use them directly (e.g. for fresh prompts).
        `layer` is one of `use_layers`' kinds (None: the first).
        """


def make_attention_backend(name: str, shape: AttentionShape) -> AttentionBackend:
    """ "auto" picks FlashInfer on CUDA and torch elsewhere."""
    if name == "auto":
        name = "flashinfer" if shape.device.type == "cuda" else "torch"
    if name == "torch":
        from mell.workerd.model.attention_torch import TorchAttention

        return TorchAttention(shape)
    if name == "flashinfer":
        if shape.device.type != "cuda" or not torch.cuda.is_available():
            raise ConfigError("attention_backend 'flashinfer' needs a CUDA device")
        from mell.workerd.model.attention_flashinfer import FlashInferAttention

        return FlashInferAttention(shape)
    raise ConfigError(f"unknown attention_backend {name!r}")
