"""The offline first-fit-decreasing packing a policy's peak is read against."""

from __future__ import annotations

import math

import numpy as np

from mell.gateway.sim.profile import load_profile
from mell.gateway.sim.repack import first_fit_decreasing
from mell.gateway.sim.simulator import Simulator, sim_policy
from mell.gateway.sim.traces import Trace


def test_first_fit_decreasing_on_known_instances() -> None:
    assert first_fit_decreasing([], 10) == 0
    assert first_fit_decreasing([10, 10, 10], 10) == 3
    # Decreasing order pairs 6 with 4 and 7 with 3: two workers, where first fit in the given
    # order (3, 4, 6, 7) would need three.
    assert first_fit_decreasing([3, 4, 6, 7], 10) == 2
    # A request larger than a worker gets one of its own (a view may report such a size).
    assert first_fit_decreasing([15, 5, 5], 10) == 2


def _optimum(sizes: list[int], capacity: int) -> int:
    """The fewest workers for `sizes`, by exhaustive search (small instances only)."""
    best = len(sizes)

    def place(k: int, rooms: list[int]) -> None:
        nonlocal best
        if len(rooms) >= best:
            return
        if k == len(sizes):
            best = len(rooms)
            return
        for j, room in enumerate(rooms):
            if sizes[k] <= room:
                rooms[j] -= sizes[k]
                place(k + 1, rooms)
                rooms[j] += sizes[k]
        place(k + 1, [*rooms, capacity - sizes[k]])

    place(0, [])
    return best


def test_first_fit_decreasing_within_its_guarantee_of_the_optimum() -> None:
    rng = np.random.default_rng(7)
    for _ in range(300):
        sizes = sorted(rng.integers(1, 101, rng.integers(1, 9)).tolist(), reverse=True)
        bins, opt = first_fit_decreasing(sizes, 100), _optimum(sizes, 100)
        assert math.ceil(sum(sizes) / 100) <= opt <= bins <= 11 / 9 * opt + 6 / 9  # Dósa 2007


def test_the_simulator_reports_the_repack_of_its_peak() -> None:
    profile = load_profile("llama2-7b-rtx4090")
    rng = np.random.default_rng(3)
    n = 300
    trace = Trace(
        arrival_s=np.sort(rng.uniform(0, 30, n)),
        prompt=rng.integers(50, 4000, n).astype(np.int64),
        output=rng.integers(50, 400, n).astype(np.int64),
        model=np.zeros(n, dtype=np.int32),
        models=["m"],
    )
    r = Simulator(trace, profile, sim_policy("best-fit", profile, 0.5), sample_series=False).run()
    # At least ⌈Σ KV / C⌉ workers; and, a first-fit packing leaving at most one worker half
    # empty, at most 2 Σ KV / C + 1.
    assert math.ceil(r.peak_kv - 1e-9) <= r.peak_repack <= 2 * r.peak_kv + 1
    assert r.peak_repack >= 1 and r.summary()["peak_repack"] == r.peak_repack
