"""The gateway's loop-lag probe: a callback that holds the loop shows as lag in /metrics."""

from __future__ import annotations

import asyncio
import time

from test_metrics import sample

from mell.gateway.cluster.loop_lag import probe_loop_lag
from mell.gateway.cluster.metrics import Metrics
from mell.gateway.cluster.view import ClusterView


async def test_a_blocked_loop_is_observed_as_lag_and_an_idle_one_is_not() -> None:
    lags: list[float] = []
    probe = asyncio.create_task(probe_loop_lag(lags.append, interval_s=0.005))
    await asyncio.sleep(0.05)
    idle = list(lags)
    time.sleep(0.2)  # holds the loop, as a long decode or a tokenizer call would
    await asyncio.sleep(0.02)
    probe.cancel()
    assert idle and all(lag >= 0 for lag in idle)
    assert max(lags) >= 0.15
    assert max(idle) < 0.15


def test_the_lag_histogram_is_served_at_metrics() -> None:
    metrics = Metrics(ClusterView())
    metrics.loop_lag.observe(0.3)
    text = metrics.render().decode()
    assert sample(text, "mell:event_loop_lag_seconds_bucket", le="0.25") == 0.0
    assert sample(text, "mell:event_loop_lag_seconds_bucket", le="0.5") == 1.0
