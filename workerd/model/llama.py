"""The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3), gpt-fast
style: plain tensors, one forward over a flat batch of tokens from many requests.

q/k/v and gate/up projections are fused at load time (Phi-3's checkpoint has them fused
already). The families differ only in what the ModelConfig says: q/k norms (Qwen3, Gemma 3),
Gemma's norms (scale by 1 + weight, in float32), scaled embeddings, extra norms after attention
and around the MLP, GELU-tanh, soft-capping, sliding-window layers and a RoPE of their own.
Numerics follow transformers (RMSNorm in float32, RoPE tables in float32 cast to the model
dtype), so greedy decoding matches it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from mell.workerd.model.attention import AttentionBackend, LayerAttention
from mell.workerd.model.config import ModelConfig, RopeConfig
from mell.workerd.model.rope import apply_rope, cos_sin_table

Norm = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


@dataclass(slots=True)
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None  # [head_dim], per head before RoPE (Qwen3, Gemma 3)
    k_norm: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    attn_out_norm: torch.Tensor | None  # on the attention output (Gemma)
    mlp_norm: torch.Tensor
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None
    mlp_out_norm: torch.Tensor | None  # on the MLP output (Gemma)
    attention: LayerAttention
    rope: int  # index of the layer's cos/sin table


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
        self.norm_fn: Norm = _gemma_rms_norm if cfg.gemma_norms else _rms_norm
        self.embed = weights["model.embed_tokens.weight"]
        self.norm = _norm_weight(weights["model.norm.weight"], cfg)
        self.lm_head = self.embed if cfg.tie_word_embeddings else weights["lm_head.weight"]
        ropes = list(dict.fromkeys(cfg.layer_rope(i) for i in range(cfg.num_layers)))
        self.layers = [
            _layer(weights, cfg, i, ropes.index(cfg.layer_rope(i))) for i in range(cfg.num_layers)
        ]
        attention.use_layers([w.attention for w in self.layers])
        self.rope_tables = [self._table(rope, max_len) for rope in ropes]
        self.act: Callable[[torch.Tensor], torch.Tensor] = (
            _gelu_tanh if cfg.hidden_act == "gelu_pytorch_tanh" else F.silu
        )

    def _table(self, rope: RopeConfig, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows for every position a request can reach (below max_model_len)."""
        e, context = self.embed, self.cfg.max_model_len
        rows = min(max_len, context)
        return cos_sin_table(rope, self.cfg.head_dim, rows, e.dtype, e.device, context_len=context)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """Logits (float32) for `batch.logit_rows`, [R, vocab]."""
        cfg, norm, eps = self.cfg, self.norm_fn, self.cfg.rms_norm_eps
        x = F.embedding(batch.token_ids, self.embed)
        if cfg.gemma_norms:
            x = x * torch.tensor(cfg.hidden_size**0.5, dtype=x.dtype)
        rope = [
            (
                torch.index_select(cos, 0, batch.positions),
                torch.index_select(sin, 0, batch.positions),
            )
            for cos, sin in self.rope_tables
        ]
        n = x.shape[0]
        paged = batch.slot_offsets.shape[0]
        heads, kv_heads = cfg.num_heads, cfg.num_kv_heads
        hooks = batch.hooks
        for i, w in enumerate(self.layers):
            h = norm(x, w.input_norm, eps)
            qkv = F.linear(h, w.qkv, w.qkv_bias).view(n, heads + 2 * kv_heads, cfg.head_dim)
            qk = qkv[:, : heads + kv_heads]
            if w.q_norm is not None and w.k_norm is not None:
                qk = torch.cat(
                    (norm(qk[:, :heads], w.q_norm, eps), norm(qk[:, heads:], w.k_norm, eps)), 1
                )
            qk = apply_rope(qk, *rope[w.rope])  # q and k in one go
            q, k, v = qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads :]
            cache = kv_caches[i]
            if hooks is not None:
                hooks.before_layer(i)
            kp, vp = (k, v) if paged == n else (k[:paged], v[:paged])
            cache[batch.slot_pages[i], :, batch.slot_offsets] = torch.stack((kp, vp), dim=1)
            o = self.attention.forward(batch.attn_plans[i], q, k, v, cache, w.attention)
            if hooks is not None:
                hooks.after_layer(i, k, v)
            o = F.linear(o.reshape(n, cfg.q_size), w.o, w.o_bias)
            x = x + (o if w.attn_out_norm is None else norm(o, w.attn_out_norm, eps))
            h = norm(x, w.mlp_norm, eps)
            gate, up = F.linear(h, w.gate_up, w.gate_up_bias).chunk(2, dim=-1)
            m = F.linear(self.act(gate) * up, w.down, w.down_bias)
            x = x + (m if w.mlp_out_norm is None else norm(m, w.mlp_out_norm, eps))
        x = norm(torch.index_select(x, 0, batch.logit_rows), self.norm, eps)
        logits = F.linear(x, self.lm_head)
        if cfg.final_logit_softcap is not None:
            logits = torch.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
        return logits.float()


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: normalised in float32, cast back, then scaled."""
    dtype = x.dtype
    if dtype == torch.float32:  # the fused op computes bit-identically to the code below
        return F.rms_norm(x, weight.shape, weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def _gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: scaled in float32 (weight is 1 + the checkpoint's, float32), then cast."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight).to(x.dtype)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _norm_weight(weight: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Gemma norms scale by (1 + weight), computed in float32 as transformers does."""
    return 1.0 + weight.float() if cfg.gemma_norms else weight


