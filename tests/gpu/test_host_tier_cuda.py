"""The host KV tier on CUDA (skipped without CUDA): pinned host blocks, the copy engine's
streams and events (no host synchronization on submit), copies that land late, and token
identity of the engine with kv_offload "swap" and "layerwise" (torch attention) while every copy
stream is held back by a long-running kernel queued ahead of it; a migration's read of host
blocks whose copy lands late."""

from __future__ import annotations

import pytest
import torch

from mell.common.config import EngineConfig
from mell.common.sampling import SamplingParams
from mell.common.tiny_model import write_tiny_model
from mell.workerd.engine.block_manager import BlockManager
from mell.workerd.engine.copy_engine import D2H, H2D, CudaCopyEngine, Rows
from mell.workerd.engine.engine import Engine
from mell.workerd.engine.host_tier import HostTier

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def _busy(stream: torch.cuda.Stream, ms: int = 200) -> None:
    """Queue a kernel that keeps `stream` busy for about `ms` milliseconds."""
    with torch.cuda.stream(stream):
        torch.cuda._sleep(int(ms * 1e6))  # (cycles; ~1 GHz+ clocks: at least ms)


def test_host_tier_is_pinned(tmp_path) -> None:
    tiny = write_tiny_model(tmp_path / "tiny")
    eng = Engine(
        EngineConfig(
            model=str(tiny),
            device="cuda",
            attention_backend="torch",
            num_kv_blocks=64,
            kv_offload="swap",
            host_kv_bytes=1 << 22,
        )
    )
    assert eng.tier is not None
    assert all(t.is_pinned() and t.device.type == "cpu" for t in eng.tier.tensors)
    assert all(t.device.type == "cuda" for t in eng.kv.tensors)
    eng.close()


def test_copies_run_on_their_own_streams_and_complete_by_event() -> None:
    dev = torch.device("cuda")
    copies = CudaCopyEngine(dev)
    src = torch.randn(32, 2, 16, 2, 64, device=dev)
    host = torch.zeros(16, 2, 16, 2, 64).pin_memory()
    back = torch.zeros_like(src)
    _busy(torch.cuda.current_stream())  # the copy must wait for the compute stream's work
    out = copies.copy(src, [3, 4, 5, 9, 20], host, [0, 1, 2, 7, 8], D2H)
    assert not out.done()  # submitted without waiting
    inn = copies.copy(host, [0, 1, 2, 7, 8], back, [10, 11, 12, 13, 14], H2D, after=out)
    inn.wait()  # the compute stream waits on the event; the host does not
    result = back[10:15].clone()
    torch.cuda.synchronize()
    assert out.done() and inn.done()
    assert torch.equal(result.cpu(), src[[3, 4, 5, 9, 20]].cpu())
    k, v = torch.randn(40, 2, 64, device=dev), torch.randn(40, 2, 64, device=dev)
    staged = copies.copy(Rows(k, v), [], host, [3, 4, 5], D2H)
    while not staged.done():
        pass
    assert torch.equal(host[3:5, 0].reshape(32, 2, 64), k[:32].cpu())
    assert torch.equal(host[5, 1, :8], v[32:].cpu())


def _tokens(tiny, **kw) -> dict[str, list[int]]:
    eng = Engine(
        EngineConfig(
            model=str(tiny), device="cuda", attention_backend="torch", max_model_len=512, **kw
        )
    )
    delay = eng.tier is not None
    for i in range(10):
        sp = (
            SamplingParams(max_tokens=24, temperature=0.9, seed=i, ignore_eos=True)
            if i % 2
            else SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
        )
        eng.add_request(f"r{i}", [(i * 13 + 7 * j) % 500 + 3 for j in range(20 + 37 * i)], sp)
    tokens: dict[str, list[int]] = {}
    while eng.has_unfinished():
        if delay:  # hold every copy stream back: copies land late, the step must wait for them
            for stream in eng.tier.copies._streams.values():
                _busy(stream, 5)
        for out in eng.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    torch.cuda.synchronize()
    stats = eng.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    assert stats.num_host_free_blocks == stats.num_host_total_blocks
    eng.close()
    return tokens


@pytest.mark.parametrize("mode", ["swap", "layerwise"])
def test_tokens_identical_with_delayed_copy_streams(tmp_path, mode) -> None:
    tiny = write_tiny_model(tmp_path / "tiny")
    expected = _tokens(tiny, num_kv_blocks=32)
    got = _tokens(
        tiny, num_kv_blocks=32, kv_offload=mode, host_kv_bytes=1 << 24, kv_offload_force=True
    )
    assert got == expected


def test_a_migration_reads_host_blocks_after_their_late_copy_lands() -> None:
    """A swapped-out request's host blocks read for a migration (`HostTier.read`, pinned
    memory read in place) while the copy to the host is still held back: the read waits for
    that layer's event, and the frames hold what the device held; `write` puts received
    frames into host blocks of another tier."""
    dev = torch.device("cuda")
    device_kv = [torch.randn(16, 2, 4, 2, 8, device=dev) for _ in range(2)]
    tier = HostTier(device_kv, 8, CudaCopyEngine(dev))
    pool = BlockManager(16, 4, 2)
    pool.allocate("pad", 8)
    pool.allocate("m", 14)  # 4 blocks per layer, not at the start of the pool
    table = pool.block_table("m", 0)
    _busy(torch.cuda.current_stream(), 300)  # the copy waits behind the compute stream
    tier.swap_out("m", pool, 14)
    receiver = HostTier([torch.zeros_like(t) for t in device_kv], 8, CudaCopyEngine(dev))
    assert receiver.reserve("in", 14)
    for layer in range(2):
        ids = tier.blocks.block_table("m", layer)
        frames = tier.read("m", layer, ids)
        data = b"".join(bytes(f) for _, f in frames)
        assert data == device_kv[layer][table].cpu().view(torch.uint8).numpy().tobytes()
        receiver.write(layer, receiver.blocks.block_table("in", layer), [f for _, f in frames])
        got = receiver.tensors[layer][receiver.blocks.block_table("in", layer)]
        assert torch.equal(got, device_kv[layer][table].cpu())
    tier.release("m", pool)
    pool.free("pad")
    torch.cuda.synchronize()
    tier.poll()
    assert pool.num_free() == 16 and tier.blocks.num_free() == 8
