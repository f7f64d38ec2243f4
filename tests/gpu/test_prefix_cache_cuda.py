"""Prefix caching on CUDA (skipped without CUDA): greedy tokens are the same with caching on
and off, with each attention backend, for chat-like prompts that share growing prefixes
(their prefill starts inside the paged history), with preemption and with the host tier."""

from __future__ import annotations

import pytest
import torch

from mell.common.config import EngineConfig
from mell.common.sampling import SamplingParams
from mell.common.tiny_model import write_tiny_model
from mell.workerd.engine.engine import Engine

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def _prompts() -> list[list[int]]:
    system = [(5 + 7 * i) % 500 + 3 for i in range(70)]
    turns = [[(s + 11 * i) % 500 + 3 for i in range(29 + s)] for s in range(4)]
    return [system + [t for turn in turns[: k + 1] for t in turn] for k in range(4)]


def _run(tiny, backend: str, caching: bool, **kw) -> tuple[list[list[int]], Engine]:
    eng = Engine(
        EngineConfig(
            model=str(tiny),
            device="cuda",
            dtype="float32",
            attention_backend=backend,
            enable_prefix_caching=caching,
            max_model_len=512,
            **kw,
        )
    )
    out = []
    for i, p in enumerate(_prompts()):  # one after another: each finds the one before it
        eng.add_request(f"r{i}", p, GREEDY)
        tokens: list[int] = []
        while eng.has_unfinished():
            for o in eng.step():
                tokens += o.new_token_ids
        out.append(tokens)
    return out, eng


@pytest.mark.parametrize("backend", ["torch", "flashinfer"])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"max_num_batched_tokens": 32},
        {
            "kv_offload": "swap",
            "host_kv_bytes": 1 << 22,
            "kv_offload_force": True,
            "num_kv_blocks": 24,
        },
    ],
)
def test_same_tokens_with_caching_on_and_off_on_cuda(tiny, backend, kw) -> None:
    if backend == "flashinfer":
        pytest.importorskip("flashinfer")
    off, _ = _run(tiny, backend, False, **kw)
    on, eng = _run(tiny, backend, True, **kw)
    assert on == off
    stats = eng.stats()
    assert stats.prefix_cache_hits_total > 0
    assert stats.num_free_blocks == stats.num_total_blocks
