"""The models this gateway serves: name, checkpoint directory, tokenizer, chat template, limits.

Model specs are resolved as the workers resolve them (`mell.common.model_spec`), so both sides
agree on the names.

Prompt size is bounded before any tokenizing: no token of the vocabulary covers more than
`max_token_bytes` bytes of text, so a prompt of more than `max_prompt_chars` characters
(max_model_len x that, x 2 for normalizers that merge characters) cannot fit the context and is
refused at once. Long prompts are tokenized in a process pool, at a lower CPU priority:
`tokenizers`' `encode` holds the interpreter lock for its whole run (measured: a 2 MB prompt in a
thread stopped the event loop for 3.8 s; `encode_batch` still for 0.4 s), and its memory stays
in the child. The text reaches the child through a memory file, not a pickle (the gateway's
RSS grew 25-32 MB for a 10 MB prompt instead of 46-55 MB, three runs of each).
"""

from __future__ import annotations

import asyncio
import errno
import json
import multiprocessing
import os
import time
from array import array
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from mell.common.errors import InvalidRequest, ModelError, NotFound
from mell.common.model_spec import model_name, read_checkpoint_json, resolve_model_dir
from mell.gateway.api.chat_template import ChatTemplate
from mell.gateway.api.reasoning import Style, reasoning_style
from mell.gateway.api.tools.request import ToolFormat, tool_format
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
    max_token_bytes: int = 64  # the most bytes of text one token of the vocabulary covers
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    reasoning: Style | None = None  # a thinking model's style (gateway/api/reasoning.py)
    tool_format: ToolFormat | None = None  # how its template writes tool calls (api/tools/)

    @classmethod
    def load(cls, spec: str, data_dir: str | Path) -> ServedModel:
        """The model of `spec`; a ModelError naming the file when its checkpoint is unusable."""
        path = resolve_model_dir(spec, data_dir)
        config = _read_config(path / "config.json")
        tokenizer = load_tokenizer(path)
        template = ChatTemplate.load(path)
        return cls(
            name=model_name(spec),
            path=path,
            tokenizer=tokenizer,
            chat_template=template,
            vocab_size=_int(config, "vocab_size", tokenizer.get_vocab_size(), path),
            max_model_len=_int(config, "max_position_embeddings", 2048, path),
            created=int(time.time()),
            max_token_bytes=max((len(t.encode()) for t in tokenizer.get_vocab()), default=1),
            sampling_defaults=generation_defaults(path),
            reasoning=reasoning_style(template),
            tool_format=tool_format(template),
        )

    @property
    def max_prompt_chars(self) -> int:
        """Past this many characters a prompt cannot fit the context, whatever its tokens."""
        return 2 * self.max_model_len * self.max_token_bytes

    def check_prompt_chars(self, num_chars: int, param: str) -> None:
        """Refuse (400) a prompt too long to fit the context, before tokenizing it."""
        if num_chars > self.max_prompt_chars:
            raise InvalidRequest(
                f"the {param} has {num_chars} characters: more than this model's maximum "
                f"context length of {self.max_model_len} tokens can hold "
                f"(at most {self.max_prompt_chars} characters)",
                param=param,
            )


def load_tokenizer(path: Path) -> Tokenizer:
    """The checkpoint's `tokenizer.json`; a ModelError naming it when missing or unreadable."""
    file = path / "tokenizer.json"
    if not file.is_file():
        raise ModelError(f"{path}: no tokenizer.json (the gateway needs the model's tokenizer)")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # the Rust library raises plain Exceptions
        raise ModelError(f"{file}: not a tokenizer: {err}") from None


def _read_config(file: Path) -> dict[str, Any]:
    config = read_checkpoint_json(file)
    if config is None:
        raise ModelError(f"{file}: cannot read: {os.strerror(errno.ENOENT)}")
    return config


