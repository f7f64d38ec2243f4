"""ModelConfig: the shape of a supported decoder model, read from an HF `config.json`.

Supported architectures (`architectures[0]` in config.json):

- LlamaForCausalLM (Llama 2/3/3.x; default, linear and llama3 RoPE)
- MistralForCausalLM (a sliding window on every layer when `sliding_window` is set)
- Qwen2ForCausalLM (q/k/v biases; sliding layers from `max_window_layers` when enabled)
- Qwen3ForCausalLM (per-head q/k RMSNorm before RoPE, no q/k/v bias)
- Gemma2ForCausalLM (GELU-tanh MLP, embeddings scaled by sqrt(hidden), RMSNorm by (1 + weight),
  norms after attention and around the MLP, `query_pre_attn_scalar`, attention and final logit
  soft-capping, sliding-window layers alternating with global ones)
- Gemma3ForCausalLM (the Gemma 3 text model: as Gemma 2 without soft-capping, plus q/k norms,
  and its own RoPE for the sliding layers: `rope_local_base_freq` / `rope_parameters`)
- Gemma3ForConditionalGeneration (Gemma 3 4B/12B/27B: its text model only, read from
  `text_config` and the `language_model.` tensors; images are not supported)
- Phi3ForCausalLM (fused `qkv_proj` and `gate_up_proj`, LongRoPE ("longrope" / "su") scaling)

Accepts the transformers v4 and v5 spellings: `rope_theta`/`rope_scaling` or `rope_parameters`
(flat, or per layer type), `torch_dtype` or `dtype`, `type` or `rope_type` inside the scaling
dict. Anything the engine cannot run (another architecture, another activation, a RoPE type
other than default/linear/llama3/longrope, partial rotary embeddings, a quantized checkpoint) is
a ModelError that names it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mell.common.errors import ModelError
from mell.common.model_spec import read_checkpoint_json

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "Gemma3ForConditionalGeneration": "gemma3_text",
    "Phi3ForCausalLM": "phi3",
}
MULTIMODAL = {"Gemma3ForConditionalGeneration": "language_model."}  # text model's tensor prefix
# Gemma3TextConfig's defaults: a multimodal config.json written by transformers 4.x leaves out
# every text_config value equal to them.
GEMMA3_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "tie_word_embeddings": True,
    "eos_token_id": 1,
    "bos_token_id": 2,
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
GEMMA = ("gemma2", "gemma3_text")
SLIDING = "sliding_attention"


@dataclass(frozen=True, slots=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"  # default | linear | llama3 | longrope
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    short_factor: tuple[float, ...] = ()  # longrope: per-frequency divisors up to the original
    long_factor: tuple[float, ...] = ()  # length, and beyond it
    attention_factor: float = 1.0  # longrope: cos and sin are multiplied by it


@dataclass(frozen=True, slots=True)
class ModelConfig:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    max_model_len: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    dtype: str = "float32"  # the checkpoint's dtype
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    hidden_act: str = "silu"  # silu | gelu_pytorch_tanh
    query_pre_attn_scalar: float | None = None  # softmax scale is its -0.5 power (Gemma)
    attn_logit_softcap: float | None = None  # cap * tanh(score / cap) before the softmax
    final_logit_softcap: float | None = None  # the same on the output logits
    sliding_window: int | None = None  # a query at p sees keys p - window < k <= p
    sliding_layers: tuple[bool, ...] = ()  # per layer: the window applies (empty: none does)
    local_rope: RopeConfig | None = None  # RoPE of the sliding layers, when it differs (Gemma 3)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3, Gemma 3)
    gemma_norms: bool = False  # RMSNorm scales by (1 + weight) in float32; embeddings * sqrt(h);
    # norms after attention and before/after the MLP (Gemma 2 and 3)
    fused_checkpoint: bool = False  # the checkpoint stores qkv_proj and gate_up_proj (Phi-3)
    weight_prefix: str = ""  # before the tensor names (a multimodal checkpoint's text model)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def attention_scale(self) -> float:
        """The softmax scale: 1/sqrt(query_pre_attn_scalar) where given, else 1/sqrt(head_dim)."""
        return math.pow(self.query_pre_attn_scalar or self.head_dim, -0.5)

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of `layer`, None for a layer that sees the whole context."""
        if self.sliding_window is None or not self.sliding_layers[layer]:
            return None
        return self.sliding_window

    def layer_rope(self, layer: int) -> RopeConfig:
        if self.local_rope is not None and self.layer_window(layer) is not None:
            return self.local_rope
        return self.rope

    def with_max_model_len(self, max_model_len: int) -> ModelConfig:
        return replace(self, max_model_len=max_model_len)


def load_model_config(directory: str | Path) -> ModelConfig:
    """Read `config.json` (and `generation_config.json` for extra EOS ids) from a checkpoint."""
    directory = Path(directory)
    path = directory / "config.json"
    raw = read_checkpoint_json(path)
    if raw is None:
        raise ModelError(f"{directory}: no config.json (not a checkpoint directory?)")
    gen = read_checkpoint_json(directory / "generation_config.json") or {}
    return parse_model_config(raw, generation=gen, source=str(path))


