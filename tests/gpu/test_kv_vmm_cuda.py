"""The virtual KV pool on CUDA (kv_pool "virtual": driver VMM through ctypes, 2 MiB granules;
skipped without CUDA): granules mapped as blocks are committed and given back to the device
when discarded (cudaMemGetInfo sees it), data below the discarded top survives, the tensors
never move; the engine gives the same tokens with the virtual elastic pool as with a static
one (torch and FlashInfer attention)."""

from __future__ import annotations

import pytest
import torch

from mell.common.config import EngineConfig
from mell.common.sampling import SamplingParams
from mell.common.tiny_model import write_tiny_model
from mell.workerd.engine.engine import Engine

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def test_granules_map_on_commit_and_go_back_on_discard() -> None:
    from mell.workerd.engine.kv_memory_cuda import GRANULE, CudaVirtualStorage

    shape = (4096, 2, 16, 8, 128)  # 64 KiB per block and layer: 256 MiB per layer
    store = CudaVirtualStorage(2, shape, torch.bfloat16, torch.device("cuda"))
    ptrs = [t.data_ptr() for t in store.tensors]
    assert store.mapped_bytes() == 2 * GRANULE  # the anchors only
    free0, _ = torch.cuda.mem_get_info()
    store.commit(2048)  # 128 MiB per layer
    assert store.mapped_bytes() == 2 * 2048 * 65536
    free1, _ = torch.cuda.mem_get_info()
    assert free0 - free1 >= 0.95 * (store.mapped_bytes() - 2 * GRANULE)
    for layer, t in enumerate(store.tensors):
        t[:2048].fill_(layer + 1.0)
    store.discard(512)
    assert store.mapped_bytes() == 2 * -(-512 * 65536 // GRANULE) * GRANULE
    free2, _ = torch.cuda.mem_get_info()
    assert free2 - free1 >= 0.95 * 2 * (2048 - 512) * 65536
    assert [t.data_ptr() for t in store.tensors] == ptrs
    assert float(store.tensors[1][:512].float().mean()) == 2.0  # kept
    store.commit(1024)  # mapped again (content undefined until written)
    store.tensors[0][1000].fill_(7.0)
    assert float(store.tensors[0][1000].float().mean()) == 7.0
    del store.tensors
    store.close()


@pytest.mark.parametrize("backend", ["torch", "flashinfer"])
def test_same_tokens_with_the_virtual_elastic_pool(tmp_path, backend) -> None:
    if backend == "flashinfer":
        pytest.importorskip("flashinfer")
    tiny = write_tiny_model(tmp_path / "tiny")
    base = {
        "model": str(tiny),
        "device": "cuda",
        "attention_backend": backend,
        "max_num_batched_tokens": 256,
        "max_model_len": 1024,
    }

    def run(**kw) -> dict[str, list[int]]:
        eng = Engine(EngineConfig(**base, **kw))
        for i in range(12):
            sp = (
                SamplingParams(max_tokens=24, temperature=0.9, seed=i, ignore_eos=True)
                if i % 2
                else SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
            )
            eng.add_request(f"r{i}", [(5 + 7 * j + i) % 500 + 3 for j in range(100 + 30 * i)], sp)
        out: dict[str, list[int]] = {}
        while eng.has_unfinished():
            for o in eng.step():
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
            if eng.elastic is not None and eng.elastic.last is not None:
                assert eng.elastic.last.total <= kw["memory_budget_bytes"]
        if eng.elastic is not None:
            assert eng.elastic.budget.shrinks > 0
            for _ in range(10):
                eng.step()  # idle: the pool gives its granules back
            storage = eng.kv.storage
            assert storage is not None and storage.mapped_bytes() == 2 * (2 << 20)  # anchors
        eng.close()
        return out

    want = run(num_kv_blocks=512)
    got = run(
        memory_budget_bytes=16 << 20,
        kv_pool="virtual",
        kv_offload="swap",
        host_kv_bytes=64 << 20,
    )
    assert got == want
