"""Prometheus metrics at /metrics, vLLM's names with a `mell:` prefix plus cluster ones.

Request histograms and counters are updated by the dispatcher; gauges (running, waiting, KV
usage, active workers, per-worker KV) and the workers' own counters (preemptions, host tier,
prefix cache, KV pool) are computed from the cluster view at scrape time.
It lives in `cluster/` because the dispatcher and the migrator count into it and it reads the
view; `app` only serves `render()` at /metrics.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mell.common.workers import WorkerLoad
from mell.gateway.cluster.view import ClusterView
from mell.gateway.policy.base import WorkerStatus

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
LOOP_LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 5.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ModelMetrics:
    """The labelled children of one model, looked up once."""

    def __init__(self, m: Metrics, model: str) -> None:
        self.ttft = m.ttft.labels(model)
        self.itl = m.itl.labels(model)
        self.e2e = m.e2e.labels(model)
        self.tpot = m.tpot.labels(model)
        self.prompt_tokens = m.prompt_tokens.labels(model)
        self.generation_tokens = m.generation_tokens.labels(model)
        self.resumed = m.requests_resumed.labels(model)
        self._success = m.request_success
        self._model = model

    def success(self, finished_reason: str) -> None:
        self._success.labels(self._model, finished_reason).inc()


class Metrics:
    def __init__(self, view: ClusterView) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram(
            "mell:time_to_first_token_seconds",
            "Time to first token.",
            ["model_name"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "mell:inter_token_latency_seconds",
            "Time between tokens.",
            ["model_name"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "mell:e2e_request_latency_seconds",
            "Request latency.",
            ["model_name"],
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "mell:time_per_output_token_seconds",
            "A finished request's time per output token after its first.",
            ["model_name"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "mell:prompt_tokens", "Prompt tokens.", ["model_name"], registry=r
        )
        self.generation_tokens = Counter(
            "mell:generation_tokens", "Generated tokens.", ["model_name"], registry=r
        )
        self.request_success = Counter(
            "mell:request_success",
            "Finished requests.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self.requests_resumed = Counter(
            "mell:requests_resumed",
            "Requests that continued on another worker after theirs was lost.",
            ["model_name"],
            registry=r,
        )
        self.loop_lag = Histogram(
            "mell:event_loop_lag_seconds",
            "How late the gateway's event loop ran a 10 ms timer.",
            buckets=LOOP_LAG_BUCKETS,
            registry=r,
        )
        self.migrations = Counter("mell:migrations", "Committed migrations.", ["kind"], registry=r)
        for kind in ("kv", "tokens"):
            self.migrations.labels(kind)
        r.register(ViewCollector(view))
        self._models: dict[str, ModelMetrics] = {}

    def model(self, name: str) -> ModelMetrics:
        m = self._models.get(name)
        if m is None:
            m = self._models[name] = ModelMetrics(self, name)
        return m

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ViewCollector(Collector):
    """Gauges read from the cluster view at scrape time."""

    def __init__(self, view: ClusterView) -> None:
        self.view = view

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        view = self.view
        g = {name: GaugeMetricFamily(name, doc, labels=labels) for name, doc, labels in _GAUGES}
        preemptions = CounterMetricFamily(
            "mell:num_preemptions", "Preemptions.", labels=["model_name"]
        )
        offload = CounterMetricFamily(
            "mell:kv_offload_bytes",
            "KV bytes copied between device and host tier.",
            labels=["model_name", "direction"],
        )
        slo = CounterMetricFamily(
            "mell:slo_violations",
            "Latency SLO violations seen by workers.",
            labels=["model_name", "kind"],
        )
        queries = CounterMetricFamily(
            "mell:prefix_cache_queries",
            "Prompt tokens looked up in workers' prefix caches.",
            labels=["model_name"],
        )
        hits = CounterMetricFamily(
            "mell:prefix_cache_hits",
            "Prompt tokens found in workers' prefix caches (their prefill skipped).",
            labels=["model_name"],
        )
        pool = _KVPoolCounters()
        for model in view.model_names:
            rows = [
                w
                for w in view.worker_rows.values()
                if w.model == model and w.status != WorkerStatus.LOST
            ]
            capacity = sum(w.capacity_blocks for w in rows)
            used = sum(w.num_used_blocks for w in rows)
            g["mell:num_requests_running"].add_metric([model], sum(w.num_running for w in rows))
            g["mell:num_requests_waiting"].add_metric([model], sum(w.num_waiting for w in rows))
            g["mell:kv_cache_usage_perc"].add_metric([model], used / capacity if capacity else 0)
            g["mell:kv_cache_used_blocks"].add_metric([model], used)
            g["mell:kv_cache_total_blocks"].add_metric([model], capacity)
            g["mell:active_workers"].add_metric(
                [model], sum(w.status == WorkerStatus.ACTIVE for w in rows)
            )
            g["mell:releasable_workers"].add_metric([model], sum(w.releasable for w in rows))
            g["mell:sleeping_workers"].add_metric([model], sum(w.sleeping for w in rows))
            g["mell:kv_bytes_released"].add_metric([model], sum(w.kv_bytes_released for w in rows))
            g["mell:num_requests_in_flight"].add_metric(
                [model], sum(1 for r in view.requests.values() if r.model == model)
            )
            preemptions.add_metric([model], sum(w.num_preemptions_total for w in rows))
            host_total = sum(w.load.num_host_total_blocks for w in rows)
            host_used = host_total - sum(w.load.num_host_free_blocks for w in rows)
            g["mell:kv_host_usage_perc"].add_metric(
                [model], host_used / host_total if host_total else 0
            )
            g["mell:num_requests_swapped"].add_metric(
                [model], sum(w.load.num_swapped for w in rows)
            )
            for direction in ("d2h", "h2d"):
                moved = sum(w.load.offload_bytes_total.get(direction, 0) for w in rows)
                offload.add_metric([model, direction], moved)
            queries.add_metric([model], sum(w.load.prefix_cache_queries_total for w in rows))
            hits.add_metric([model], sum(w.load.prefix_cache_hits_total for w in rows))
            for kind in ("ttft", "tpot"):
                seen = sum(w.load.slo_violations_total.get(kind, 0) for w in rows)
                slo.add_metric([model, kind], seen)
            g["mell:kv_pool_cap_blocks"].add_metric(
                [model], sum(w.load.kv_pool_cap_blocks for w in rows)
            )
            g["mell:kv_pool_mapped_bytes"].add_metric(
                [model], sum(w.kv_pool_mapped_bytes for w in rows)
            )
            pool.add(model, [w.load for w in rows])
        for w in view.worker_rows.values():
            labels = [w.worker_id, w.model, w.status.name.lower()]
            perc = w.num_used_blocks / w.capacity_blocks if w.capacity_blocks else 0
            g["mell:worker_kv_cache_usage_perc"].add_metric(labels, perc)
            g["mell:worker_kv_cache_used_blocks"].add_metric(labels, w.num_used_blocks)
            g["mell:worker_requests"].add_metric(labels, len(w.request_blocks))
            g["mell:worker_sleeping"].add_metric(labels, int(w.sleeping))
            g["mell:worker_kv_bytes_released"].add_metric(labels, w.kv_bytes_released)
            g["mell:worker_kv_pool_cap_blocks"].add_metric(labels, w.load.kv_pool_cap_blocks)
            g["mell:worker_kv_pool_mapped_bytes"].add_metric(labels, w.kv_pool_mapped_bytes)
        yield from g.values()
        yield preemptions
        yield offload
        yield slo
        yield queries
        yield hits
        yield from pool.families()


class _KVPoolCounters:
    """The elastic KV pools' counters per model (summed over its live workers' reports)."""

    def __init__(self) -> None:
        self.resizes = CounterMetricFamily(
            "mell:kv_pool_resizes",
            "Changes of the workers' KV pool cap under their memory budget.",
            labels=["model_name", "direction"],
        )
        self.moved = CounterMetricFamily(
            "mell:kv_pool_blocks_moved",
            "KV blocks moved down below a shrunk pool cap.",
            labels=["model_name"],
        )
        self.victims = CounterMetricFamily(
            "mell:kv_pool_victims",
            "Requests preempted to clear KV blocks above a shrunk pool cap.",
            labels=["model_name"],
        )
        self.trims = CounterMetricFamily(
            "mell:kv_pool_trims",
            "Times a worker gave back the KV memory above its live blocks.",
            labels=["model_name"],
        )

    def add(self, model: str, loads: list[WorkerLoad]) -> None:
        for direction in ("shrink", "grow"):
            n = sum(w.kv_pool_resizes_total.get(direction, 0) for w in loads)
            self.resizes.add_metric([model, direction], n)
        self.moved.add_metric([model], sum(w.kv_pool_blocks_moved_total for w in loads))
        self.victims.add_metric([model], sum(w.kv_pool_victims_total for w in loads))
        self.trims.add_metric([model], sum(w.kv_pool_trims_total for w in loads))

    def families(self) -> list[Metric]:
        return [self.resizes, self.moved, self.victims, self.trims]


_M = ["model_name"]
_W = ["worker", "model_name", "state"]
_GAUGES = (
    ("mell:num_requests_running", "Requests running on workers.", _M),
    ("mell:num_requests_waiting", "Requests waiting on workers.", _M),
    ("mell:kv_cache_usage_perc", "KV cache usage of the model's pool (0-1).", _M),
    ("mell:kv_cache_used_blocks", "KV blocks in use in the model's pool.", _M),
    ("mell:kv_cache_total_blocks", "KV blocks of the model's pool.", _M),
    ("mell:kv_host_usage_perc", "Host KV tier usage of the model's pool (0-1).", _M),
    ("mell:num_requests_swapped", "Requests whose KV waits on the host tier.", _M),
    ("mell:active_workers", "Workers accepting requests.", _M),
    ("mell:releasable_workers", "Live workers holding no request (their device could go).", _M),
    ("mell:num_requests_in_flight", "Requests placed and not finished.", _M),
    ("mell:sleeping_workers", "Workers asleep: their KV memory given back.", _M),
    ("mell:kv_bytes_released", "KV memory bytes given back by the pool's sleeping workers.", _M),
    ("mell:kv_pool_cap_blocks", "KV blocks the workers' memory budgets allow now.", _M),
    ("mell:kv_pool_mapped_bytes", "Memory bytes the workers' KV pools hold now.", _M),
    ("mell:worker_kv_cache_usage_perc", "KV cache usage of one worker (0-1).", _W),
    ("mell:worker_kv_cache_used_blocks", "KV blocks in use on one worker.", _W),
    ("mell:worker_requests", "Requests held by one worker.", _W),
    ("mell:worker_sleeping", "1 while the worker sleeps (its KV memory given back).", _W),
    ("mell:worker_kv_bytes_released", "KV memory bytes the sleeping worker gave back.", _W),
    ("mell:worker_kv_pool_cap_blocks", "KV blocks the worker's memory budget allows now.", _W),
    ("mell:worker_kv_pool_mapped_bytes", "Memory bytes the worker's KV pool holds now.", _W),
)
