"""The /metrics families read from the cluster view at scrape time, declared in one table.

Each worker's stats arrive whole in its load report (`mell.common.workers.WorkerStats`) and
the view keeps them whole in the worker's row (`WorkerRow.load`). A `Family` names a metric,
its help, its kind and the figure it reads from one row: a `WorkerStats` field by name, or a
small function of the row. `MODEL_FAMILIES` sum that figure over a model's live workers
(label `model_name`); `WORKER_FAMILIES` give it per worker, lost ones included (labels
`worker`, `model_name`, `state`; a lost worker's load reads as idle). A dict field
(`offload_bytes_total` by direction, ...) gives one series per key of `by`, a key a worker did
not report counting 0; a ratio divides the sum of its figure by the sum of `per` (0 when that
is 0). Exporting a worker figure is one row of a table; a misspelt field fails at import.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mell.common.workers import WorkerStats
from mell.gateway.cluster.view import ClusterView, WorkerRow
from mell.gateway.policy.base import WorkerStatus

Figure = str | Callable[[WorkerRow], float]  # a WorkerStats field's name, or a function of a row
MetricFamily = GaugeMetricFamily | CounterMetricFamily


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family (see the module's docstring for how it reads the rows)."""

    name: str
    help: str
    kind: Literal["gauge", "counter"]
    figure: Figure
    by: tuple[str, tuple[str, ...]] | None = None  # a dict field: its label and its keys
    per: Figure | None = None  # a ratio: sum(figure) / sum(per)

    def __post_init__(self) -> None:
        for f in (self.figure, self.per):
            if isinstance(f, str) and f not in WorkerStats.__struct_fields__:
                raise ValueError(f"{self.name}: WorkerStats has no field {f!r}")
        if self.by is not None and (not isinstance(self.figure, str) or self.per is not None):
            raise ValueError(f"{self.name}: `by` reads a dict field and is no ratio")

    def family(self, labels: list[str]) -> MetricFamily:
        names = [*labels, self.by[0]] if self.by is not None else labels
        make = GaugeMetricFamily if self.kind == "gauge" else CounterMetricFamily
        return make(self.name, self.help, labels=names)

    def add(self, metric: MetricFamily, labels: list[str], rows: Sequence[WorkerRow]) -> None:
        """The samples of `rows` (summed) under `labels`."""
        if self.by is None:
            metric.add_metric(labels, self._value(rows))
            return
        assert isinstance(self.figure, str)
        for key in self.by[1]:
            metric.add_metric([*labels, key], sum(_keyed(self.figure, key, w) for w in rows))

    def _value(self, rows: Sequence[WorkerRow]) -> float:
        total = sum(_number(self.figure, w) for w in rows)
        if self.per is None:
            return total
        whole = sum(_number(self.per, w) for w in rows)
        return total / whole if whole else 0


def _number(figure: Figure, row: WorkerRow) -> float:
    if isinstance(figure, str):
        value: float = getattr(row.load, figure)
        return value
    return figure(row)


def _keyed(field: str, key: str, row: WorkerRow) -> int:
    counts: dict[str, int] = getattr(row.load, field)
    return counts.get(key, 0)


def gauge(name: str, help: str, figure: Figure, per: Figure | None = None) -> Family:
    return Family(name, help, "gauge", figure, per=per)


def counter(
    name: str, help: str, field: str, by: tuple[str, tuple[str, ...]] | None = None
) -> Family:
    return Family(name, help, "counter", field, by=by)


def _used(w: WorkerRow) -> float:
    return w.num_used_blocks


def _host_used(w: WorkerRow) -> float:
    return w.load.num_host_total_blocks - w.load.num_host_free_blocks


_DIRECTIONS = ("direction", ("d2h", "h2d"))
_SLO_KINDS = ("kind", ("ttft", "tpot"))
_RESIZES = ("direction", ("shrink", "grow"))

