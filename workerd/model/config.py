"""ModelConfig: the shape of a Llama-family model, read from an HF `config.json`.

Accepts the transformers v4 and v5 spellings: `rope_theta`/`rope_scaling` or `rope_parameters`,
`torch_dtype` or `dtype`, `type` or `rope_type` inside the scaling dict. Anything the engine
cannot run (another architecture, an activation other than SiLU, a RoPE type other than
default/linear/llama3) is a ModelError that names it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mell.common.errors import ModelError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True, slots=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


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

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def with_max_model_len(self, max_model_len: int) -> ModelConfig:
        return replace(self, max_model_len=max_model_len)


def load_model_config(directory: str | Path) -> ModelConfig:
    """Read `config.json` (and `generation_config.json` for extra EOS ids) from a checkpoint."""
    directory = Path(directory)
    path = directory / "config.json"
    raw = _read_json(path)
    if raw is None:
        raise ModelError(f"{directory}: no config.json (not a checkpoint directory?)")
    gen = _read_json(directory / "generation_config.json") or {}
    return parse_model_config(raw, generation=gen, source=str(path))


def parse_model_config(
    raw: dict[str, Any], *, generation: dict[str, Any] | None = None, source: str = "config.json"
) -> ModelConfig:
    arch = _architecture(raw, source)
    model_type = SUPPORTED_ARCHITECTURES[arch]
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ModelError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")
    hidden = _req_int(raw, "hidden_size", source)
    heads = _req_int(raw, "num_attention_heads", source)
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    head_dim = int(raw.get("head_dim") or hidden // heads)
    if heads % kv_heads:
        raise ModelError(
            f"{source}: num_attention_heads {heads} is not a multiple of "
            f"num_key_value_heads {kv_heads}"
        )
    max_pos = int(raw.get("max_position_embeddings") or 2048)
    max_len = max_pos
    if _uses_sliding_window(raw, model_type):
        # The engine attends to the whole context; cap it so the window never applies.
        max_len = min(max_len, int(raw["sliding_window"]))
    attention_bias = bool(raw.get("attention_bias", False))
    qkv_bias = True if model_type == "qwen2" else attention_bias
    o_bias = False if model_type == "qwen2" else attention_bias
    return ModelConfig(
        architecture=arch,
        model_type=model_type,
        vocab_size=_req_int(raw, "vocab_size", source),
        hidden_size=hidden,
        intermediate_size=_req_int(raw, "intermediate_size", source),
        num_layers=_req_int(raw, "num_hidden_layers", source),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope=_rope(raw, source),
        max_position_embeddings=max_pos,
        max_model_len=max_len,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        dtype=_dtype(raw),
        eos_token_ids=_eos_ids(raw, generation or {}),
        bos_token_id=raw.get("bos_token_id"),
    )


def _architecture(raw: dict[str, Any], source: str) -> str:
    archs = raw.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return str(arch)
    if not archs:
        by_type = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
        if raw.get("model_type") in by_type:
            return by_type[raw["model_type"]]
    named = ", ".join(archs) or f"model_type {raw.get('model_type')!r}"
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    raise ModelError(f"{source}: unsupported architecture {named} (supported: {supported})")


def _rope(raw: dict[str, Any], source: str) -> RopeConfig:
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "rope_type" not in params and "rope_theta" not in params:
        # v5 per-layer-type form ({"full_attention": {...}}): take the full-attention entry.
        params = params.get("full_attention") or next(iter(params.values()), None)
    scaling = params if isinstance(params, dict) else raw.get("rope_scaling") or {}
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        theta = float(params["rope_theta"])
    else:
        theta = float(raw.get("rope_theta") or 10000.0)
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
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
    return RopeConfig(
        theta=theta,
        type="llama3",
        factor=factor,
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            scaling.get("original_max_position_embeddings")
            or raw.get("max_position_embeddings")
            or 8192
        ),
    )


def _uses_sliding_window(raw: dict[str, Any], model_type: str) -> bool:
    window = raw.get("sliding_window")
    if not window:
        return False
    if model_type == "qwen2":
        return bool(raw.get("use_sliding_window", False))
    return True


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


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        return None
    except OSError as err:
        raise ModelError(f"{path}: cannot read: {err.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ModelError(f"{path}: invalid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data
