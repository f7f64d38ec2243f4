"""The Llama-family transformer (Llama, Mistral, Qwen2), gpt-fast style: plain tensors, one
forward over a flat batch of tokens from many requests.

q/k/v and gate/up projections are fused at load time. Numerics follow transformers (RMSNorm in
float32, RoPE tables in float32 cast to the model dtype), so greedy decoding matches it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from mell.workerd.model.attention import AttentionBackend
from mell.workerd.model.config import ModelConfig
from mell.workerd.model.rope import apply_rope, cos_sin_table


@dataclass(slots=True)
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


class LayerHooks(Protocol):
    """Per-layer calls around the KV of a step (the engine's host tier, LayerKV)."""

    def before_layer(self, layer: int) -> None:
        """Before the layer writes or reads its KV cache (a reload of it may be landing)."""

    def after_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """The layer's new K/V rows [N, kv heads, head dim] (rows past the paged ones go to
        the host tier from here)."""


@dataclass(slots=True)
class ForwardBatch:
    """One step's flat batch, built by the runner. The K/V of the first len(slot_offsets)
    rows go into the paged cache; rows after them (prompts staged to the host) do not."""

    token_ids: torch.Tensor  # [N] long
    positions: torch.Tensor  # [N] long
    slot_pages: list[torch.Tensor]  # per layer: [P] page of each paged row's K/V
    slot_offsets: torch.Tensor  # [P] offset inside the page (P <= N)
    attn_plans: list[object]  # per layer: the backend's plan (shared between equal tables)
    logit_rows: torch.Tensor  # [R] rows whose next-token logits are wanted
    hooks: LayerHooks | None = None


class LlamaModel:
    def __init__(
        self,
        cfg: ModelConfig,
        weights: dict[str, torch.Tensor],
        attention: AttentionBackend,
        max_len: int,
    ) -> None:
        self.cfg = cfg
        self.attention = attention
        self.embed = weights["model.embed_tokens.weight"]
        self.norm = weights["model.norm.weight"]
        self.lm_head = self.embed if cfg.tie_word_embeddings else weights["lm_head.weight"]
        self.layers = [_layer(weights, f"model.layers.{i}.") for i in range(cfg.num_layers)]
        self.cos, self.sin = cos_sin_table(
            cfg.rope, cfg.head_dim, max_len, self.embed.dtype, self.embed.device
        )

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """Logits (float32) for `batch.logit_rows`, [R, vocab]."""
        cfg = self.cfg
        x = F.embedding(batch.token_ids, self.embed)
        cos = torch.index_select(self.cos, 0, batch.positions)
        sin = torch.index_select(self.sin, 0, batch.positions)
        n = x.shape[0]
        paged = batch.slot_offsets.shape[0]
        heads, kv_heads = cfg.num_heads, cfg.num_kv_heads
        hooks = batch.hooks
        for i, w in enumerate(self.layers):
            h = _rms_norm(x, w.input_norm, cfg.rms_norm_eps)
            qkv = F.linear(h, w.qkv, w.qkv_bias).view(n, heads + 2 * kv_heads, cfg.head_dim)
            qk = apply_rope(qkv[:, : heads + kv_heads], cos, sin)  # q and k in one go
            q, k, v = qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads :]
            cache = kv_caches[i]
            if hooks is not None:
                hooks.before_layer(i)
            kp, vp = (k, v) if paged == n else (k[:paged], v[:paged])
            cache[batch.slot_pages[i], :, batch.slot_offsets] = torch.stack((kp, vp), dim=1)
            o = self.attention.forward(batch.attn_plans[i], q, k, v, cache)
            if hooks is not None:
                hooks.after_layer(i, k, v)
            x = x + F.linear(o.reshape(n, cfg.q_size), w.o, w.o_bias)
            h = _rms_norm(x, w.post_norm, cfg.rms_norm_eps)
            gate, up = F.linear(h, w.gate_up, w.gate_up_bias).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w.down, w.down_bias)
        x = _rms_norm(torch.index_select(x, 0, batch.logit_rows), self.norm, cfg.rms_norm_eps)
        return F.linear(x, self.lm_head).float()


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    if dtype == torch.float32:  # the fused op computes bit-identically to the code below
        return F.rms_norm(x, weight.shape, weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def _layer(w: dict[str, torch.Tensor], p: str) -> LayerWeights:
    def cat(*names: str) -> torch.Tensor:
        return torch.cat([w[p + name] for name in names], dim=0).contiguous()

    def cat_if_all(*names: str) -> torch.Tensor | None:
        """Optional tensors (biases): fused when the checkpoint has every one of them."""
        return cat(*names) if all(p + name in w for name in names) else None

    a, m = "self_attn.", "mlp."
    return LayerWeights(
        input_norm=w[p + "input_layernorm.weight"],
        qkv=cat(a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
        qkv_bias=cat_if_all(a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"),
        o=w[p + a + "o_proj.weight"],
        o_bias=w.get(p + a + "o_proj.bias"),
        post_norm=w[p + "post_attention_layernorm.weight"],
        gate_up=cat(m + "gate_proj.weight", m + "up_proj.weight"),
        gate_up_bias=cat_if_all(m + "gate_proj.bias", m + "up_proj.bias"),
        down=w[p + m + "down_proj.weight"],
        down_bias=w.get(p + m + "down_proj.bias"),
    )
