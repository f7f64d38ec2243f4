"""Tiny random HF checkpoints (written by transformers itself) and reference generation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCAB = 384


def make_checkpoint(directory: Path, kind: str, seed: int = 0) -> Path:
    """A random float32 checkpoint: "llama", "llama-gqa-llama3", "mistral", "qwen2", "qwen3",
    "gemma2", "gemma3", "gemma3-multimodal" or "phi3"."""
    import transformers

    torch.manual_seed(seed)
    common = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "initializer_range": 0.2,  # spread logits so float rounding never flips an argmax
        "eos_token_id": 1,
        "bos_token_id": 0,
        "pad_token_id": 0,
    }
    if kind == "llama":
        cfg = transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=4, **common)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "llama-gqa-llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        cfg = transformers.LlamaConfig(
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=16,
            rope_parameters=rope,
            **common,
        )
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "mistral":  # a window well inside the test prompts
        cfg = transformers.MistralConfig(
            num_attention_heads=8, num_key_value_heads=2, sliding_window=40, **common
        )
        model = transformers.MistralForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, **common
        )
        model = transformers.Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # random-init biases are zero; make them matter
            for layer in model.model.layers:
                for proj in (
                    layer.self_attn.q_proj,
                    layer.self_attn.k_proj,
                    layer.self_attn.v_proj,
                ):
                    proj.bias.normal_(0.0, 0.5)
    elif kind in NEW_KINDS:
        model = NEW_KINDS[kind](transformers, common)
    else:
        raise ValueError(kind)
    model = model.float().eval()
    model.save_pretrained(directory)
    return directory


def _randomize(*tensors: torch.Tensor, mean: float = 0.0, std: float = 0.3) -> None:
    """Random-init norms are ones (or zeros, Gemma) and biases zeros: make them matter."""
    with torch.no_grad():
        for t in tensors:
            t.normal_(mean, std)


def _qwen3(transformers: Any, common: dict[str, Any]) -> Any:
    cfg = transformers.Qwen3Config(
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
        **common,
    )
    model = transformers.Qwen3ForCausalLM(cfg)
    for layer in model.model.layers:
        _randomize(layer.self_attn.q_norm.weight, layer.self_attn.k_norm.weight, mean=1.0)
    return model


def _gemma_norms(model: Any, decoder: Any = None) -> None:
    """Random norm weights, and smaller tied embeddings (`decoder`: the one with the layers)."""
    decoder = decoder or model.model
    for layer in decoder.layers:
        norms = [
            layer.input_layernorm,
            layer.post_attention_layernorm,
            layer.pre_feedforward_layernorm,
            layer.post_feedforward_layernorm,
        ]
        norms += [
            getattr(layer.self_attn, n) for n in ("q_norm", "k_norm") if hasattr(layer.self_attn, n)
        ]
        _randomize(*(n.weight for n in norms))
    _randomize(decoder.norm.weight)
    with torch.no_grad():  # the tied embeddings, scaled by sqrt(64), would drown the layers
        decoder.embed_tokens.weight.mul_(0.125)


def _gemma2(transformers: Any, common: dict[str, Any]) -> Any:
    """Alternating sliding (48 tokens) and global layers, both soft-caps, a query scale that
    is not head_dim's."""
    cfg = transformers.Gemma2Config(
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=48,
        attn_logit_softcapping=4.0,
        final_logit_softcapping=1.0,
        **{**common, "num_hidden_layers": 3},
    )
    model = transformers.Gemma2ForCausalLM(cfg)
    _gemma_norms(model)
    return model


def _gemma3(transformers: Any, common: dict[str, Any]) -> Any:
    """Sliding (48 tokens) and global layers with different RoPE (linear-scaled global)."""
    model = transformers.Gemma3ForCausalLM(_gemma3_text_config(transformers, common))
    _gemma_norms(model)
    return model


def _gemma3_multimodal(transformers: Any, common: dict[str, Any]) -> Any:
    """Gemma 3 with a (tiny) vision tower: the engine runs its text model."""
    vision = transformers.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    cfg = transformers.Gemma3Config(
        text_config=_gemma3_text_config(transformers, common),
        vision_config=vision,
        mm_tokens_per_image=4,
    )
    model = transformers.Gemma3ForConditionalGeneration(cfg)
    _gemma_norms(model, model.model.language_model)
    return model


def _gemma3_text_config(transformers: Any, common: dict[str, Any]) -> Any:
    rope = {
        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    }
    return transformers.Gemma3TextConfig(
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=48,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters=rope,
        **{**common, "num_hidden_layers": 3},
    )


PHI3_ORIGINAL_LEN = 512


def _phi3(transformers: Any, common: dict[str, Any]) -> Any:
    """LongRoPE: short factors up to 512 tokens, long ones beyond (max_position 1024)."""
    gen = torch.Generator().manual_seed(1)
    short = (1.0 + torch.rand(8, generator=gen)).tolist()
    long = (1.0 + 8 * torch.rand(8, generator=gen)).tolist()
    rope = {
        "rope_type": "longrope",
        "short_factor": short,
        "long_factor": long,
        "rope_theta": 10000.0,
    }
    cfg = transformers.Phi3Config(
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters=rope,
        original_max_position_embeddings=PHI3_ORIGINAL_LEN,
        **common,
    )
    return transformers.Phi3ForCausalLM(cfg)


NEW_KINDS = {
    "qwen3": _qwen3,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "gemma3-multimodal": _gemma3_multimodal,
    "phi3": _phi3,
}


def reference_greedy(
    directory: Path, prompts: list[list[int]], max_new: list[int]
) -> list[list[int]]:
    """transformers `generate` (greedy, one request at a time: no padding) per prompt."""
    import transformers

    # eager: transformers' SDPA path cannot soft-cap (Gemma 2); the same numbers otherwise
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    out = []
    with torch.inference_mode():
        for prompt, n in zip(prompts, max_new, strict=True):
            ids = torch.tensor([prompt])
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
            out.append(gen[0, len(prompt) :].tolist())
    return out
