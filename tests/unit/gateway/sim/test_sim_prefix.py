"""The simulator with prefix caches on a Mooncake-format trace (hash_ids)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mell.gateway.mellctl.main import main as mellctl
from mell.gateway.sim.profile import load_profile
from mell.gateway.sim.simulator import Simulator, sim_policy
from mell.gateway.sim.traces import load_traces

PROFILE = "llama2-7b-rtx4090"  # C = 900 blocks of 16 tokens: 28 prefix blocks of 512


def chat_trace(tmp_path: Path, n_conv: int = 30, turns: int = 4, seed: int = 0) -> Path:
    """Conversations sharing a 2-block system prompt; each turn resends the history (one more
    block per turn) plus a partial block of new text."""
    rng = np.random.default_rng(seed)
    rows = []
    next_id = 2
    for c in range(n_conv):
        start = float(rng.uniform(0, 60_000))
        history = [0, 1]
        for k in range(turns):
            history = [*history, next_id]
            next_id += 1
            tokens = len(history) * 512 + int(rng.integers(1, 500))
            ids = [*history, next_id]  # the partial block's id (never shared)
            next_id += 1
            t = start + k * float(rng.uniform(3_000, 9_000))
            rows.append(
                {
                    "timestamp": int(t),
                    "input_length": tokens,
                    "output_length": 40,
                    "hash_ids": ids,
                    "conv": c,
                }
            )
    rows.sort(key=lambda r: r["timestamp"])
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def run(path: Path, policy: str, *, cache: bool, aware: bool = False, **kw):
    profile = load_profile(PROFILE)
    trace = load_traces([path], max_len=profile.max_len, **kw)
    pol = sim_policy(policy, profile, 0.5, prefix_aware=aware)
    sim = Simulator(trace, profile, pol, prefix_cache=cache)
    plan = pol.plan_epoch

    def checked(view, now):  # the books hold at every epoch
        check_charges(sim)
        return plan(view, now)

    pol.plan_epoch = checked  # type: ignore[method-assign]
    return sim, sim.run()


def check_charges(sim: Simulator) -> None:
    """On every worker: the KV charged to its requests is their blocks less the prefix blocks
    shared with another, each shared block charged once."""
    cache, view = sim.cache, sim.view
    assert cache is not None
    for wid, load in view.loads.items():
        on = [int(r) for r in load]
        assert sum(load.values()) == sum(int(sim.blocks[i]) for i in on)
        w = cache.workers.get(wid)
        refs = sum(len(cache.held[i][1]) for i in on if i in cache.held)
        distinct = len(w.refs) if w else 0
        assert sum(int(sim.discount[i]) for i in on) == (refs - distinct) * cache.per_block
        assert all(cache.held[i][0] == wid for i in on if i in cache.held)


@pytest.mark.parametrize("policy", ["mell", "best-fit", "worst-fit", "lb"])
def test_every_request_finishes_with_caches_and_the_books_hold(tmp_path: Path, policy) -> None:
    path = chat_trace(tmp_path)
    for aware in (False, True):
        sim, r = run(path, policy, cache=True, aware=aware, scale_time=4)
        assert r.rejected == 0 and (sim.state == 2).all()
        assert 0 < r.prefix_hit_rate < 1 and r.prefill_saved_tokens > 0
        assert r.prefill_saved_tokens <= r.prefill_queried_tokens


def test_cache_aware_placement_hits_more(tmp_path: Path) -> None:
    path = chat_trace(tmp_path, n_conv=60)
    for policy in ("mell", "best-fit"):
        _, blind = run(path, policy, cache=True, scale_time=4)
        _, aware = run(path, policy, cache=True, aware=True, scale_time=4)
        assert aware.prefix_hit_rate > blind.prefix_hit_rate, policy


def test_a_cached_prefix_is_not_prefilled_again(tmp_path: Path) -> None:
    # Two requests with the same 3 full blocks, the second after the first finished: the
    # cache-aware placement reopens the worker holding them, which computes only the last
    # 100 tokens, and the first token comes that much sooner.
    path = tmp_path / "two.jsonl"
    rows = [
        {"timestamp": 0, "input_length": 1636, "output_length": 2, "hash_ids": [7, 8, 9, 10]},
        {"timestamp": 5000, "input_length": 1636, "output_length": 2, "hash_ids": [7, 8, 9, 11]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    sim, r = run(path, "best-fit", cache=True, aware=True)
    assert r.prefill_saved_tokens == 3 * 512 and r.prefill_queried_tokens == 2 * 1636
    ttft = sim.first_token - sim.trace.arrival_s
    assert ttft[1] < ttft[0] / 4


def test_without_the_cache_the_hashes_change_nothing(tmp_path: Path) -> None:
    path = chat_trace(tmp_path)
    (tmp_path / "bare").mkdir()
    bare = tmp_path / "bare" / "chat.jsonl"  # the same model label
    bare.write_text(
        "\n".join(
            json.dumps({k: v for k, v in json.loads(line).items() if k != "hash_ids"})
            for line in path.read_text().splitlines()
        )
    )
    for policy in ("mell", "lb"):
        a = summary_without_cache(path, policy)
        b = summary_without_cache(bare, policy)
        assert a == b


def summary_without_cache(path: Path, policy: str) -> dict:
    profile = load_profile(PROFILE)
    trace = load_traces([path], max_len=profile.max_len, scale_time=4)
    out = Simulator(trace, profile, sim_policy(policy, profile, 0.5)).run().summary()
    out.pop("wall_s")
    return out


def test_mellctl_simulate_prefix_cache_columns(tmp_path: Path, capsys) -> None:
    path = chat_trace(tmp_path)
    args = ["simulate", "--trace", str(path), "--profile", PROFILE, "--policy", "mell,lb"]
    assert mellctl([*args, "--prefix-cache", "both", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    runs = [(r["policy"], r["prefix_cache"]) for r in out["results"]]
    assert runs == [("mell", "blind"), ("mell", "aware"), ("lb", "blind")]
    assert all(r["prefix_hit_rate"] > 0 for r in out["results"])
    assert mellctl([*args, "--prefix-cache", "aware"]) == 0
    table = capsys.readouterr().out
    assert "hit rate" in table and "saved Mtok" in table and "aware" in table


def test_prefix_cache_needs_hashes(tmp_path: Path, capsys) -> None:
    path = tmp_path / "AzureLLMInferenceTrace_code.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.97,10,5\n")
    rc = mellctl(["simulate", "--trace", str(path), "--prefix-cache", "on"])
    err = capsys.readouterr().err
    assert rc != 0 and "no prefix hashes" in err and "Traceback" not in err
