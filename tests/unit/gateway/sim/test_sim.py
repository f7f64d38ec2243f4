from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mell.gateway.mellctl.main import main as mellctl
from mell.gateway.sim.profile import load_profile
from mell.gateway.sim.simulator import Simulator, sim_policy
from mell.gateway.sim.traces import TraceError, load_traces

AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\r\n"


def azure_file(tmp_path: Path, name: str, n: int = 300, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(0.05, n))
    lines = [
        f"2023-11-16 18:{int(x // 60) % 60:02d}:{x % 60:010.7f},{rng.integers(50, 4000)},"
        f"{rng.integers(1, 400)}"
        for x in t
    ]
    path = tmp_path / f"AzureLLMInferenceTrace_{name}.csv"
    path.write_text(AZURE_HEADER + "\r\n".join(lines))
    return path


def test_azure_merge_scales_and_labels(tmp_path: Path) -> None:
    a, b = azure_file(tmp_path, "code", 50), azure_file(tmp_path, "conv", 70, seed=1)
    one = load_traces([a])
    two = load_traces([a, b], scale_time=2.0, scale_len=2.0, max_len=5000)
    assert two.models == ["code", "conv"] and len(two) == 120
    assert np.all(np.diff(two.arrival_s) >= 0)
    assert two.duration_s == pytest.approx(load_traces([a, b]).duration_s / 2)
    assert np.all(two.prompt + two.output <= 5000) and two.clamped > 0
    assert one.prompt.sum() * 2 >= two.prompt[two.model == 0].sum()


def test_bad_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(AZURE_HEADER + "2023-11-16 18:17:03.97,10,5\r\n2023-11-16 18:17:04.0,x,8")
    with pytest.raises(TraceError, match=r"bad\.csv:3: token counts must be integers"):
        load_traces([path])
    path.write_text(AZURE_HEADER + "not a time,10,5")
    with pytest.raises(TraceError, match=r"bad\.csv:2: bad TIMESTAMP"):
        load_traces([path])


def test_mooncake_and_sharegpt_readers(tmp_path: Path) -> None:
    moon = tmp_path / "trace.jsonl"
    moon.write_text(
        '{"timestamp": 0, "input_length": 100, "output_length": 5}\n'
        '{"timestamp": 1500, "input_length": 200, "output_length": 7}\n'
    )
    t = load_traces([moon])
    assert t.arrival_s.tolist() == [0.0, 1.5] and t.prompt.tolist() == [100, 200]
    moon.write_text('{"timestamp": 0}\n')
    with pytest.raises(TraceError, match=r"trace\.jsonl:1"):
        load_traces([moon])
    share = tmp_path / "lengths.csv"
    share.write_text(
        "num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n"
        + "\n".join(f"{100 + i},{10 + i},{110 + 2 * i},1.0" for i in range(400))
    )
    s = load_traces([share], rate=4.0, seed=3)
    assert len(s) == 400 and s.duration_s / 399 == pytest.approx(0.25, rel=0.2)


@pytest.mark.parametrize("policy", ["mell", "best-fit", "worst-fit", "lb", "round-robin"])
def test_every_request_finishes_and_peak_is_at_least_the_bound(tmp_path: Path, policy) -> None:
    profile = load_profile("llama2-7b-rtx4090")
    trace = load_traces(
        [azure_file(tmp_path, "conv")], scale_time=4, scale_len=2, max_len=profile.max_len
    )
    r = Simulator(trace, profile, sim_policy(policy, profile, 0.5)).run()
    assert r.rejected == 0 and r.requests == len(trace)
    assert r.peak_active >= r.lower_bound > 0 and r.avg_active <= r.peak_active
    assert r.ttft_p50_s > 0 and r.tpot_mean_ms > 0 and 0 < r.mem_util <= 1
    assert r.kv_migrations + r.token_migrations == r.migrations
    if policy in ("best-fit", "worst-fit", "round-robin"):
        assert r.migrations == 0
    again = Simulator(trace, profile, sim_policy(policy, profile, 0.5)).run()
    assert (again.peak_active, again.migrations) == (r.peak_active, r.migrations)


def test_mellctl_simulate_json_and_plot(tmp_path: Path, capsys) -> None:
    trace = azure_file(tmp_path, "conv", 200)
    png = tmp_path / "active.png"
    code = mellctl(
        [
            "simulate",
            "--trace",
            str(trace),
            "--policy",
            "mell,best-fit",
            "--profile",
            "llama2-7b-rtx4090",
            "--scale-time",
            "3",
            "--json",
            "--plot",
            str(png),
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in out["results"]] == ["mell", "best-fit"]
    assert out["lower_bound"] > 0 and png.stat().st_size > 1000


def test_mellctl_simulate_plot_into_a_missing_folder_fails_first(tmp_path: Path, capsys) -> None:
    trace = azure_file(tmp_path, "conv", 100)
    png = tmp_path / "missing" / "active.png"
    assert mellctl(["simulate", "--trace", str(trace), "--plot", str(png)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before the run: no table
    assert captured.err == f"mellctl: error: --plot {png}: folder {png.parent} does not exist\n"
    assert mellctl(["simulate", "--trace", str(trace), "--plot", str(tmp_path)]) == 1
    assert "a folder" in capsys.readouterr().err


def test_mellctl_simulate_table_and_errors(tmp_path: Path, capsys) -> None:
    trace = azure_file(tmp_path, "conv", 100)
    assert mellctl(["simulate", "--trace", str(trace), "--policy", "mell,lb"]) == 0
    out = capsys.readouterr().out
    assert "lower bound" in out and "mell: peak" in out
    bad = tmp_path / "bad.csv"
    bad.write_text(AZURE_HEADER + "2023-11-16 18:17:03.97,10")
    assert mellctl(["simulate", "--trace", str(bad)]) == 1
    assert "bad.csv:2" in capsys.readouterr().err
    assert mellctl(["simulate", "--trace", str(trace), "--policy", "nope"]) == 1
    assert mellctl(["simulate", "--trace", str(trace), "--profile", "nope"]) == 1
