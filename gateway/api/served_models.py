"""The models this gateway serves: name, checkpoint directory, tokenizer, chat template, limits.

Model specs are resolved as the workers resolve them (`mell.common.model_spec`), so both sides
agree on the names. Tokenization of long prompts runs in a thread pool.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from mell.common.errors import InvalidRequest, NotFound
from mell.common.model_spec import model_name, resolve_model_dir
from mell.gateway.api.chat_template import ChatTemplate
from mell.gateway.api.reasoning import Style, reasoning_style
from mell.gateway.cluster.view import ClusterView


@dataclass(slots=True)
class ServedModel:
    name: str
    path: Path
    tokenizer: Tokenizer
    chat_template: ChatTemplate | None
    vocab_size: int
    max_model_len: int
    created: int
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    reasoning: Style | None = None  # a thinking model's style (gateway/api/reasoning.py)

    @classmethod
    def load(cls, spec: str, data_dir: str | Path) -> ServedModel:
        path = resolve_model_dir(spec, data_dir)
        config = json.loads((path / "config.json").read_text())
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        template = ChatTemplate.load(path)
        return cls(
            name=model_name(spec),
            path=path,
            tokenizer=tokenizer,
            chat_template=template,
            vocab_size=int(config.get("vocab_size", tokenizer.get_vocab_size())),
            max_model_len=int(config.get("max_position_embeddings", 2048)),
            created=int(time.time()),
            sampling_defaults=generation_defaults(path),
            reasoning=reasoning_style(template),
        )


# generation_config.json keys vLLM applies as request defaults (its `get_diff_sampling_param`),
# and the request field each one sets.
_GENERATION_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def generation_defaults(model_dir: Path) -> dict[str, Any]:
    """The sampling defaults of the model's generation_config.json (absent or unreadable: none).
    A field a request leaves unset takes this value, as in vLLM (`--generation-config auto`)."""
    try:
        config = json.loads((model_dir / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(config, dict):
        return {}
    return {
        name: config[key]
        for key, name in _GENERATION_KEYS.items()
        if isinstance(config.get(key), int | float) and not isinstance(config.get(key), bool)
    }


class ModelRegistry:
    """Served models by name; tokenizes prompts (long ones off the event loop)."""

    def __init__(self, models: list[ServedModel], inline_chars: int = 2048) -> None:
        self.models = {m.name: m for m in models}
        self._inline_chars = inline_chars
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mell-tokenize")

    def names(self) -> list[str]:
        return list(self.models)

    def resolve(self, name: str | None) -> ServedModel:
        """The model a request names; an empty name means the first model (as vLLM does)."""
        if not name:
            return next(iter(self.models.values()))
        model = self.models.get(name)
        if model is None:
            valid = ", ".join(self.models)
            raise NotFound(
                f"The model `{name}` does not exist. Valid models: {valid}", param="model"
            )
        return model

    async def encode(self, model: ServedModel, text: str, add_special_tokens: bool) -> list[int]:
        if len(text) <= self._inline_chars:
            return model.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        loop = asyncio.get_running_loop()
        encoding = await loop.run_in_executor(
            self._pool, lambda: model.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        )
        return encoding.ids

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def context_length(model: ServedModel, view: ClusterView) -> int:
    """The context length the model is served with: the smallest its active workers run (one
    started with a smaller --max-model-len or KV cap serves less than the checkpoint allows),
    the checkpoint's when none is active."""
    lengths = [w.max_model_len for w in view.live_workers(model.name)]
    return min(lengths, default=model.max_model_len)


def check_token_ids(model: ServedModel, ids: list[object], param: str = "prompt") -> list[int]:
    """Token ids from a client (a prompt, /detokenize): every id an int in the vocabulary."""
    for token in ids:
        if not isinstance(token, int) or isinstance(token, bool):
            raise InvalidRequest(f"{param} token ids must be integers", param=param)
        if not 0 <= token < model.vocab_size:
            raise InvalidRequest(
                f"token id {token} is out of vocabulary (size {model.vocab_size})", param=param
            )
    return ids  # type: ignore[return-value]
