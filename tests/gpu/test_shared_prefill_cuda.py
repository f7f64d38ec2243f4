"""Choices of one prompt prefill it once on CUDA (skipped without CUDA), with each attention
backend: the copy-on-write block is copied on the device, and the followers' seeded tokens
(noise drawn on the device) are those each request gives alone."""

from __future__ import annotations

import pytest
import torch

from mell.common.config import EngineConfig
from mell.common.sampling import SamplingParams
from mell.common.tiny_model import write_tiny_model
from mell.workerd.engine.engine import Engine

PROMPT = [(5 + 7 * i) % 500 + 3 for i in range(37)]  # 2 blocks of 16 and 5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def _run(tiny, backend: str, seeds: list[int]) -> tuple[dict[str, list[int]], dict[str, int]]:
    eng = Engine(
        EngineConfig(
            model=str(tiny),
            device="cuda",
            dtype="float32",
            attention_backend=backend,
            enable_prefix_caching=False,
            max_model_len=512,
        )
    )
    for s in seeds:
        params = SamplingParams(max_tokens=12, temperature=1.0, seed=s, ignore_eos=True)
        eng.add_request(f"r{s}", PROMPT, params)
    tokens: dict[str, list[int]] = {}
    cached: dict[str, int] = {}
    while eng.has_unfinished():
        for o in eng.step():
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
            cached.setdefault(o.request_id, o.num_cached_tokens)
    assert eng.blocks.num_free() == eng.blocks.num_blocks
    return tokens, cached


@pytest.mark.parametrize("backend", ["torch", "flashinfer"])
def test_followers_sample_as_if_alone_on_cuda(tiny, backend: str) -> None:
    together, cached = _run(tiny, backend, [7, 8, 9])
    assert cached == {"r7": 0, "r8": len(PROMPT) - 1, "r9": len(PROMPT) - 1}
    for s in (7, 8, 9):
        alone, _ = _run(tiny, backend, [s])
        assert together[f"r{s}"] == alone[f"r{s}"]
    again, _ = _run(tiny, backend, [7, 8, 9])
    assert again == together  # f(seed, token index) on the device: the same run after run
