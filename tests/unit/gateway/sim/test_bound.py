"""The fluid lower bound: computed from the trace alone, the same for every policy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mell.gateway.sim.bound import fluid_lower_bound, pool_prefill
from mell.gateway.sim.profile import load_profile
from mell.gateway.sim.report import lower_bound
from mell.gateway.sim.simulator import Simulator, sim_policy
from mell.gateway.sim.traces import Trace


def make_trace(arrival, prompt, output, model=None, models=("m",)) -> Trace:
    n = len(arrival)
    return Trace(
        arrival_s=np.asarray(arrival, dtype=np.float64),
        prompt=np.asarray(prompt, dtype=np.int64),
        output=np.asarray(output, dtype=np.int64),
        model=np.asarray(model if model is not None else [0] * n, dtype=np.int32),
        models=list(models),
    )


def test_bound_is_the_ceiling_of_total_kv_over_capacity() -> None:
    profile = load_profile("llama2-7b-rtx4090")  # C = 900 blocks of 16 tokens
    c_tokens = profile.capacity_tokens
    # Three requests of 0.6 C each arrive together and decode for a long time: 1.8 C -> 2.
    three = make_trace([0.0, 0.0, 0.0], [int(0.6 * c_tokens)] * 3, [200] * 3)
    assert fluid_lower_bound(three, profile, 0.5).workers == 2
    # One request that outlives the first epoch: one worker; no request: none.
    assert fluid_lower_bound(make_trace([0.0], [100], [500]), profile, 0.5).workers == 1
    assert fluid_lower_bound(make_trace([], [], []), profile, 0.5).workers == 0


def test_bound_counts_each_pool_apart() -> None:
    profile = load_profile("llama2-7b-rtx4090")
    half = profile.capacity_tokens // 2 - 100  # just under C/2 each
    trace = make_trace([0.0, 0.0], [half, half], [50, 50], model=[0, 1], models=("a", "b"))
    bound = fluid_lower_bound(trace, profile, 0.5)
    # Together they would fit one worker; as two models they need one pool each.
    assert bound.workers == 2 and bound.by_model == {"a": 1, "b": 1}


def test_every_policy_of_a_table_gets_the_same_bound() -> None:
    profile = load_profile("llama2-7b-rtx4090")
    rng = np.random.default_rng(0)
    n = 400
    trace = make_trace(
        np.sort(rng.uniform(0, 60, n)), rng.integers(50, 6000, n), rng.integers(1, 400, n)
    )
    results = [
        Simulator(trace, profile, sim_policy(name, profile, 0.5), sample_series=False).run()
        for name in ("mell", "best-fit", "lb")
    ]
    assert {r.lower_bound for r in results} == {fluid_lower_bound(trace, profile, 0.5).workers}
    assert lower_bound(results) == results[0].lower_bound > 0
    # A run's own max_t ceil(KV_t / C) is reported apart and never above its peak.
    assert all(0 < r.own_bound <= r.peak_active for r in results)


# -- the pool's prefill: W_t workers' chunk rate, oldest prompt first, one worker's rate each --

RATE = 1000.0  # one worker's prompt tokens per second in the `pool_prefill` tests


def test_a_lone_prompt_gets_one_workers_rate_however_large_the_pool() -> None:
    queue = [[0, 0.0, 300.0]]
    assert pool_prefill(queue, 0.0, 1.0, 10.0, RATE) == [(0, pytest.approx(0.3))]
    assert queue == []


def test_a_burst_larger_than_the_pools_rate_queues_oldest_first() -> None:
    # One worker's rate: three prompts of 0.1 s each arriving together finish one after another.
    queue = [[i, 0.0, 100.0] for i in range(3)]
    done = pool_prefill(queue, 0.0, 1.0, 1.0, RATE)
    assert [i for i, _ in done] == [0, 1, 2]
    assert [at for _, at in done] == pytest.approx([0.1, 0.2, 0.3])
    # 2.5 workers: the two oldest at a full worker's rate each, the third on the half left
    # (50 tokens by 0.1 s), then at a full rate once the others are done.
    queue = [[i, 0.0, 100.0] for i in range(3)]
    done = pool_prefill(queue, 0.0, 1.0, 2.5, RATE)
    assert [at for _, at in done] == pytest.approx([0.1, 0.1, 0.15])


def test_the_queue_carries_over_epochs_and_late_arrivals_wait_for_their_arrival() -> None:
    queue = [[0, 0.0, 700.0], [1, 0.2, 100.0]]
    # Epoch 1: prompt 0 runs the whole epoch (500 tokens); prompt 1 arrives at 0.2 and, with
    # one worker, waits behind it.
    assert pool_prefill(queue, 0.0, 0.5, 1.0, RATE) == []
    assert queue[0][2] == pytest.approx(200.0) and queue[1][2] == 100.0
    # Epoch 2: prompt 0 ends at 0.7, prompt 1 at 0.8.
    done = pool_prefill(queue, 0.5, 1.0, 1.0, RATE)
    assert done == [(0, pytest.approx(0.7)), (1, pytest.approx(0.8))] and queue == []
    # With two workers prompt 1 starts at its arrival beside prompt 0: ends at 0.3.
    queue = [[0, 0.0, 700.0], [1, 0.2, 100.0]]
    assert pool_prefill(queue, 0.0, 0.5, 2.0, RATE) == [(1, pytest.approx(0.3))]


def test_prompts_queued_in_the_pool_keep_their_kv_in_the_bound() -> None:
    profile = load_profile("llama2-7b-rtx4090")
    c = profile.capacity_tokens
    rate = 1000.0 / profile.step.chunk_ms_per_token
    # Three prompts of 0.3 C (0.9 C: a pool of one worker) that end after one token, then a
    # long request of 0.75 C at 1.2 s. One worker computes the prompts one after another, so
    # at 1.5 s the second and third still hold their KV beside the long one: 1.35 C -> 2
    # workers. (With a worker per prompt they would all be gone by 0.8 s: 1 worker.)
    p = int(0.3 * c)
    assert 2 * p / rate > 1.5 > p / rate
    trace = make_trace([0.0, 0.0, 0.0, 1.2], [p, p, p, int(0.75 * c)], [1, 1, 1, 2000])
    bound = fluid_lower_bound(trace, profile, 0.5)
    assert bound.workers == 2 and bound.at_s == 1.5 and bound.prefilling > 0.5


def test_kv_is_never_below_the_contexts_of_the_requests_surely_live() -> None:
    # A request cannot have left before its prompt alone at one worker's rate plus `output`
    # decode steps of at least decode_base_ms: until then the bound counts at least its prompt.
    profile = load_profile("llama2-13b-a100-40g")
    rate = 1000.0 / profile.step.chunk_ms_per_token
    rng = np.random.default_rng(1)
    n = 300
    trace = make_trace(
        np.sort(rng.uniform(0, 30, n)), rng.integers(100, 9000, n), rng.integers(1, 300, n)
    )
    bound = fluid_lower_bound(trace, profile, 0.5)
    earliest_end = (
        trace.arrival_s + trace.prompt / rate + trace.output * profile.step.decode_base_ms / 1000.0
    )
    blocks = -(-(trace.prompt + 1) // profile.block_size)
    floor = 0
    for t_end in np.arange(0.5, 40.0, 0.5):
        live = (trace.arrival_s < t_end) & (earliest_end > t_end)
        floor = max(floor, math.ceil(int(blocks[live].sum()) / profile.capacity_blocks))
    assert floor > 1 and bound.workers >= floor