MODEL_FAMILIES = (
    gauge("mell:num_requests_running", "Requests running on workers.", "num_running"),
    gauge("mell:num_requests_waiting", "Requests waiting on workers.", "num_waiting"),
    gauge(
        "mell:kv_cache_usage_perc",
        "KV cache usage of the model's pool (0-1).",
        _used,
        per="num_total_blocks",
    ),
    gauge("mell:kv_cache_used_blocks", "KV blocks in use in the model's pool.", _used),
    gauge("mell:kv_cache_total_blocks", "KV blocks of the model's pool.", "num_total_blocks"),
    gauge(
        "mell:kv_host_usage_perc",
        "Host KV tier usage of the model's pool (0-1).",
        _host_used,
        per="num_host_total_blocks",
    ),
    gauge("mell:num_requests_swapped", "Requests whose KV waits on the host tier.", "num_swapped"),
    gauge(
        "mell:active_workers",
        "Workers accepting requests.",
        lambda w: w.status == WorkerStatus.ACTIVE,
    ),
    gauge(
        "mell:releasable_workers",
        "Live workers holding no request (their device could go).",
        lambda w: w.releasable,
    ),
    gauge(
        "mell:sleeping_workers", "Workers asleep: their KV memory given back.", lambda w: w.sleeping
    ),
    gauge(
        "mell:kv_bytes_released",
        "KV memory bytes given back by the pool's sleeping workers.",
        lambda w: w.kv_bytes_released,
    ),
    gauge(
        "mell:kv_pool_cap_blocks",
        "KV blocks the workers' memory budgets allow now.",
        "kv_pool_cap_blocks",
    ),
    gauge(
        "mell:kv_pool_mapped_bytes",
        "Memory bytes the workers' KV pools hold now.",
        "kv_pool_mapped_bytes",
    ),
    counter("mell:num_preemptions", "Preemptions.", "num_preemptions_total"),
    counter(
        "mell:computed_tokens",
        "Tokens the workers' models computed: prefill (cache hits skipped, recomputation "
        "included) and decode.",
        "num_computed_tokens_total",
    ),
    counter(
        "mell:kv_offload_bytes",
        "KV bytes copied between device and host tier.",
        "offload_bytes_total",
        by=_DIRECTIONS,
    ),
    counter(
        "mell:slo_violations",
        "Latency SLO violations seen by workers.",
        "slo_violations_total",
        by=_SLO_KINDS,
    ),
    counter(
        "mell:prefix_cache_queries",
        "Prompt tokens looked up in workers' prefix caches.",
        "prefix_cache_queries_total",
    ),
    counter(
        "mell:prefix_cache_hits",
        "Prompt tokens found in workers' prefix caches (their prefill skipped).",
        "prefix_cache_hits_total",
    ),
    counter(
        "mell:kv_pool_resizes",
        "Changes of the workers' KV pool cap under their memory budget.",
        "kv_pool_resizes_total",
        by=_RESIZES,
    ),
    counter(
        "mell:kv_pool_blocks_moved",
        "KV blocks moved down below a shrunk pool cap.",
        "kv_pool_blocks_moved_total",
    ),
    counter(
        "mell:kv_pool_victims",
        "Requests preempted to clear KV blocks above a shrunk pool cap.",
        "kv_pool_victims_total",
    ),
    counter(
        "mell:kv_pool_trims",
        "Times a worker gave back the KV memory above its live blocks.",
        "kv_pool_trims_total",
    ),
)

WORKER_FAMILIES = (
    gauge(
        "mell:worker_kv_cache_usage_perc",
        "KV cache usage of one worker (0-1).",
        _used,
        per="num_total_blocks",
    ),
    gauge("mell:worker_kv_cache_used_blocks", "KV blocks in use on one worker.", _used),
    gauge("mell:worker_requests", "Requests held by one worker.", lambda w: len(w.request_blocks)),
    gauge(
        "mell:worker_sleeping",
        "1 while the worker sleeps (its KV memory given back).",
        lambda w: w.sleeping,
    ),
    gauge(
        "mell:worker_kv_bytes_released",
        "KV memory bytes the sleeping worker gave back.",
        lambda w: w.kv_bytes_released,
    ),
    gauge(
        "mell:worker_kv_pool_cap_blocks",
        "KV blocks the worker's memory budget allows now.",
        "kv_pool_cap_blocks",
    ),
    gauge(
        "mell:worker_kv_pool_mapped_bytes",
        "Memory bytes the worker's KV pool holds now.",
        "kv_pool_mapped_bytes",
    ),
)


class ViewCollector(Collector):
    """The tables' families (and the requests in flight per model), from the view at scrape
    time."""

    def __init__(self, view: ClusterView) -> None:
        self.view = view

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        view = self.view
        in_flight = GaugeMetricFamily(
            "mell:num_requests_in_flight",
            "Requests placed and not finished.",
            labels=["model_name"],
        )
        per_model = [(f, f.family(["model_name"])) for f in MODEL_FAMILIES]
        for model in view.model_names:
            rows = [
                w
                for w in view.worker_rows.values()
                if w.model == model and w.status != WorkerStatus.LOST
            ]
            for f, metric in per_model:
                f.add(metric, [model], rows)
            in_flight.add_metric([model], sum(r.model == model for r in view.requests.values()))
        per_worker = [(f, f.family(["worker", "model_name", "state"])) for f in WORKER_FAMILIES]
        for w in view.worker_rows.values():
            labels = [w.worker_id, w.model, w.status.name.lower()]
            for f, metric in per_worker:
                f.add(metric, labels, [w])
        yield in_flight
        yield from (metric for _, metric in per_model + per_worker)
