"""The fluid lower bound: computed from the trace alone, the same for every policy."""

from __future__ import annotations

import numpy as np

from mell.gateway.sim.bound import fluid_lower_bound
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
