"""mell-tiny: deterministic files, a working tokenizer with ChatML, `mellctl model init-tiny`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mell.common import tiny_model
from mell.common.tiny_model import (
    IM_END_ID,
    IM_START_ID,
    TINY_MODEL_NAME,
    ensure_tiny_model,
    write_tiny_model,
)

FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0)


def _bytes(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in FILES}


def test_same_seed_gives_byte_identical_files_across_processes(tiny, tmp_path) -> None:
    # A separate process: fresh hash seeds and thread pools, as on another machine.
    code = (
        "import sys; from pathlib import Path; from mell.common.tiny_model import write_tiny_model;"
        "write_tiny_model(Path(sys.argv[1]), seed=0)"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=120)
    assert _bytes(tmp_path) == _bytes(tiny)


def test_another_seed_changes_only_the_weights(tiny, tmp_path) -> None:
    other = _bytes(write_tiny_model(tmp_path, seed=1))
    same = _bytes(tiny)
    assert other["model.safetensors"] != same["model.safetensors"]
    assert {k: v for k, v in other.items() if k != "model.safetensors"} == {
        k: v for k, v in same.items() if k != "model.safetensors"
    }


def test_ensure_keeps_existing_files(tiny, tmp_path) -> None:
    assert TINY_MODEL_NAME == "mell-tiny"
    target = ensure_tiny_model(tmp_path / "m")
    assert all((target / name).is_file() for name in FILES)
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    ensure_tiny_model(target)
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp


def test_tokenizer_round_trips_and_knows_chatml(tiny) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    assert tok.get_vocab_size() == tiny_model.VOCAB_SIZE
    text = "Hello, café 東京 🙂\n  two spaces"
    assert tok.decode(tok.encode(text).ids) == text
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert ids[0] == IM_START_ID and ids[-1] == IM_END_ID
    config = json.loads((tiny / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>"
    assert "<|im_start|>" in config["chat_template"]
    model = json.loads((tiny / "config.json").read_text())
    assert model["eos_token_id"] == IM_END_ID
    assert model["vocab_size"] == tiny_model.VOCAB_SIZE


def test_chat_template_renders_chatml(tiny) -> None:
    import jinja2

    template = json.loads((tiny / "tokenizer_config.json").read_text())["chat_template"]
    text = (
        jinja2.Environment()
        .from_string(template)
        .render(messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True)
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_the_model_loads_in_the_engine(tiny) -> None:
    from mell.workerd.model.config import load_model_config

    cfg = load_model_config(tiny)
    assert cfg.eos_token_ids == [IM_END_ID, 0]
    assert cfg.num_kv_heads < cfg.num_heads  # GQA
    assert cfg.head_dim == 64  # a FlashInfer-supported head size


def test_mellctl_model_init_tiny(tiny, tmp_path, capsys) -> None:
    from mell.gateway.mellctl.main import main

    assert main(["model", "init-tiny", str(tmp_path / "t"), "--seed", "0"]) == 0
    assert _bytes(tmp_path / "t") == _bytes(tiny)
    assert "mell-tiny" in capsys.readouterr().out


def test_tiny_model_module_does_not_import_torch() -> None:
    code = (
        "import sys, tempfile, pathlib; from mell.common.tiny_model import write_tiny_model;"
        "write_tiny_model(pathlib.Path(tempfile.mkdtemp()));"
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_concurrent_creation_by_several_processes(tiny, tmp_path) -> None:
    code = (
        "import sys; from pathlib import Path; from mell.common.tiny_model import write_tiny_model;"
        "write_tiny_model(Path(sys.argv[1]), seed=0)"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "m")]) for _ in range(3)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    assert _bytes(tmp_path / "m") == _bytes(tiny)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted(FILES)