def _layer(w: dict[str, torch.Tensor], cfg: ModelConfig, i: int, rope: int) -> LayerWeights:
    p = f"model.layers.{i}."

    def cat(*names: str) -> torch.Tensor:
        return torch.cat([w[p + name] for name in names], dim=0).contiguous()

    def cat_if_all(*names: str) -> torch.Tensor | None:
        """Optional tensors (biases): fused when the checkpoint has every one of them."""
        return cat(*names) if all(p + name in w for name in names) else None

    def norm(name: str) -> torch.Tensor | None:
        return _norm_weight(w[p + name], cfg) if p + name in w else None

    a, m = "self_attn.", "mlp."
    if cfg.fused_checkpoint:
        qkv, gate_up = w[p + a + "qkv_proj.weight"], w[p + m + "gate_up_proj.weight"]
    else:
        qkv = cat(a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight")
        gate_up = cat(m + "gate_proj.weight", m + "up_proj.weight")
    sandwich = cfg.gemma_norms  # Gemma: post_attention_layernorm is on the attention output
    mlp_norm = norm(
        "pre_feedforward_layernorm.weight" if sandwich else "post_attention_layernorm.weight"
    )
    assert mlp_norm is not None  # load_weights checked every required tensor
    attention = LayerAttention(cfg.attention_scale, cfg.layer_window(i), cfg.attn_logit_softcap)
    return LayerWeights(
        input_norm=_norm_weight(w[p + "input_layernorm.weight"], cfg),
        qkv=qkv,
        qkv_bias=cat_if_all(a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"),
        q_norm=norm(a + "q_norm.weight") if cfg.qk_norm else None,
        k_norm=norm(a + "k_norm.weight") if cfg.qk_norm else None,
        o=w[p + a + "o_proj.weight"],
        o_bias=w.get(p + a + "o_proj.bias"),
        attn_out_norm=norm("post_attention_layernorm.weight") if sandwich else None,
        mlp_norm=mlp_norm,
        gate_up=gate_up,
        gate_up_bias=cat_if_all(m + "gate_proj.bias", m + "up_proj.bias"),
        down=w[p + m + "down_proj.weight"],
        down_bias=w.get(p + m + "down_proj.bias"),
        mlp_out_norm=norm("post_feedforward_layernorm.weight") if sandwich else None,
        attention=attention,
        rope=rope,
    )
