"""Reading a checkpoint's tensors from safetensors: one file, or shards with an index file.

`load_weights` returns exactly the tensors the model needs, checked by name and shape against
the ModelConfig, converted to the target dtype and device. A missing or mis-shaped tensor is a
ModelError naming it and the file it was looked for in; so is a tensor stored in a type other
than float32/bfloat16/float16 (float8 or integer weights of a quantized checkpoint).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mell.common.errors import ModelError
from mell.workerd.model.config import ModelConfig

if TYPE_CHECKING:
    from safetensors import safe_open as SafeOpen

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
FLOAT_DTYPES = ("F32", "BF16", "F16")  # safetensors' names


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name the model reads, with its shape (HF Llama-family naming)."""
    h, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    norms = ["input_layernorm", "post_attention_layernorm"]
    if cfg.gemma_norms:
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        for norm in norms:
            shapes[f"{p}{norm}.weight"] = (h,)
        if cfg.fused_checkpoint:
            shapes[p + "self_attn.qkv_proj.weight"] = (q + 2 * kv, h)
        for name, out in (("q", q), ("k", kv), ("v", kv)):
            if not cfg.fused_checkpoint:
                shapes[f"{p}self_attn.{name}_proj.weight"] = (out, h)
            if cfg.qkv_bias:
                shapes[f"{p}self_attn.{name}_proj.bias"] = (out,)
        if cfg.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (cfg.head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (cfg.head_dim,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        if cfg.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if cfg.fused_checkpoint:
            shapes[p + "mlp.gate_up_proj.weight"] = (2 * inter, h)
        else:
            shapes[p + "mlp.gate_proj.weight"] = (inter, h)
            shapes[p + "mlp.up_proj.weight"] = (inter, h)
        shapes[p + "mlp.down_proj.weight"] = (h, inter)
        if cfg.mlp_bias:
            shapes[p + "mlp.gate_proj.bias"] = (inter,)
            shapes[p + "mlp.up_proj.bias"] = (inter,)
            shapes[p + "mlp.down_proj.bias"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def weight_files(directory: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file holding it."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ModelError(f"{index}: unreadable index: {err}") from None
        return {name: directory / file for name, file in weight_map.items()}
    files = [directory / SINGLE_FILE] if (directory / SINGLE_FILE).is_file() else []
    files = files or sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{directory}: no safetensors weights (model.safetensors or {INDEX_FILE})")
    from safetensors import safe_open

    mapping: dict[str, Path] = {}
    for file in files:
        with _open(file, safe_open) as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has keys(), not iteration)
                mapping[name] = file
    return mapping


def load_weights(
    directory: str | Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """Load and check every tensor of `expected_shapes(cfg)`; other tensors are ignored. Names
    in the files carry `cfg.weight_prefix`; the returned ones do not."""
    from safetensors import safe_open

    directory = Path(directory)
    prefix = cfg.weight_prefix
    shapes = {prefix + name: shape for name, shape in expected_shapes(cfg).items()}
    where = weight_files(directory)
    missing = [name for name in shapes if name not in where]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelError(f"{directory}: missing tensor {missing[0]}{more}")
    by_file: dict[Path, list[str]] = {}
    for name in shapes:
        by_file.setdefault(where[name], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        if not file.is_file():
            raise ModelError(f"{file}: shard named in the index is missing (tensor {names[0]})")
        with _open(file, safe_open) as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise ModelError(f"{file}: missing tensor {name}")
                info = f.get_slice(name)
                if info.get_dtype() not in FLOAT_DTYPES:
                    raise ModelError(
                        f"{file}: tensor {name} is stored as {info.get_dtype()} (a quantized "
                        "checkpoint?); only float32, bfloat16 and float16 weights are supported"
                    )
                shape = tuple(info.get_shape())
                if shape != shapes[name]:
                    raise ModelError(
                        f"{file}: tensor {name} has shape {list(shape)}, "
                        f"expected {list(shapes[name])}"
                    )
                out[name.removeprefix(prefix)] = f.get_tensor(name).to(device=device, dtype=dtype)
    return out


def _open(file: Path, safe_open: type[SafeOpen]) -> SafeOpen:
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own error types
        raise ModelError(f"{file}: cannot read safetensors: {err}") from None
