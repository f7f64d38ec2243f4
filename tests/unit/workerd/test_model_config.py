"""config.json parsing: v4 and v5 spellings, and clear errors for what the engine cannot run."""

from __future__ import annotations

import json

import pytest

from mell.common.errors import ModelError
from mell.workerd.model.config import load_model_config, parse_model_config

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


def test_qwen2_has_qkv_bias_and_mistral_window_caps_the_context() -> None:
    qwen = parse_model_config(
        {**BASE, "architectures": ["Qwen2ForCausalLM"], "num_key_value_heads": 2}
    )
    assert qwen.qkv_bias and not qwen.o_bias and qwen.num_kv_heads == 2
    mistral = parse_model_config(
        {**BASE, "architectures": ["MistralForCausalLM"], "sliding_window": 1024}
    )
    assert mistral.max_model_len == 1024


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
    ],
)
def test_errors_name_the_problem(change, named) -> None:
    with pytest.raises(ModelError, match=named):
        parse_model_config({**BASE, **change})


def test_missing_config_is_a_model_error(tmp_path) -> None:
    with pytest.raises(ModelError, match=r"config\.json"):
        load_model_config(tmp_path)
