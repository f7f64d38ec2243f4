"""The elastic KV pool's figures reach the operator: one real mell-tiny worker (CPU) under a
6 MiB memory budget behind `mellctl up`; three concurrent ~500-token prompts make its pool
shrink (a victim swapped to the host tier) and grow back, and once idle the pool's memory goes
back. `/metrics` and `mellctl workers` show it, read from the worker's load reports. (The
worker's prefill probe at start, `measure_prefill_tokens_per_s`, already shrinks the cap once:
the counters are compared before and after the burst.)"""

from __future__ import annotations

import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from mell_cluster import MELLCTL, LocalCluster, metric, post_json, start_cluster, wait_until

pytestmark = pytest.mark.slow

BUDGET = 6 << 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = start_cluster(
        tmp_path_factory.mktemp("elastic") / "data",
        "--workers", "1", "--device", "cpu", "--memory-budget-bytes", str(BUDGET),
        "--kv-offload", "swap", "--host-kv-bytes", str(16 << 20),
    )  # fmt: skip
    yield c
    c.stop()


def metrics(cluster: LocalCluster) -> str:
    with urllib.request.urlopen(cluster.url + "/metrics", timeout=10) as response:
        return str(response.read().decode())


def pool(cluster: LocalCluster, name: str, **labels: str) -> float:
    # (the labels as /metrics orders them: by name)
    return metric(metrics(cluster), f"mell:kv_pool_{name}", **labels, model_name="mell-tiny")


def counters(cluster: LocalCluster) -> dict[str, float]:
    return {
        "shrink": pool(cluster, "resizes_total", direction="shrink"),
        "grow": pool(cluster, "resizes_total", direction="grow"),
        "victims": pool(cluster, "victims_total"),
        "moved": pool(cluster, "blocks_moved_total"),
        "trims": pool(cluster, "trims_total"),
    }


def tokens(cluster: LocalCluster) -> tuple[float, float]:
    """(tokens the worker's model computed, prompt tokens its prefix cache held)."""
    text = metrics(cluster)
    computed = metric(text, "mell:computed_tokens_total", model_name="mell-tiny")
    return computed, metric(text, "mell:prefix_cache_hits_total", model_name="mell-tiny")


def complete(url: str, i: int, out: list[Any]) -> None:
    body = {"model": "mell-tiny", "prompt": f"{i} " + "hello there " * 100, "max_tokens": 24,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    out.append(post_json(url + "/v1/completions", body))


def test_the_pool_figures_follow_a_burst_under_a_budget(cluster: LocalCluster) -> None:
    wait_until(lambda: pool(cluster, "cap_blocks") > 0, 30, "the worker's first load report")
    before = counters(cluster)
    computed, hits = tokens(cluster)
    outs: list[Any] = []
    threads = [threading.Thread(target=complete, args=(cluster.url, i, outs)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(outs) == 3 and all(o["usage"]["completion_tokens"] == 24 for o in outs)
    # idle, nothing live: all of the pool's memory given back (a report after the burst says)
    wait_until(
        lambda: counters(cluster)["trims"] > before["trims"] and pool(cluster, "mapped_bytes") == 0,
        20,
        "a report after the burst's last trim",
    )
    after = counters(cluster)
    print(f"pool counters before the burst {before}, after {after}")
    # the model computed each prompt (less its cached prefix) and each token after the first;
    # more where a victim was recomputed rather than swapped
    computed_after, hits_after = tokens(cluster)
    prompts = sum(o["usage"]["prompt_tokens"] for o in outs)
    print(f"computed {computed_after - computed} tokens for {prompts} prompt tokens, "
          f"{hits_after - hits} of them cached, and 3 x 23 decodes")  # fmt: skip
    assert computed_after - computed >= prompts - (hits_after - hits) + 3 * 23
    assert after["shrink"] > before["shrink"] and after["grow"] > before["grow"]
    assert after["victims"] + after["moved"] > before["victims"] + before["moved"]
    cap = pool(cluster, "cap_blocks")
    assert cap > 0
    text = metrics(cluster)
    assert metric(text, "mell:worker_kv_pool_cap_blocks", worker="w0") == cap
    table = subprocess.run(
        [*MELLCTL, "workers", "--data-dir", str(cluster.data_dir)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert table.returncode == 0 and "KV MEM" in table.stdout and "0.0 MiB" in table.stdout
