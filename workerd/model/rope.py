"""Rotary position embeddings: inverse frequencies (default, linear, llama3, longrope) and the
cos/sin table.

Computed exactly as transformers does (float32 inverse frequencies, `position * inv_freq`,
NeoX "rotate half" convention), so greedy outputs match it token for token.

LongRoPE (Phi-3) has two sets of frequencies: transformers uses the short one while a sequence
fits in `original_max_position_embeddings` and, once it grows past it, recomputes the whole
sequence with the long one. The engine cannot recompute a cache mid-request, so it picks one
set for all requests: the short one when the served context (max_model_len) fits in the
original length, the long one otherwise. Tokens then equal transformers' for every request
when the context is served at the original length, and for requests longer than it otherwise.
"""

from __future__ import annotations

import math

import torch

from mell.workerd.model.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int, context_len: int) -> torch.Tensor:
    """Per-frequency rotation speeds; `context_len` (the longest sequence served) picks
    LongRoPE's short or long factors."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim
    if rope.type == "longrope":
        long = context_len > rope.original_max_position_embeddings
        factors = torch.tensor(rope.long_factor if long else rope.short_factor)
        return 1.0 / (factors * rope.theta**exponents)
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.type == "linear":
        return inv_freq / rope.factor
    if rope.type == "llama3":
        return _llama3(inv_freq, rope)
    return inv_freq


def _llama3(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def cos_sin_table(
    rope: RopeConfig,
    head_dim: int,
    max_len: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    context_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each [max_len, head_dim], indexed by absolute position. `context_len`
    (default: max_len) is the longest sequence served (see LongRoPE above)."""
    inv_freq = inverse_frequencies(rope, head_dim, max_len if context_len is None else context_len)
    positions = torch.arange(max_len, dtype=torch.int64).float()
    freqs = positions[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if rope.attention_factor != 1.0:
        cos, sin = cos * rope.attention_factor, sin * rope.attention_factor
    return cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [tokens, heads, head_dim]; cos/sin [tokens, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
