"""A compute-free engine for gateway benchmarks: tokens at a fixed rate, no model.

Contract A (`engine/contract.py`) without a model or KV cache (so it cannot migrate requests).
Every running request gets one token per step; steps happen on the wall-clock grid of multiples
of 1/rate (unix time), so a client can tell when each token was emitted: at the last grid point
before it arrived. Output tokens echo the prompt (token i is prompt[i % len(prompt)]), so they
are always valid ids of the model's vocabulary. KV blocks are accounted as prompt + generated
tokens over the block size. Benchmarks only.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mell.common.config import EngineConfig
from mell.common.errors import InvalidRequest
from mell.common.sampling import FinishReason, SamplingParams, TokenLogprobs
from mell.common.slo import RequestSLO
from mell.workerd.engine.contract import EngineBusy
from mell.workerd.engine.outputs import EngineStats, RequestOutput


@dataclass(slots=True)
class FakeModelConfig:
    vocab_size: int
    eos_token_ids: list[int]
    max_model_len: int


@dataclass(slots=True)
class _Request:
    request_id: str
    prompt: list[int]
    sampling: SamplingParams
    num_generated: int = 0


class FakeEngine:
    """Emits `token_rate` tokens per second per running request without running a model."""

    def __init__(self, config: EngineConfig, token_rate: float) -> None:
        if token_rate <= 0:
            raise ValueError("token_rate must be positive")
        self.config = config
        self.model_config = _model_config(Path(config.model), config.max_model_len)
        self.block_size = config.block_size
        self.num_total_blocks = config.num_kv_blocks or 8192
        self._interval_s = 1.0 / token_rate
        self._requests: dict[str, _Request] = {}
        self.sleeping = False  # no KV to give back: only the state (the worker plane's tests)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        output_token_ids: Sequence[int] = (),
        slo: RequestSLO | None = None,  # (no admission rule here)
    ) -> None:
        if not prompt_token_ids:
            raise InvalidRequest("prompt is empty", param="prompt")
        if request_id in self._requests:
            raise InvalidRequest(f"duplicate request id {request_id}")
        total = len(prompt_token_ids) + sampling.max_tokens
        if total > self.model_config.max_model_len:
            raise InvalidRequest(
                f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({sampling.max_tokens}) "
                f"exceeds the model's context length ({self.model_config.max_model_len})",
                param="max_tokens",
            )
        self.sleeping = False
        self._requests[request_id] = _Request(
            request_id, list(prompt_token_ids), sampling, len(output_token_ids)
        )

    def abort(self, request_id: str) -> bool:
        return self._requests.pop(request_id, None) is not None

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def max_model_len(self) -> int:
        return self.model_config.max_model_len

    def migratable(self) -> None:
        return None  # no KV cache to move

    def sleep(self) -> int:
        if self._requests:
            raise EngineBusy(f"the engine holds {len(self._requests)} requests")
        self.sleeping = True
        return 0

    def wake(self) -> int:
        self.sleeping = False
        return 0

    def step(self) -> list[RequestOutput]:
        if not self._requests:
            return []
        _sleep_until_grid(self._interval_s)
        outputs = [self._next_token(r) for r in self._requests.values()]
        for out in outputs:
            if out.finish_reason is not None:
                del self._requests[out.request_id]
        return outputs

    def stats(self) -> EngineStats:
        blocks = {rid: self._blocks(r) for rid, r in self._requests.items()}
        return EngineStats(
            num_running=len(self._requests),
            num_waiting=0,
            num_total_blocks=self.num_total_blocks,
            num_free_blocks=self.num_total_blocks - sum(blocks.values()),
            block_size=self.block_size,
            num_preemptions_total=0,
            request_blocks=blocks,
            sleeping=self.sleeping,
            kv_pool_cap_blocks=self.num_total_blocks,
        )

    def _next_token(self, req: _Request) -> RequestOutput:
        index = req.num_generated
        token = req.prompt[index % len(req.prompt)]
        req.num_generated += 1
        done = req.num_generated >= req.sampling.max_tokens
        logprobs = [TokenLogprobs(0.0, [], [])] if req.sampling.logprobs is not None else None
        return RequestOutput(
            req.request_id,
            index,
            [token],
            logprobs,
            FinishReason.LENGTH if done else None,
            len(req.prompt),
        )

    def _blocks(self, req: _Request) -> int:
        return -(-(len(req.prompt) + req.num_generated) // self.block_size)


def _sleep_until_grid(interval_s: float) -> None:
    now = time.time()
    target = math.floor(now / interval_s + 1) * interval_s
    time.sleep(max(0.0, target - now))


def _model_config(model_dir: Path, max_model_len: int) -> FakeModelConfig:
    try:
        raw = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        raw = {}
    eos = raw.get("eos_token_id", [])
    return FakeModelConfig(
        vocab_size=int(raw.get("vocab_size", 32000)),
        eos_token_ids=eos if isinstance(eos, list) else [eos],
        max_model_len=max_model_len or int(raw.get("max_position_embeddings", 4096)),
    )
