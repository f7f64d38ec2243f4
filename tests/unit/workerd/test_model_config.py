"""config.json parsing: v4 and v5 spellings, and clear errors for what the engine cannot run."""

from __future__ import annotations

import json
import math

import pytest

from mell.common.errors import ModelError
from mell.workerd.model.config import RopeConfig, load_model_config, parse_model_config

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 100,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "max_position_embeddings": 4096,
    "eos_token_id": 2,
}
LLAMA3 = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def test_defaults() -> None:
    cfg = parse_model_config(BASE)
    assert (cfg.num_kv_heads, cfg.head_dim) == (8, 8)
    assert cfg.rope.type == "default" and cfg.rope.theta == 10000.0
    assert cfg.max_model_len == 4096 and cfg.eos_token_ids == [2]
    assert not cfg.qkv_bias and not cfg.tie_word_embeddings


@pytest.mark.parametrize(
    "spelling",
    [
        {"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **LLAMA3}},  # old v4
        {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **LLAMA3}},  # v4
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3}},  # v5
    ],
)
def test_rope_spellings(spelling) -> None:
    cfg = parse_model_config({**BASE, **spelling})
    assert cfg.rope.type == "llama3" and cfg.rope.theta == 500000.0
    assert cfg.rope.factor == 8.0 and cfg.rope.original_max_position_embeddings == 8192


