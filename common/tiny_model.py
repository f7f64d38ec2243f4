"""mell-tiny: a small random-weight Llama checkpoint with a byte-level BPE tokenizer.

It exists so that everything runs on a laptop with no download. Its text is meaningless.
The files are a deterministic function of the seed: numpy PCG64 for the weights, a BPE
trained single-threaded on the corpus shipped beside this module, and JSON written with
sorted keys. No torch here: the gateway calls this.

Special tokens: 0 `<|endoftext|>`, 1 `<|im_start|>`, 2 `<|im_end|>`. The chat template is
ChatML; generation stops at `<|im_end|>` (config `eos_token_id`), and also at `<|endoftext|>`
(generation_config lists both).
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

TINY_MODEL_NAME = "mell-tiny"

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 0, 1, 2

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Shape of the model. head_dim 64 keeps it usable with FlashInfer on a GPU.
VOCAB_SIZE = 512
HIDDEN_SIZE = 128
INTERMEDIATE_SIZE = 256
NUM_LAYERS = 2
NUM_HEADS = 2
NUM_KV_HEADS = 1
HEAD_DIM = 64
MAX_POSITION_EMBEDDINGS = 2048
INIT_STD = 0.02

_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def ensure_tiny_model(directory: Path, seed: int = 0) -> Path:
    """Create mell-tiny in `directory` unless all its files are there; return the directory.

    Safe to call from several processes at once (each file is renamed into place whole).
    """
    directory = Path(directory)
    if not all((directory / name).is_file() for name in _FILES):
        write_tiny_model(directory, seed)
    return directory


def write_tiny_model(directory: Path, seed: int = 0, *, init_std: float = INIT_STD) -> Path:
    """(Re)write every file of mell-tiny; the same seed gives byte-identical files.

    `init_std` (tests only) scales the random weights; larger values spread the logits.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer_json = _train_tokenizer()
    _write_text(directory / "tokenizer.json", tokenizer_json)
    _write_json(directory / "tokenizer_config.json", _tokenizer_config())
    _write_json(directory / "config.json", _model_config())
    _write_json(directory / "generation_config.json", _generation_config())
    _write_weights(directory / "model.safetensors", seed, init_std)
    return directory


def corpus_text() -> str:
    """The prose the tokenizer is trained on (shipped as package data)."""
    return resources.files("mell.common").joinpath("tiny_corpus.txt").read_text("utf-8")


def _train_tokenizer() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = corpus_text().splitlines()
    # Training is single-threaded so that merges with equal counts come out in one order.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    if tok.get_vocab_size() > VOCAB_SIZE:
        raise RuntimeError(f"tokenizer vocabulary {tok.get_vocab_size()} > {VOCAB_SIZE}")
    # Canonical JSON: sorted keys, so the file does not depend on hash-map order.
    return json.dumps(json.loads(tok.to_str()), ensure_ascii=False, indent=2, sort_keys=True)


def _tokenizer_config() -> dict[str, Any]:
    added = {
        str(i): {
            "content": text,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, text in enumerate(SPECIAL_TOKENS)
    }
    return {
        "added_tokens_decoder": added,
        "add_bos_token": False,
        "bos_token": None,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "model_max_length": MAX_POSITION_EMBEDDINGS,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def _model_config() -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "bos_token_id": ENDOFTEXT_ID,
        "eos_token_id": IM_END_ID,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN_SIZE,
        "initializer_range": INIT_STD,
        "intermediate_size": INTERMEDIATE_SIZE,
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": NUM_HEADS,
        "num_hidden_layers": NUM_LAYERS,
        "num_key_value_heads": NUM_KV_HEADS,
        "rms_norm_eps": 1e-5,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "vocab_size": VOCAB_SIZE,
    }


def _generation_config() -> dict[str, Any]:
    return {
        "bos_token_id": ENDOFTEXT_ID,
        "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
        "pad_token_id": ENDOFTEXT_ID,
    }


def _weight_shapes() -> dict[str, tuple[int, ...]]:
    q_out, kv_out = NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB_SIZE, HIDDEN_SIZE)}
    for i in range(NUM_LAYERS):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (HIDDEN_SIZE,)
        shapes[p + "self_attn.q_proj.weight"] = (q_out, HIDDEN_SIZE)
        shapes[p + "self_attn.k_proj.weight"] = (kv_out, HIDDEN_SIZE)
        shapes[p + "self_attn.v_proj.weight"] = (kv_out, HIDDEN_SIZE)
        shapes[p + "self_attn.o_proj.weight"] = (HIDDEN_SIZE, q_out)
        shapes[p + "post_attention_layernorm.weight"] = (HIDDEN_SIZE,)
        shapes[p + "mlp.gate_proj.weight"] = (INTERMEDIATE_SIZE, HIDDEN_SIZE)
        shapes[p + "mlp.up_proj.weight"] = (INTERMEDIATE_SIZE, HIDDEN_SIZE)
        shapes[p + "mlp.down_proj.weight"] = (HIDDEN_SIZE, INTERMEDIATE_SIZE)
    shapes["model.norm.weight"] = (HIDDEN_SIZE,)
    shapes["lm_head.weight"] = (VOCAB_SIZE, HIDDEN_SIZE)
    return shapes


def _write_weights(path: Path, seed: int, init_std: float) -> None:
    from safetensors.numpy import save_file

    rng = np.random.Generator(np.random.PCG64(seed))
    tensors: dict[str, np.ndarray] = {}
    for name, shape in _weight_shapes().items():  # fixed order: the draws depend on it
        if name.endswith("norm.weight"):
            tensors[name] = np.ones(shape, dtype=np.float32)
        else:
            tensors[name] = (rng.standard_normal(shape) * init_std).astype(np.float32)
    tmp = _tmp_path(path)
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.chmod(0o644)
    tmp.replace(path)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    _write_text(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False))


def _write_text(path: Path, text: str) -> None:
    tmp = _tmp_path(path)
    tmp.write_bytes((text + "\n").encode("utf-8"))
    tmp.replace(path)


def _tmp_path(path: Path) -> Path:
    # Per process: a gateway and its workers may create the same model at the same time;
    # each writes its own temporary file and renames it (atomically) over identical bytes.
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")
