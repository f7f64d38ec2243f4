"""Presenting simulation results: the table, the JSON, the plot, a progress bar."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TextIO

from mell.gateway.sim.result import SimResult

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
    rows = [[name for name, _ in COLUMNS]] + [_row(r) for r in results]
    lb = lower_bound(results)
    rows.append(["lower bound", str(lb)] + [""] * (len(COLUMNS) - 2))
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
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
    """PNG of active workers over time, one line per policy (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=120)
    for r in results:
        ax.plot(r.times, r.active, label=f"{r.policy} (peak {r.peak_active})", linewidth=1.0)
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("active workers")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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
