"""Block accounting checks of an engine with (or without) a host KV tier, shared by the host
tier's tests: per layer and tier free + used + fenced == total, and nothing held once idle."""

from __future__ import annotations

import time

from mell.workerd.engine.engine import Engine


def assert_invariants(eng: Engine) -> None:
    tiers = [eng.blocks] + ([eng.tier.blocks] if eng.tier is not None else [])
    for blocks in tiers:
        for layer in range(blocks.num_layers):
            free, used, fenced = (
                blocks.num_free(layer),
                blocks.num_used(layer),
                blocks.num_fenced(layer),
            )
            assert free + used + fenced == blocks.num_blocks


def assert_no_leaks(eng: Engine, timeout_s: float = 30.0) -> None:
    """Every block of both tiers free (after the copies in flight land), no request holds any."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = eng.stats()
        if stats.num_fenced_blocks == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert stats.num_fenced_blocks == 0
    assert stats.num_free_blocks == stats.num_total_blocks
    assert stats.num_host_free_blocks == stats.num_host_total_blocks
    assert eng.blocks.requests() == []
    if eng.tier is not None:
        assert eng.tier.blocks.requests() == [] and not eng.tier.loading
