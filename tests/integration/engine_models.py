"""Tiny random HF checkpoints (written by transformers itself) and reference generation."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 384


def make_checkpoint(directory: Path, kind: str, seed: int = 0) -> Path:
    """A random float32 checkpoint: "llama", "llama-gqa-llama3", "mistral" or "qwen2"."""
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
    elif kind == "mistral":
        cfg = transformers.MistralConfig(
            num_attention_heads=8, num_key_value_heads=2, sliding_window=4096, **common
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
    else:
        raise ValueError(kind)
    model = model.float().eval()
    model.save_pretrained(directory)
    return directory


def reference_greedy(
    directory: Path, prompts: list[list[int]], max_new: list[int]
) -> list[list[int]]:
    """transformers `generate` (greedy, one request at a time: no padding) per prompt."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
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
