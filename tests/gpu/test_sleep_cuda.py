"""Sleep and wake on CUDA (skipped without CUDA): the KV tensors leave the caching allocator and
the device (`torch.cuda.mem_get_info`), come back on wake, and the engine gives the same tokens
after a sleep as before it, with each attention backend."""

from __future__ import annotations

import pytest
import torch

from mell.common.config import EngineConfig
from mell.common.sampling import SamplingParams
from mell.common.tiny_model import write_tiny_model
from mell.workerd.engine.engine import Engine

pytestmark = pytest.mark.gpu

KV_BYTES = 1 << 30
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPT = [(5 + 7 * i) % 300 + 3 for i in range(70)]


@pytest.fixture(scope="module", autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def _run(eng: Engine, request_id: str) -> list[int]:
    eng.add_request(request_id, PROMPT, GREEDY)
    tokens: list[int] = []
    while eng.has_unfinished():
        for out in eng.step():
            tokens += out.new_token_ids
    return tokens


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_sleep_gives_the_device_memory_back_and_wake_serves_the_same(tmp_path, backend) -> None:
    tiny = write_tiny_model(tmp_path / "tiny")
    config = EngineConfig(model=str(tiny), device="cuda", attention_backend=backend,
                          kv_cache_memory_bytes=KV_BYTES, enable_prefix_caching=True)  # fmt: skip
    eng = Engine(config)
    before = _run(eng, "a")
    torch.cuda.synchronize()
    reserved, (free, _) = torch.cuda.memory_reserved(), torch.cuda.mem_get_info()
    released = eng.sleep()
    assert released == eng.kv.nbytes >= 0.9 * KV_BYTES
    assert reserved - torch.cuda.memory_reserved() >= 0.9 * released
    assert torch.cuda.mem_get_info()[0] - free >= 0.9 * released
    assert eng.stats().cached_hashes == ([], [])
    asleep = torch.cuda.memory_allocated()
    assert eng.wake() == released
    assert torch.cuda.memory_allocated() - asleep >= released
    assert all(t.device.type == "cuda" for t in eng.kv.tensors)
    assert _run(eng, "b") == before
    eng.sleep()
    assert _run(eng, "c") == before  # a request wakes it
    eng.close()