def test_linear_rope_and_v5_default() -> None:
    cfg = parse_model_config({**BASE, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert (cfg.rope.type, cfg.rope.factor) == ("linear", 2.0)
    cfg = parse_model_config(
        {**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    )
    assert (cfg.rope.type, cfg.rope.theta) == ("default", 1e6)


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
def test_dtype_spellings(key) -> None:
    assert parse_model_config({**BASE, key: "bfloat16"}).dtype == "bfloat16"


def test_qwen2_has_qkv_bias_and_mistral_window_is_on_every_layer() -> None:
    qwen = parse_model_config(
        {**BASE, "architectures": ["Qwen2ForCausalLM"], "num_key_value_heads": 2}
    )
    assert qwen.qkv_bias and not qwen.o_bias and qwen.num_kv_heads == 2
    assert qwen.layer_window(0) is None and qwen.layer_window(1) is None
    mistral = parse_model_config(
        {**BASE, "architectures": ["MistralForCausalLM"], "sliding_window": 1024}
    )
    assert mistral.max_model_len == 4096  # the window is applied, not a cap on the context
    assert [mistral.layer_window(i) for i in range(2)] == [1024, 1024]


def test_qwen_sliding_layers_only_when_enabled() -> None:
    qwen = {**BASE, "architectures": ["Qwen3ForCausalLM"], "num_hidden_layers": 4}
    off = parse_model_config({**qwen, "sliding_window": 64, "max_window_layers": 2})
    assert [off.layer_window(i) for i in range(4)] == [None] * 4
    assert off.qk_norm and not off.qkv_bias
    on = parse_model_config(
        {**qwen, "sliding_window": 64, "max_window_layers": 2, "use_sliding_window": True}
    )
    assert [on.layer_window(i) for i in range(4)] == [None, None, 64, 64]


GEMMA2 = {
    **BASE,
    "architectures": ["Gemma2ForCausalLM"],
    "model_type": "gemma2",
    "num_hidden_layers": 4,
    "head_dim": 32,
    "hidden_activation": "gelu_pytorch_tanh",
    "query_pre_attn_scalar": 144,
    "sliding_window": 4096,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
}


def test_gemma2() -> None:
    cfg = parse_model_config(GEMMA2)
    assert cfg.gemma_norms and cfg.tie_word_embeddings and cfg.hidden_act == "gelu_pytorch_tanh"
    assert cfg.attention_scale == 144**-0.5 and cfg.head_dim == 32
    assert (cfg.attn_logit_softcap, cfg.final_logit_softcap) == (50.0, 30.0)
    assert [cfg.layer_window(i) for i in range(4)] == [4096, None, 4096, None]
    assert not cfg.qk_norm and cfg.local_rope is None
    assert cfg.max_model_len == 4096


def test_gemma3_v4_spelling() -> None:
    cfg = parse_model_config(
        {
            **GEMMA2,
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "num_hidden_layers": 12,
            "attn_logit_softcapping": None,
            "final_logit_softcapping": None,
            "sliding_window": 512,
            "sliding_window_pattern": 6,
            "rope_theta": 1_000_000.0,
            "rope_local_base_freq": 10_000.0,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        }
    )
    globals_ = [i for i in range(12) if cfg.layer_window(i) is None]
    assert globals_ == [5, 11] and cfg.layer_window(0) == 512
    assert cfg.qk_norm and cfg.attn_logit_softcap is None and cfg.final_logit_softcap is None
    assert cfg.layer_rope(5).type == "linear" and cfg.layer_rope(5).theta == 1e6
    assert cfg.layer_rope(0).type == "default" and cfg.layer_rope(0).theta == 1e4


def test_gemma3_multimodal_reads_the_sparse_text_config() -> None:
    """As transformers 4.x wrote Gemma 3 4B's config: text_config holds only non-defaults."""
    cfg = parse_model_config(
        {
            "architectures": ["Gemma3ForConditionalGeneration"],
            "model_type": "gemma3",
            "eos_token_id": [1, 106],
            "torch_dtype": "bfloat16",
            "text_config": {
                "hidden_size": 2560,
                "intermediate_size": 10240,
                "model_type": "gemma3_text",
                "num_hidden_layers": 34,
                "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                "sliding_window": 1024,
            },
            "vision_config": {"model_type": "siglip_vision_model"},
        }
    )
    assert cfg.weight_prefix == "language_model." and cfg.dtype == "bfloat16"
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (8, 4, 256, 262208)
    assert cfg.eos_token_ids == [1, 106] and cfg.tie_word_embeddings
    assert [i for i in range(34) if cfg.layer_window(i) is None] == [5, 11, 17, 23, 29]
    assert cfg.layer_window(0) == 1024 and cfg.attention_scale == 256**-0.5
    assert cfg.layer_rope(5) == RopeConfig(theta=1e6, type="linear", factor=8.0)
    assert cfg.layer_rope(0) == RopeConfig(theta=1e4)


def test_phi3_su_scaling_is_longrope() -> None:
    cfg = parse_model_config(
        {
            **BASE,
            "architectures": ["Phi3ForCausalLM"],
            "model_type": "phi3",
            "max_position_embeddings": 131072,
            "original_max_position_embeddings": 4096,
            "rope_scaling": {"type": "su", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4},
        }
    )
    assert cfg.fused_checkpoint and cfg.rope.type == "longrope"
    assert cfg.rope.long_factor == (2.0,) * 4 and cfg.rope.original_max_position_embeddings == 4096
    assert cfg.rope.attention_factor == pytest.approx((1 + math.log(32) / math.log(4096)) ** 0.5)


def test_unsupported_architecture_is_one_line_listing_the_supported() -> None:
    with pytest.raises(ModelError) as err:
        parse_model_config({**BASE, "architectures": ["GPT2LMHeadModel"]})
    message = str(err.value)
    assert "\n" not in message and "GPT2LMHeadModel" in message
    for arch in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM", "Phi3ForCausalLM"):
        assert arch in message


@pytest.mark.parametrize(
    ("quant", "named"),
    [
        ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "fp8"),
        ({"quant_method": "awq", "bits": 4}, "awq"),
        ({"quant_method": "compressed-tensors", "format": "float-quantized"}, "compressed-tensors"),
    ],
)
def test_quantized_checkpoints_are_refused(quant, named) -> None:
    with pytest.raises(ModelError, match=f"quantized checkpoint.*{named}"):
        parse_model_config({**BASE, "quantization_config": quant})


def test_eos_ids_merge_generation_config(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert load_model_config(tmp_path).eos_token_ids == [2, 7]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"hidden_act": "gelu"}, "gelu"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"vocab_size": "many"}, "vocab_size"),
        ({"partial_rotary_factor": 0.75}, "partial_rotary_factor"),
        ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0]}}, "short_factor"),
        (
            {"architectures": ["Gemma3ForCausalLM"], "use_bidirectional_attention": True},
            "use_bidirectional_attention",
        ),
    ],
)
def test_errors_name_the_problem(change, named) -> None:
    with pytest.raises(ModelError, match=named):
        parse_model_config({**BASE, **change})


def test_missing_config_is_a_model_error(tmp_path) -> None:
    with pytest.raises(ModelError, match=r"config\.json"):
        load_model_config(tmp_path)