def _int(config: dict[str, Any], key: str, default: int, path: Path) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelError(f"{path / 'config.json'}: {key} must be a positive integer, not {value!r}")
    return value


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
    """Served models by name; tokenizes prompts (long ones in a process pool, started on the
    first long prompt)."""

    def __init__(
        self, models: list[ServedModel], inline_chars: int = 2048, processes: int = 2
    ) -> None:
        self.models = {m.name: m for m in models}
        self._inline_chars = inline_chars
        self._processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self._pool_ready: asyncio.Future[ProcessPoolExecutor] | None = None

    @property
    def max_body_bytes(self) -> int:
        """The largest request body worth reading: the longest prompt any model can take, at
        6 bytes a character (JSON's \\uXXXX), plus 1 MiB for the rest of the request."""
        longest = max((m.max_prompt_chars for m in self.models.values()), default=0)
        return 6 * longest + (1 << 20)

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
        """The token ids of `text`; a text too long for the context is refused first."""
        model.check_prompt_chars(len(text), "prompt")
        if len(text) <= self._inline_chars:
            return model.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        pool = await self._tokenizer_pool()
        loop = asyncio.get_running_loop()
        handoff = _handoff(text)
        try:
            packed = await loop.run_in_executor(
                pool,
                _encode_in_child,
                str(model.path),
                f"/proc/{os.getpid()}/fd/{handoff}",
                add_special_tokens,
                model.max_model_len,
            )
        finally:
            os.close(handoff)
        if isinstance(packed, int):
            raise InvalidRequest(
                f"This model's maximum context length is {model.max_model_len} tokens. "
                f"However, the prompt has {packed} tokens. Please reduce the length of the prompt.",
                param="prompt",
            )
        return array("i", packed).tolist()

    async def _tokenizer_pool(self) -> ProcessPoolExecutor:
        """The tokenizer processes, started on a thread at the first long prompt: starting
        them on the event loop (the pool's queues start multiprocessing's resource tracker,
        then two interpreters) held running streams for tens of ms."""
        if self._pool_ready is None:
            self._pool_ready = asyncio.ensure_future(asyncio.to_thread(self._start_pool))
        try:
            return await asyncio.shield(self._pool_ready)
        except Exception:
            self._pool_ready = None  # (the next long prompt tries again)
            raise

    def _start_pool(self) -> ProcessPoolExecutor:
        pool = self._pool = ProcessPoolExecutor(
            self._processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_yield_the_cpu,
        )
        for started in [pool.submit(_started) for _ in range(self._processes)]:
            started.result()  # (each submit while none is idle starts one more process)
        return pool

    def close(self, wait: bool = False) -> None:
        """Stops the tokenizer processes; `wait`: until they have exited."""
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)


_CHILD_TOKENIZERS: dict[str, Tokenizer] = {}
NICE = 10  # tokenizer processes yield the CPU to the gateway's event loop


def _yield_the_cpu() -> None:
    os.nice(NICE)


def _started() -> None:
    """A pool process is up (nothing to do)."""


def _handoff(text: str) -> int:
    """A memory file holding `text` as UTF-8, for a pool process to read at
    /proc/<gateway pid>/fd/<fd>. Nothing is pickled (that held the interpreter lock on a
    thread of the gateway and kept a second copy), and the memory goes with the descriptor
    even if the gateway dies. The caller closes it."""
    fd = os.memfd_create("mell-prompt", os.MFD_CLOEXEC)
    try:
        data = memoryview(text.encode())
        while data:
            data = data[os.write(fd, data) :]
    except BaseException:
        os.close(fd)
        raise
    return fd


def _encode_in_child(path: str, source: str, add_special_tokens: bool, limit: int) -> bytes | int:
    """In a pool process: the ids of the text in the file `source` as packed int32 (cheap to
    send back), or only their number when it reaches `limit` (the prompt cannot fit: nothing
    more to send)."""
    with open(source, "rb") as f:
        text = f.read().decode()
    tokenizer = _CHILD_TOKENIZERS.get(path)
    if tokenizer is None:
        tokenizer = _CHILD_TOKENIZERS[path] = load_tokenizer(Path(path))
    ids = tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
    if len(ids) >= limit:
        return len(ids)
    return array("i", ids).tobytes()


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
