"""Presenting simulation results: the table, the JSON, the plot, a progress bar."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TextIO

from mell.gateway.sim.result import SimResult

if TYPE_CHECKING:
    from matplotlib.axes import Axes

COLUMNS = (
    ("policy", "{}"),
    ("peak", "{}"),
    ("avg", "{:.1f}"),
    ("peak/LB", "{:.3f}"),
    ("own KV/C", "{}"),
    ("peak/repack", "{:.3f}"),
    ("mem util", "{:.0%}"),
    ("mig/s", "{:.2f}"),
    ("kv/tok", "{}"),
    ("deferred", "{}"),
    ("preempt", "{}"),
    ("rejected", "{}"),
    ("TTFT p50 s", "{:.2f}"),
    ("TPOT ms", "{:.1f}"),
    ("wall s", "{:.1f}"),
)


# with the prefix cache model: placement, cached prompt tokens over those looked up, and the
# prompt tokens whose prefill the caches saved (millions)
PREFIX_COLUMNS = (("cache", "{}"), ("hit rate", "{:.1%}"), ("saved Mtok", "{:.1f}"))


def _prefix_row(r: SimResult) -> list[str]:
    values = (r.prefix_cache or "off", r.prefix_hit_rate, r.prefill_saved_tokens / 1e6)
    return [fmt.format(v) for (_, fmt), v in zip(PREFIX_COLUMNS, values, strict=True)]


# with a host tier (LayerKV): its mode, preemptions that swapped / parked KV on the host,
# tokens preemptions threw away (millions), and the TTFT tail
HOST_COLUMNS = (
    ("offload", "{}"),
    ("swap/park", "{}"),
    ("recomp Mtok", "{:.2f}"),
    ("TTFT p99 s", "{:.2f}"),
)


def _host_row(r: SimResult) -> list[str]:
    values = (
        r.kv_offload or "off",
        f"{r.swaps}/{r.parks}",
        r.recomputed_tokens / 1e6,
        r.ttft_p99_s,
    )
    return [fmt.format(v) for (_, fmt), v in zip(HOST_COLUMNS, values, strict=True)]


def _row(r: SimResult) -> list[str]:
    values = (
        r.policy,
        r.peak_active,
        r.avg_active,
        r.peak_over_lb,
        r.own_bound,
        r.peak_over_repack,
        r.mem_util,
        r.migrations_per_s,
        f"{r.kv_migrations}/{r.token_migrations}",
        r.deferred_moves,
        r.preemptions,
        r.rejected,
        r.ttft_p50_s,
        r.tpot_mean_ms,
        r.wall_s,
    )
    return [fmt.format(v) for (_, fmt), v in zip(COLUMNS, values, strict=True)]


def lower_bound(results: Sequence[SimResult]) -> int:
    """The fluid lower bound max_t Σ_pools ⌈Σ KV_t / C⌉ under fluid progression (`bound.py`):
    computed from the trace alone, so it is the same for every run of a table."""
    bounds = {r.lower_bound for r in results}
    if len(bounds) > 1:
        raise ValueError(f"runs of one table have different lower bounds: {sorted(bounds)}")
    return bounds.pop() if bounds else 0


def table(results: Sequence[SimResult]) -> str:
    """The results, one row each; after the policy, the prefix cache's columns when a run
    simulated the cache, the host tier's when a run had one."""
    columns = list(COLUMNS)
    rows = [_row(r) for r in results]
    if any(r.kv_offload for r in results):
        columns[1:1] = HOST_COLUMNS
        rows = [row[:1] + _host_row(r) + row[1:] for row, r in zip(rows, results, strict=True)]
    if any(r.prefix_cache for r in results):
        columns[1:1] = PREFIX_COLUMNS
        rows = [row[:1] + _prefix_row(r) + row[1:] for row, r in zip(rows, results, strict=True)]
    rows.insert(0, [name for name, _ in columns])
    lb = lower_bound(results)
    rows.append(["lower bound"] + [""] * (len(columns) - len(COLUMNS)) + [str(lb)])
    rows[-1] += [""] * (len(columns) - len(rows[-1]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = []
    for k, row in enumerate(rows):
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def peak_over_bound_lines(results: Sequence[SimResult]) -> list[str]:
    return [
        f"{r.policy}: peak {r.peak_active} / lower bound {r.lower_bound} = {r.peak_over_lb:.3f}"
        + (" (target <= 1.10)" if r.policy == "mell" else "")
        for r in results
    ]


def plot(results: Sequence[SimResult], path: str, title: str) -> None:
    """PNG of active workers over time: one panel per policy (shared axes), the worker count
    drawn as the step function it is (held from one epoch's count to the next, so an idle gap
    stays at zero), and the fluid lower bound as a dashed line (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(results),
        1,
        sharex=True,
        sharey=True,
        squeeze=False,
        figsize=(10, 1.2 + 2.0 * len(results)),
        dpi=120,
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (ax, r) in enumerate(zip(axes[:, 0], results, strict=True)):
        _panel(ax, r, colors[k % len(colors)])
    axes[0, 0].legend(loc="upper left", fontsize=8)
    axes[-1, 0].set_xlabel("simulated time (s)")
    axes[0, 0].set_ylim(bottom=0)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _panel(ax: Axes, r: SimResult, color: str) -> None:
    """One policy's active workers (steps) against the fluid lower bound (a line)."""
    ax.step(r.times, r.active, where="post", color=color, linewidth=1.0, label="active workers")
    ax.axhline(
        r.lower_bound,
        color="black",
        linestyle="--",
        linewidth=0.9,
        label=f"fluid lower bound ({r.lower_bound}, the same for every policy)",
    )
    ax.set_title(
        f"{r.policy}: peak {r.peak_active} ({r.peak_over_lb:.2f} x bound), "
        f"average {r.avg_active:.1f}, {r.migrations_per_s:.2f} migrations/s",
        loc="left",
        fontsize=10,
    )
    ax.set_ylabel("workers")
    ax.grid(alpha=0.3)


def progress_bar(label: str, stream: TextIO | None = None) -> Callable[[float], None]:
    """A one-line progress bar on `stream` (stderr), redrawn in place."""
    out = stream or sys.stderr

    def show(frac: float) -> None:
        filled = int(frac * 30)
        out.write(f"\r{label:<12} [{'#' * filled}{'.' * (30 - filled)}] {frac:6.1%}")
        if frac >= 1.0:
            out.write("\n")
        out.flush()

    return show
