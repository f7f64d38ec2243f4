"""Weight loading errors name the tensor; a tiny checkpoint loads with fused projections."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mell.common.errors import ModelError
from mell.common.tiny_model import write_tiny_model
from mell.workerd.model.config import load_model_config
from mell.workerd.model.weights import load_weights


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def _copy(tiny, tmp_path):
    for f in tiny.iterdir():
        shutil.copy(f, tmp_path / f.name)
    return tmp_path


def test_loads_every_tensor(tiny) -> None:
    cfg = load_model_config(tiny)
    weights = load_weights(tiny, cfg, torch.bfloat16, torch.device("cpu"))
    assert weights["lm_head.weight"].dtype == torch.bfloat16
    assert len(weights) == 3 + 9 * cfg.num_layers


def test_missing_tensor_is_named(tiny, tmp_path) -> None:
    d = _copy(tiny, tmp_path)
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_weights(d, load_model_config(d), torch.float32, torch.device("cpu"))


def test_misshaped_tensor_is_named(tiny, tmp_path) -> None:
    d = _copy(tiny, tmp_path)
    tensors = load_file(d / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(7)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"model\.norm\.weight has shape \[7\]"):
        load_weights(d, load_model_config(d), torch.float32, torch.device("cpu"))


def test_missing_shard_and_no_weights(tiny, tmp_path) -> None:
    d = _copy(tiny, tmp_path)
    names = list(load_file(d / "model.safetensors"))
    index = {"metadata": {}, "weight_map": dict.fromkeys(names, "model-00001-of-00002.safetensors")}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="model-00001-of-00002"):
        load_weights(d, load_model_config(d), torch.float32, torch.device("cpu"))
    (d / "model.safetensors.index.json").unlink()
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no safetensors"):
        load_weights(d, load_model_config(d), torch.float32, torch.device("cpu"))


def test_tied_checkpoint_needs_no_lm_head(tiny, tmp_path) -> None:
    d = _copy(tiny, tmp_path)
    config = json.loads((d / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (d / "config.json").write_text(json.dumps(config))
    tensors = load_file(d / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    weights = load_weights(d, load_model_config(d), torch.float32, torch.device("cpu"))
    assert "lm_head.weight" not in weights


def test_float8_tensor_is_refused_by_name(tiny, tmp_path) -> None:
    d = _copy(tiny, tmp_path)
    tensors = load_file(d / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"q_proj\.weight is stored as F8_E4M3"):
        load_weights(d, load_model_config(d), torch.float32, torch.device("cpu"))


def test_fp8_config_is_refused_before_loading(tiny, tmp_path) -> None:
    d = _copy(tiny, tmp_path)
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"quantized checkpoint .*'fp8'"):
        load_model_config(d)
