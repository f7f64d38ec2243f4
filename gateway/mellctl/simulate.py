"""`mellctl simulate`: what a policy would cost on a trace, before running it.

    mellctl simulate --trace AzureLLMInferenceTrace_conv.csv --profile llama2-13b-a100-40g \
        --policy mell,best-fit,worst-fit,lb --scale-time 2 --scale-len 2 --plot active.png

Repeat --trace to merge files as separate models (one pool each), e.g. Azure code + conv.

With a trace that has prefix hashes (Mooncake), `--prefix-cache` simulates the workers' prefix
caches: `blind` (placement ignores them), `aware` or `on` (mell and best-fit place by where
prefixes are cached), `both` (each policy blind, then aware where it can be), `off` (no cache).

    mellctl simulate --trace bench/traces/mooncake-fast25/synthetic_trace.jsonl \
        --profile llama3-8b-h100-80g \
        --policy mell,best-fit --prefix-cache both
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

from mell.common.errors import InvalidRequest
from mell.gateway.policy.base import policy_names
from mell.gateway.sim.bound import fluid_lower_bound
from mell.gateway.sim.host_tier import DEFAULT_HOST_LINK_GBPS, HostTierSpec
from mell.gateway.sim.profile import Profile, load_profile, profile_names
from mell.gateway.sim.report import (
    lower_bound,
    peak_over_bound_lines,
    plot,
    progress_bar,
    table,
)
from mell.gateway.sim.result import SimResult
from mell.gateway.sim.simulator import CACHE_AWARE, Simulator, sim_policy
from mell.gateway.sim.traces import Trace, load_traces

DEFAULT_POLICIES = "mell,best-fit,worst-fit,lb"
PREFIX_MODES = {
    "off": ("",),
    "blind": ("blind",),
    "aware": ("aware",),
    "on": ("aware",),
    "both": ("blind", "aware"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="replay a request trace against placement policies (offline)",
        description="Trace-driven simulation of the cluster policies on a (model, device) "
        f"profile. Profiles: {', '.join(profile_names())}.",
    )
    p.add_argument(
        "--trace",
        action="append",
        required=True,
        metavar="FILE",
        help="Azure CSV, Mooncake JSONL or ShareGPT CSV; repeat to merge files as separate models",
    )
    p.add_argument(
        "--profile",
        default="llama2-13b-a100-40g",
        help="profile name in configs/profiles or a .toml path",
    )
    p.add_argument(
        "--policy",
        default=DEFAULT_POLICIES,
        help=f"comma-separated policies (default {DEFAULT_POLICIES})",
    )
    p.add_argument(
        "--scale-time",
        type=float,
        default=1.0,
        help="divide inter-arrival gaps by X (X > 1: more load)",
    )
    p.add_argument(
        "--scale-len", type=float, default=1.0, help="multiply prompt and output lengths by Y"
    )
    p.add_argument("--epoch", type=float, default=0.5, help="epoch length in seconds")
    p.add_argument(
        "--rate",
        type=float,
        default=1.0,
        help="Poisson arrival rate (req/s) for traces without timestamps (ShareGPT)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="only the first N requests")
    p.add_argument(
        "--no-headroom",
        action="store_true",
        help="baselines place without MELL's growth reserve (they over-commit and preempt instead)",
    )
    p.add_argument(
        "--prefix-cache",
        choices=sorted(PREFIX_MODES),
        default="off",
        help="simulate the workers' prefix caches (traces with hash_ids): placement blind to "
        "them, aware (= on) of them (mell, best-fit), both, or off (default)",
    )
    p.add_argument(
        "--kv-offload",
        default="off",
        help="the workers' host KV tier (LayerKV), comma-separated to compare: off, swap "
        "(preempted decoders keep their KV on the host), layerwise (preempted prompts are "
        "also prefilled to the host and parked); each policy runs once per mode",
    )
    p.add_argument(
        "--host-kv-bytes",
        type=int,
        default=0,
        help="host tier bytes per worker (with --kv-offload)",
    )
    p.add_argument(
        "--host-link-gbps",
        type=float,
        default=DEFAULT_HOST_LINK_GBPS,
        help=f"device-host link of a worker, GB/s (default {DEFAULT_HOST_LINK_GBPS:g})",
    )
    p.add_argument(
        "--tpot-slo-s",
        type=float,
        default=0.0,
        help="SLO-aware admission: a prefill chunk joins a step only while the step stays "
        "within this TPOT (0: off)",
    )
    p.add_argument("--plot", metavar="PNG", help="write active workers over time to this PNG")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    names = _policy_names(args)
    hosts = _host_tiers(args)
    if args.plot:
        _check_plot_path(Path(args.plot))
    profile = load_profile(args.profile)
    trace = load_traces(
        args.trace,
        scale_time=args.scale_time,
        scale_len=args.scale_len,
        max_len=profile.max_len,
        rate=args.rate,
        seed=args.seed,
        limit=args.limit,
    )
    if args.prefix_cache != "off" and trace.prefix is None:
        raise InvalidRequest(
            f"--prefix-cache {args.prefix_cache}: the trace has no prefix hashes (hash_ids: "
            "Mooncake JSONL traces have them)"
        )
    results = _simulate(args, names, hosts, trace, profile)
    header = (
        f"trace {' + '.join(trace.models)}: {len(trace)} requests over {trace.duration_s:.0f} s "
        f"(scale-time {args.scale_time:g}, scale-len {args.scale_len:g}, {trace.clamped} clamped "
        f"to {profile.max_len} tokens); profile {profile.name} (C = {profile.capacity_blocks} "
        f"blocks x {profile.block_size}); epoch {args.epoch:g} s"
    )
    if args.json:
        print(json.dumps(_json(args, trace, profile, results), indent=2))
    else:
        print(header)
        print(table(results))
        for line in peak_over_bound_lines(results):
            print(line)
        if args.prefix_cache != "off":
            print(
                "prefix caches: the lower bound counts every request's KV and prefill in full "
                "(no sharing), so a run with caches may go below it"
            )
    if args.plot:
        plot(results, args.plot, header.split(";")[0])
        print(f"plot: {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _policy_names(args: argparse.Namespace) -> list[str]:
    """The policies asked for, once the numeric options are checked too."""
    names = [n.strip() for n in args.policy.split(",") if n.strip()]
    unknown = [n for n in names if n not in policy_names()]
    if unknown or not names:
        raise InvalidRequest(
            f"unknown policy {', '.join(unknown) or '(none)'}; known: {', '.join(policy_names())}"
        )
    if args.scale_time <= 0 or args.scale_len <= 0 or args.epoch <= 0 or args.rate <= 0:
        raise InvalidRequest("--scale-time, --scale-len, --epoch and --rate must be positive")
    return names


def _simulate(
    args: argparse.Namespace,
    names: list[str],
    hosts: list[HostTierSpec],
    trace: Trace,
    profile: Profile,
) -> list[SimResult]:
    """One run per policy (and host tier), all measured against the same fluid lower bound."""
    show_progress = (
        not args.no_progress and not args.json and len(trace) >= 2000 and sys.stderr.isatty()
    )
    bound = fluid_lower_bound(trace, profile, args.epoch)  # one reference for every policy
    results = []
    for (name, mode), host in itertools.product(_runs(names, args.prefix_cache), hosts):
        policy = sim_policy(
            name, profile, args.epoch, headroom=not args.no_headroom, prefix_aware=mode == "aware"
        )
        bar = progress_bar(f"{name} {mode}".strip()) if show_progress else None
        sim = Simulator(
            trace,
            profile,
            policy,
            epoch_s=args.epoch,
            progress=bar,
            sample_series=bool(args.plot),
            bound=bound,
            prefix_cache=bool(mode),
            host=host,
        )
        result = sim.run()
        result.prefix_cache = mode
        results.append(result)
    return results


def _host_tiers(args: argparse.Namespace) -> list[HostTierSpec]:
    """The host tier of every run (one per --kv-offload mode), checked before any run."""
    modes = [m.strip() for m in args.kv_offload.split(",") if m.strip()] or ["off"]
    return [
        HostTierSpec(
            kv_offload=mode,
            host_kv_bytes=args.host_kv_bytes,
            link_gbps=args.host_link_gbps,
            tpot_slo_s=args.tpot_slo_s,
        ).check()
        for mode in dict.fromkeys(modes)
    ]


def _runs(names: list[str], prefix_cache: str) -> list[tuple[str, str]]:
    """(policy, cache placement) of every run: "" without the cache model, "blind" or
    "aware"; a policy without a cache-aware placement runs blind only."""
    runs = []
    for name in names:
        for mode in PREFIX_MODES[prefix_cache]:
            if mode == "aware" and name not in CACHE_AWARE:
                mode = "blind"
            if (name, mode) not in runs:
                runs.append((name, mode))
    return runs


def _json(
    args: argparse.Namespace, trace: Trace, profile: Profile, results: list[SimResult]
) -> dict[str, object]:
    return {
        "trace": args.trace,
        "models": trace.models,
        "requests": len(trace),
        "scale_time": args.scale_time,
        "scale_len": args.scale_len,
        "profile": profile.name,
        "epoch_s": args.epoch,
        "prefix_cache": args.prefix_cache,
        "kv_offload": args.kv_offload,
        "host_kv_bytes": args.host_kv_bytes,
        "tpot_slo_s": args.tpot_slo_s,
        "lower_bound": lower_bound(results),
        "results": [r.summary() for r in results],
    }


def _check_plot_path(png: Path) -> None:
    """Refuse a --plot path the PNG cannot be written to, before the run rather than after."""
    if png.is_dir():
        raise InvalidRequest(f"--plot {png}: a folder; give the PNG file's path")
    if not png.parent.is_dir():
        raise InvalidRequest(f"--plot {png}: folder {png.parent} does not exist")
