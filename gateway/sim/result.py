"""What one simulated run reports (`Simulator.run`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class SimResult:
    policy: str
    requests: int
    rejected: int
    preemptions: int
    peak_active: int
    avg_active: float
    lower_bound: int  # the fluid lower bound of the trace (`bound.py`): same for every policy
    lower_bound_prefilling: float  # KV (Σ / C) still prefilling at the bound's peak
    own_bound: int  # max_t Σ_pools ⌈Σ KV_t / C⌉ of this run's own schedule (for comparison)
    own_bound_prefilling: float  # of which KV (in workers, Σ / C) of requests still prefilling
    peak_kv: float  # Σ KV / C at the (first) epoch of the peak
    peak_prefilling: float  # of which KV of requests waiting for or in their prefill
    peak_repack: int  # workers first-fit decreasing packs the peak epoch's requests into
    mem_util: float  # used KV / (active workers · C), time-averaged over busy epochs
    migrations: int
    kv_migrations: int
    token_migrations: int
    deferred_moves: int
    skipped_moves: int
    sim_seconds: float
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_mean_ms: float
    tpot_p99_ms: float
    wall_s: float
    events: int  # arrivals + departures + preemptions + migrations
    # prefix caching (`Simulator(prefix_cache=True)`; zero without the cache model): cached
    # prompt tokens over prompt tokens looked up at admissions, those tokens (prefill
    # skipped), the tokens looked up, prefix blocks evicted; "" / "blind" / "aware" placement
    prefix_hit_rate: float = 0.0
    prefill_saved_tokens: int = 0
    prefill_queried_tokens: int = 0
    prefix_evicted_blocks: int = 0
    prefix_cache: str = ""
    # the host tier (`Simulator(host=...)`): its mode ("" without one), preemptions that
    # swapped a decoding request's KV to the host, that parked a prompt there (prefilled to the
    # host), bytes moved both ways; and the tokens preemptions threw away (recomputed)
    kv_offload: str = ""
    swaps: int = 0
    parks: int = 0
    offload_bytes: int = 0
    recomputed_tokens: int = 0
    peak_by_model: dict[str, int] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)
    active: list[int] = field(default_factory=list)

    @property
    def migrations_per_s(self) -> float:
        return self.migrations / self.sim_seconds if self.sim_seconds else 0.0

    @property
    def peak_over_lb(self) -> float:
        return self.peak_active / self.lower_bound if self.lower_bound else float("nan")

    @property
    def peak_over_repack(self) -> float:
        return self.peak_active / self.peak_repack if self.peak_repack else float("nan")

    def summary(self) -> dict[str, object]:
        out = {k: getattr(self, k) for k in self.__slots__ if k not in ("times", "active")}
        out["migrations_per_s"] = self.migrations_per_s
        out["peak_over_lb"] = self.peak_over_lb
        out["peak_over_repack"] = self.peak_over_repack
        return out
