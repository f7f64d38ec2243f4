"""The simulator's host KV tier (LayerKV) and SLO-aware admission: a preempted request keeps
its KV on the host (swapped, or parked with its first token if it was still prefilling) and
is reloaded instead of recomputed; the view, and so MELL, sees device KV only; a TPOT SLO caps
the prefill chunk; `mellctl simulate --kv-offload` shows the effect."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from test_prefill import PROFILE, make_trace
from test_sim import azure_file

from mell.gateway.mellctl.main import main as mellctl
from mell.gateway.sim.host_tier import HostTierSpec
from mell.gateway.sim.simulator import DONE, WAITING, Simulator, sim_policy
from mell.gateway.sim.traces import load_traces

HOST = 64 << 30  # bytes of host tier per worker


def simulator(trace, mode: str = "off", tpot_slo_s: float = 0.0) -> Simulator:
    host = HostTierSpec(mode, HOST if mode != "off" else 0, tpot_slo_s=tpot_slo_s)
    policy = sim_policy("best-fit", PROFILE, 0.5, headroom=False)  # over-commits: preempts
    return Simulator(trace, PROFILE, policy, sample_series=False, host=host)


def _two_on_one_worker(mode: str) -> tuple[Simulator, str]:
    """Two requests stacked on one worker, the second (the latest: the victim) placed last."""
    sim = simulator(make_trace([0.0, 0.0], [6000, 5000], [2000, 2000]), mode)
    sim._place(0, 0.0)
    sim._place(1, 0.0)
    wid = sim.live[0]
    assert sim.live[1] == wid
    return sim, wid


@pytest.mark.parametrize("mode", ["swap", "layerwise"])
def test_a_victim_waits_on_the_host_outside_the_view_and_comes_back_by_reload(mode) -> None:
    sim, wid = _two_on_one_worker(mode)
    for k in range(6):  # both prompts prefilled (11,000 tokens at ~5,500 tokens/s)
        sim._decode(0.5 * k, 0.5 * (k + 1))
    assert sim.prefill.left(1) == 0 and not math.isnan(sim.first_token[1])
    load = sim.view.loads[wid]
    blocks = load["1"]
    cap = PROFILE.capacity_blocks
    sim._preempt(wid, load, cap + 1, 3.0)
    assert sim.host is not None and sim.host.on_host == {1: blocks} and sim.host.swaps == 1
    assert "1" not in sim.view.loads[wid]  # policies (MELL too) see device KV only
    assert sim.state[1] == WAITING and sim.waiting[wid] == [1]
    sim._resume(wid, load, sum(load.values()), 3.5)
    assert sim.live[1] == wid and sim.host.on_host == {}
    nbytes = blocks * PROFILE.block_size * PROFILE.model.kv_bytes_per_token
    assert sim.decode_from[1] == pytest.approx(3.5 + nbytes / 25e9)  # the reload, not a prefill
    assert sim.prefill.left(1) == 0 and sim.stats["recomputed"] == 0


def test_layerwise_parks_a_prompt_preempted_mid_prefill_with_its_first_token() -> None:
    sims = {}
    for mode in ("layerwise", "swap"):
        sim, wid = _two_on_one_worker(mode)
        for k in range(3):  # the first prompt done (~5,500 tokens/s), the second part-way
            sim._decode(0.5 * k, 0.5 * (k + 1))
        left = sim.prefill.left(1)
        assert 0 < left < 5000 and math.isnan(sim.first_token[1])
        sim._preempt(wid, sim.view.loads[wid], PROFILE.capacity_blocks + 1, 1.5)
        sims[mode] = sim
    parked, swap = sims["layerwise"], sims["swap"]
    assert parked.host is not None and parked.host.parks == 1
    assert parked.first_token[1] == pytest.approx(1.5 + PROFILE.step.prefill_ms(left) / 1000.0)
    assert parked.stats["recomputed"] == 0
    assert swap.host is not None and swap.host.parks == swap.host.swaps == 0
    assert swap.stats["recomputed"] == 5000 - left  # swap mode recomputes a prompt mid-prefill
    assert math.isnan(swap.first_token[1])


def test_swap_and_park_replace_recompute_and_every_request_finishes(tmp_path: Path) -> None:
    trace = load_traces(
        [azure_file(tmp_path, "conv", 400)], scale_time=4, scale_len=2, max_len=PROFILE.max_len
    )
    runs = {}
    for mode in ("off", "swap", "layerwise"):
        sim = simulator(trace, mode)
        runs[mode] = sim.run()
        assert (sim.state == DONE).all() and sim.n_waiting == 0
        assert sim.host is None or sum(sim.host.used.values()) == 0  # nothing left on the host
    off, swap, layerwise = runs["off"], runs["swap"], runs["layerwise"]
    for r in runs.values():
        print(
            f"{r.kv_offload or 'off':>9}: preemptions {r.preemptions}, swaps {r.swaps}, parks "
            f"{r.parks}, recomputed {r.recomputed_tokens}, TTFT p99 {r.ttft_p99_s:.2f} s"
        )
    assert off.preemptions > 0 and off.recomputed_tokens > 0 and off.swaps == off.parks == 0
    assert swap.swaps > 0 and swap.recomputed_tokens < off.recomputed_tokens
    assert layerwise.parks > 0 and layerwise.recomputed_tokens < off.recomputed_tokens
    assert layerwise.ttft_p99_s < off.ttft_p99_s
    assert swap.offload_bytes > 0 and layerwise.offload_bytes > 0


def test_a_tpot_slo_caps_the_prefill_chunk() -> None:
    trace = make_trace([0.0, 1.0], [100, 12_000], [4000, 10])
    gains = {}
    for slo in (0.0, 0.05):
        sim = simulator(trace, tpot_slo_s=slo)
        sim._place(0, 0.0)
        sim._decode(0.0, 0.5)
        sim._place(1, 1.0)
        before, left = sim.gen[0], sim.prefill.left(1)
        sim._decode(1.0, 1.5)
        gains[slo] = (sim.gen[0] - before, left - sim.prefill.left(1))
    assert gains[0.05][0] >= 0.5 / 0.05 * (1 - 1e-6)  # every step within the SLO
    assert gains[0.0][0] < 0.5 / 0.05  # without it the long prompt's chunks slow it down
    assert 0 < gains[0.05][1] < gains[0.0][1]  # the prompt still progresses, more slowly


def test_mellctl_simulate_kv_offload(tmp_path: Path, capsys) -> None:
    trace = str(azure_file(tmp_path, "conv", 200))
    args = ["simulate", "--trace", trace, "--policy", "best-fit", "--no-headroom"]
    assert mellctl([*args, "--kv-offload", "off,layerwise", "--host-kv-bytes", str(HOST)]) == 0
    out = capsys.readouterr().out
    assert "swap/park" in out and "TTFT p99 s" in out and "layerwise" in out
    assert mellctl([*args, "--kv-offload", "swap"]) == 1
    assert "--host-kv-bytes" in capsys.readouterr().err
    assert mellctl([*args, "--kv-offload", "fast", "--host-kv-bytes", "1"]) == 1
    assert "--kv-offload 'fast'" in capsys.readouterr().err
