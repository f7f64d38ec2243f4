"""Prometheus metrics at /metrics, vLLM's names with a `mell:` prefix plus cluster ones.

Request histograms and counters are updated by the dispatcher and the migrator; the workers'
figures (running, waiting, KV usage, active workers, per-worker KV, and the workers' own
counters: preemptions, host tier, prefix cache, KV pool) are read from the cluster view at
scrape time through the table of `view_metrics.py`.
It lives in `cluster/` because the dispatcher and the migrator count into it and it reads the
view; `app` only serves `render()` at /metrics.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from mell.gateway.cluster.view import ClusterView
from mell.gateway.cluster.view_metrics import ViewCollector

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
