"""What one simulated run measures, epoch by epoch (`Simulator.run` feeds it).

Every epoch is counted where MELL's Algorithm 1 counts GPUs: after the epoch's departures,
updates, arrivals and moves, once empty workers are released (the same for every policy).
A worker counts as active when it holds at least one request.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class Tally:
    """The peaks, time-averages and (optionally) the series of one run's active workers.

    `capacity` is a worker's KV capacity C in blocks; peaks of KV are kept in workers (Σ / C).
    """

    def __init__(self, models: Sequence[str], capacity: int, sample_series: bool) -> None:
        self.capacity = capacity
        self.sample_series = sample_series
        self.peak = 0  # active workers at the (first) epoch of the peak
        self.peak_kv = 0.0  # Σ KV / C there: ideal or not, packed or not (fig11)
        self.peak_prefilling = 0.0  # of which KV of requests waiting for or in their prefill
        self.peak_sizes: dict[str, list[int]] = {}  # the KV blocks of its requests, per model
        self.peak_model = dict.fromkeys(models, 0)  # each model's own peak
        self.own_bound = 0  # max_t Σ_pools ⌈Σ KV_t / C⌉ of this run's own schedule
        self.own_prefilling = 0.0  # of which KV still prefilling, in workers
        self.busy_time = 0.0  # worker-seconds active
        self.util_sum = 0.0  # Σ over busy epochs of KV in memory / (active workers · C)
        self.util_epochs = 0
        self.times: list[float] = []
        self.active: list[int] = []

    def epoch(
        self,
        t_end: float,
        dt: float,
        busy: dict[str, int],
        kv: dict[str, int],
        prefilling_kv: float,
        mem_in_use: int,
        sizes: Callable[[], dict[str, list[int]]],
    ) -> None:
        """Count the epoch ending at `t_end`: `busy` workers and their `kv` blocks per model,
        `prefilling_kv` blocks of requests still prefilling, `mem_in_use` blocks computed;
        `sizes` gives every running request's blocks per model (called at a new peak only)."""
        count = sum(busy.values())
        cap = self.capacity
        if count > self.peak:
            self.peak, self.peak_kv = count, sum(kv.values()) / cap
            self.peak_prefilling = prefilling_kv / cap
            self.peak_sizes = sizes()
        peak_model = self.peak_model
        for m, c in busy.items():
            peak_model[m] = max(peak_model[m], c)
        own = sum(-(-u // cap) for u in kv.values())
        if own > self.own_bound:
            self.own_bound, self.own_prefilling = own, prefilling_kv / cap
        if count:
            self.busy_time += count * dt
            self.util_sum += mem_in_use / (count * cap)
            self.util_epochs += 1
        if self.sample_series:
            self.times.append(t_end)
            self.active.append(count)

    @property
    def mem_util(self) -> float:
        """KV in memory over the active workers' capacity, averaged over the busy epochs."""
        return self.util_sum / self.util_epochs if self.util_epochs else 0.0