def parse_model_config(
    raw: dict[str, Any], *, generation: dict[str, Any] | None = None, source: str = "config.json"
) -> ModelConfig:
    arch = _architecture(raw, source)
    model_type = SUPPORTED_ARCHITECTURES[arch]
    _refuse_quantized(raw, source)
    if arch in MULTIMODAL:
        raw = _text_config(raw, source)
    gemma = model_type in GEMMA
    act = raw.get("hidden_activation") or raw.get("hidden_act") or "silu"
    if act not in SUPPORTED_ACTIVATIONS:
        raise ModelError(
            f"{source}: hidden_act {act!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)})"
        )
    hidden = _req_int(raw, "hidden_size", source)
    heads = _req_int(raw, "num_attention_heads", source)
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    head_dim = int(raw.get("head_dim") or hidden // heads)
    if heads % kv_heads:
        raise ModelError(
            f"{source}: num_attention_heads {heads} is not a multiple of "
            f"num_key_value_heads {kv_heads}"
        )
    layers = _req_int(raw, "num_hidden_layers", source)
    max_pos = int(raw.get("max_position_embeddings") or 2048)
    attention_bias = bool(raw.get("attention_bias", False))
    qkv_bias = True if model_type == "qwen2" else attention_bias
    o_bias = False if model_type == "qwen2" else attention_bias
    window, sliding = _sliding_layers(raw, model_type, layers, source)
    rope, local_rope = _ropes(raw, model_type, source)
    return ModelConfig(
        architecture=arch,
        model_type=model_type,
        vocab_size=_req_int(raw, "vocab_size", source),
        hidden_size=hidden,
        intermediate_size=_req_int(raw, "intermediate_size", source),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope=rope,
        max_position_embeddings=max_pos,
        max_model_len=max_pos,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", gemma)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        dtype=_dtype(raw),
        eos_token_ids=_eos_ids(raw, generation or {}),
        bos_token_id=raw.get("bos_token_id"),
        hidden_act=act,
        query_pre_attn_scalar=_opt_float(raw, "query_pre_attn_scalar") if gemma else None,
        attn_logit_softcap=_opt_float(raw, "attn_logit_softcapping") if gemma else None,
        final_logit_softcap=_opt_float(raw, "final_logit_softcapping") if gemma else None,
        sliding_window=window,
        sliding_layers=sliding,
        local_rope=local_rope,
        qk_norm=model_type in ("qwen3", "gemma3_text"),
        gemma_norms=gemma,
        fused_checkpoint=model_type == "phi3",
        weight_prefix=MULTIMODAL.get(arch, ""),
    )


def _architecture(raw: dict[str, Any], source: str) -> str:
    archs = raw.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return str(arch)
    if not archs:
        by_type: dict[str, str] = {}
        for name, model_type in SUPPORTED_ARCHITECTURES.items():
            by_type.setdefault(model_type, name)
        if raw.get("model_type") in by_type:
            return by_type[raw["model_type"]]
    named = ", ".join(archs) or f"model_type {raw.get('model_type')!r}"
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    raise ModelError(f"{source}: unsupported architecture {named} (supported: {supported})")


def _text_config(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """A multimodal config's text model: its `text_config` over the text defaults, with the
    outer dtype and EOS ids where the text config has none."""
    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise ModelError(f"{source}: {raw['architectures'][0]} without a text_config")
    _refuse_quantized(text, source)
    outer = {k: raw[k] for k in ("dtype", "torch_dtype", "eos_token_id") if raw.get(k) is not None}
    return {**GEMMA3_TEXT_DEFAULTS, **outer, **text}


def _refuse_quantized(raw: dict[str, Any], source: str) -> None:
    quant = raw.get("quantization_config") or raw.get("compression_config")
    if quant:
        method = (
            quant.get("quant_method") or quant.get("format") if isinstance(quant, dict) else None
        )
        raise ModelError(
            f"{source}: quantized checkpoint (quantization_config, quant_method {method!r}) is "
            "not supported; use a float32, bfloat16 or float16 checkpoint"
        )


def _ropes(
    raw: dict[str, Any], model_type: str, source: str
) -> tuple[RopeConfig, RopeConfig | None]:
    """The RoPE of the (global) layers, and that of Gemma 3's sliding layers."""
    params = raw.get("rope_parameters")
    local: dict[str, Any] | None = None
    if isinstance(params, dict) and not {"rope_type", "type", "rope_theta"} & params.keys():
        # v5 per-layer-type form: {"full_attention": {...}, "sliding_attention": {...}}
        local = params.get(SLIDING)
        params = params.get("full_attention") or next(iter(params.values()), None)
    scaling = params if isinstance(params, dict) else raw.get("rope_scaling") or {}
    default_theta = 1_000_000.0 if model_type == "gemma3_text" else 10000.0
    theta = float(scaling.get("rope_theta") or raw.get("rope_theta") or default_theta)
    rope = _rope(raw, scaling, theta, source)
    if model_type != "gemma3_text":
        return rope, None
    if local is None:  # v4: the sliding layers use plain RoPE with their own base
        local = {"rope_type": "default", "rope_theta": raw.get("rope_local_base_freq", 10000.0)}
    return rope, _rope(raw, local, float(local.get("rope_theta") or 10000.0), source)


def _rope(raw: dict[str, Any], scaling: dict[str, Any], theta: float, source: str) -> RopeConfig:
    partial = scaling.get("partial_rotary_factor") or raw.get("partial_rotary_factor") or 1.0
    if float(partial) != 1.0:
        raise ModelError(f"{source}: partial_rotary_factor {partial} is not supported (only 1.0)")
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    rope_type = "longrope" if rope_type == "su" else rope_type  # Phi-3's first name for it
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelError(
            f"{source}: rope type {rope_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type == "default":
        return RopeConfig(theta=theta)
    factor = float(scaling.get("factor", 1.0))
    if rope_type == "linear":
        return RopeConfig(theta=theta, type="linear", factor=factor)
    original = int(
        raw.get("original_max_position_embeddings")  # Phi-3 keeps it here; it wins
        or scaling.get("original_max_position_embeddings")
        or raw.get("max_position_embeddings")
        or 8192
    )
    if rope_type == "longrope":
        return _longrope(raw, scaling, theta, original, source)
    return RopeConfig(
        theta=theta,
        type="llama3",
        factor=factor,
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=original,
    )


def _longrope(
    raw: dict[str, Any], scaling: dict[str, Any], theta: float, original: int, source: str
) -> RopeConfig:
    """LongRoPE as transformers computes it: `factor` defaults to max_position_embeddings /
    original length, and cos/sin are scaled by sqrt(1 + ln(factor) / ln(original))."""
    heads = _req_int(raw, "num_attention_heads", source)
    half = int(raw.get("head_dim") or _req_int(raw, "hidden_size", source) // heads) // 2
    factors = []
    for key in ("short_factor", "long_factor"):
        value = scaling.get(key)
        if not isinstance(value, list) or len(value) != half:
            raise ModelError(f"{source}: longrope {key} must be a list of {half} numbers")
        factors.append(tuple(float(x) for x in value))
    max_pos = int(raw.get("max_position_embeddings") or original)
    factor = float(scaling.get("factor") or max_pos / original)
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0
        if factor > 1.0:
            attention_factor = math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeConfig(
        theta=theta,
        type="longrope",
        factor=factor,
        original_max_position_embeddings=original,
        short_factor=factors[0],
        long_factor=factors[1],
        attention_factor=float(attention_factor),
    )


def _sliding_layers(
    raw: dict[str, Any], model_type: str, num_layers: int, source: str
) -> tuple[int | None, tuple[bool, ...]]:
    """The sliding window and which layers it applies to, as transformers decides them."""
    if raw.get("use_bidirectional_attention"):
        raise ModelError(f"{source}: use_bidirectional_attention is not supported")
    window = raw.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not raw.get("use_sliding_window", False):
        window = None
    if model_type == "llama" or not window:
        return None, ()
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        raise ModelError(f"{source}: sliding_window must be a positive integer, got {window!r}")
    if model_type in ("mistral", "phi3"):  # every layer (transformers ignores layer_types)
        return window, (True,) * num_layers
    types = raw.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != num_layers:
            raise ModelError(f"{source}: layer_types must list one type per layer ({num_layers})")
        return window, tuple(t == SLIDING for t in types)
    if model_type == "gemma2":
        return window, tuple(bool((i + 1) % 2) for i in range(num_layers))
    if model_type == "gemma3_text":
        pattern = int(raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern") or 6)
        return window, tuple(bool((i + 1) % pattern) for i in range(num_layers))
    first = int(raw.get("max_window_layers", 28))  # Qwen2/Qwen3
    return window, tuple(i >= first for i in range(num_layers))


def _opt_float(raw: dict[str, Any], key: str) -> float | None:
    value = raw.get(key)
    return None if value is None else float(value)


def _dtype(raw: dict[str, Any]) -> str:
    value = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    return str(value).removeprefix("torch.")


def _eos_ids(raw: dict[str, Any], generation: dict[str, Any]) -> list[int]:
    ids: list[int] = []
    for value in (raw.get("eos_token_id"), generation.get("eos_token_id")):
        if value is None:
            continue
        for token in value if isinstance(value, list) else [value]:
            if int(token) not in ids:
                ids.append(int(token))
    return ids


def _req_int(raw: dict[str, Any], key: str, source: str) -> int:
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelError(f"{source}: {key} must be a positive integer, got {value!r}")
    return value
