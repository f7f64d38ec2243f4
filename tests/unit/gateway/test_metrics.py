"""/metrics: the host KV tier's figures from workers' load reports, and time per output token."""

from __future__ import annotations

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


def host_load(total: int, free: int, swapped: int, d2h: int, tpot: int) -> WorkerLoad:
    return WorkerLoad(
        num_running=1,
        num_waiting=0,
        num_total_blocks=10,
        num_free_blocks=7,
        num_preemptions_total=0,
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
