"""/metrics: the host KV tier's and the elastic KV pool's figures from workers' load reports,
and time per output token."""

from __future__ import annotations

from typing import Any

from test_cluster_view import HISTORY, fold, job, make_dispatcher

from mell.common import events as ev
from mell.common.messages import TokenBatch, TokenOutput
from mell.common.workers import WorkerLoad
from mell.gateway.cluster.metrics import Metrics


def sample(text: str, name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        if line.startswith(name + "{") and all(w in line for w in want):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name} {labels} in /metrics")


def load(**figures: Any) -> WorkerLoad:
    """One running request on 10 blocks (3 used), and `figures`."""
    base = {"num_running": 1, "num_waiting": 0, "num_total_blocks": 10, "num_free_blocks": 7}
    return WorkerLoad(**base, num_preemptions_total=0, **figures)


def host_load(total: int, free: int, swapped: int, d2h: int, tpot: int) -> WorkerLoad:
    return load(
        num_host_total_blocks=total,
        num_host_free_blocks=free,
        num_swapped=swapped,
        offload_bytes_total={"d2h": d2h, "h2d": d2h // 2},
        slo_violations_total={"tpot": tpot},
    )


def test_host_tier_figures_sum_over_the_models_live_workers() -> None:
    view = fold(
        [
            *HISTORY,
            ev.LoadReported(worker_id="w0", load=host_load(100, 40, 2, 4096, 3)),
            ev.LoadReported(worker_id="w1", load=host_load(100, 100, 1, 1024, 1)),
        ]
    )
    text = Metrics(view).render().decode()
    assert sample(text, "mell:kv_host_usage_perc", model_name="m") == 60 / 200
    assert sample(text, "mell:num_requests_swapped", model_name="m") == 3
    assert sample(text, "mell:kv_offload_bytes_total", model_name="m", direction="d2h") == 5120
    assert sample(text, "mell:kv_offload_bytes_total", model_name="m", direction="h2d") == 2560
    assert sample(text, "mell:slo_violations_total", model_name="m", kind="tpot") == 4
    assert sample(text, "mell:slo_violations_total", model_name="m", kind="ttft") == 0


def test_a_worker_without_a_host_tier_reports_zero_usage() -> None:
    text = Metrics(fold(HISTORY)).render().decode()
    assert sample(text, "mell:kv_host_usage_perc", model_name="m") == 0
    assert sample(text, "mell:num_requests_swapped", model_name="m") == 0


def pool_load(cap: int, mapped: int, shrinks: int, moved: int, victims: int) -> WorkerLoad:
    return load(
        kv_pool_cap_blocks=cap,
        kv_pool_mapped_bytes=mapped,
        kv_pool_resizes_total={"shrink": shrinks, "grow": shrinks - 1},
        kv_pool_blocks_moved_total=moved,
        kv_pool_victims_total=victims,
        kv_pool_trims_total=1,
    )


def test_kv_pool_figures_sum_over_the_models_live_workers() -> None:
    history = [
        *HISTORY,
        ev.LoadReported(worker_id="w0", load=pool_load(6, 3 << 20, 4, 100, 2)),
        ev.LoadReported(worker_id="w1", load=pool_load(10, 5 << 20, 1, 20, 0)),
    ]
    text = Metrics(fold(history)).render().decode()
    assert sample(text, "mell:kv_pool_cap_blocks", model_name="m") == 16
    assert sample(text, "mell:kv_pool_mapped_bytes", model_name="m") == 8 << 20
    assert sample(text, "mell:kv_pool_resizes_total", model_name="m", direction="shrink") == 5
    assert sample(text, "mell:kv_pool_resizes_total", model_name="m", direction="grow") == 3
    assert sample(text, "mell:kv_pool_blocks_moved_total", model_name="m") == 120
    assert sample(text, "mell:kv_pool_victims_total", model_name="m") == 2
    assert sample(text, "mell:kv_pool_trims_total", model_name="m") == 2
    assert sample(text, "mell:worker_kv_pool_cap_blocks", worker="w0") == 6
    assert sample(text, "mell:worker_kv_pool_mapped_bytes", worker="w1") == 5 << 20
    # a lost worker's pool leaves the model's figures; its own mapped bytes read 0
    text = Metrics(fold([*history, ev.WorkerLost(worker_id="w1", reason="silent")])).render()
    lost = text.decode()
    assert sample(lost, "mell:kv_pool_cap_blocks", model_name="m") == 6
    assert sample(lost, "mell:kv_pool_mapped_bytes", model_name="m") == 3 << 20
    assert sample(lost, "mell:kv_pool_blocks_moved_total", model_name="m") == 100
    assert sample(lost, "mell:worker_kv_pool_mapped_bytes", worker="w1", state="lost") == 0


def test_a_worker_without_a_pool_report_shows_zeros() -> None:
    """A worker that reports no pool figures (an older one) adds nothing."""
    text = Metrics(fold(HISTORY)).render().decode()
    assert sample(text, "mell:kv_pool_mapped_bytes", model_name="m") == 0
    assert sample(text, "mell:kv_pool_resizes_total", model_name="m", direction="shrink") == 0
    assert sample(text, "mell:kv_pool_victims_total", model_name="m") == 0


async def test_time_per_output_token_is_observed_when_a_request_finishes() -> None:
    d, _link, _state = make_dispatcher()
    s = d.submit(job("a", prompt=10))
    for index, token in enumerate((1, 2, 3)):
        finish = "length" if index == 2 else None
        batch = TokenBatch(index + 1, [TokenOutput("a", index, [token], None, finish, 10)])
        d.on_token_batch(s.worker_id, batch)
    d.release(s, "length", "finished", 3)
    text = d.metrics.render().decode()
    assert sample(text, "mell:time_per_output_token_seconds_count", model_name="m") == 1


def test_computed_tokens_sum_over_the_models_live_workers() -> None:
    history = [
        *HISTORY,
        ev.LoadReported(worker_id="w0", load=load(num_computed_tokens_total=1200)),
        ev.LoadReported(worker_id="w1", load=load(num_computed_tokens_total=300)),
    ]
    assert sample(Metrics(fold(history)).render().decode(), "mell:computed_tokens_total") == 1500
    lost = fold([*history, ev.WorkerLost(worker_id="w1", reason="silent")])
    assert sample(Metrics(lost).render().decode(), "mell:computed_tokens_total") == 1200
