"""Trace readers: Azure LLM 2023 CSV, Mooncake JSONL, ShareGPT lengths (Poisson arrivals).

A trace is arrays of arrival seconds (from the first arrival), prompt and output tokens, and a
model label per request. A bad line raises TraceError naming the file and the line number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from mell.common.errors import ConfigError

Row = tuple[float, int, int]  # one request of a file: (arrival s, prompt tokens, output tokens)


class TraceError(ConfigError):
    """A trace file that cannot be read; the message names the file and line."""


@dataclass(slots=True)
class Trace:
    arrival_s: np.ndarray  # float64, sorted
    prompt: np.ndarray  # int64
    output: np.ndarray  # int64
    model: np.ndarray  # int32 index into `models`
    models: list[str]
    clamped: int = 0  # requests shortened to fit max_len after scaling

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1] - self.arrival_s[0]) if len(self) else 0.0


def read_trace(path: str | Path, *, rate: float = 1.0, seed: int = 0) -> tuple[list[Row], str]:
    """Rows (arrival_s absolute, prompt, output) of one file, and its format name."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise TraceError(f"{path}: cannot read trace: {err.strerror}") from None
    lines = text.splitlines()
    if path.suffix == ".jsonl":
        return _mooncake(path, lines), "mooncake"
    header = lines[0].strip().lstrip("\ufeff") if lines else ""
    if header.startswith("TIMESTAMP"):
        return _azure(path, lines), "azure"
    if header.startswith("num_prefill_tokens"):
        return _sharegpt(path, lines, rate, seed), "sharegpt"
    raise TraceError(
        f"{path}:1: unknown trace format (expected an Azure CSV header TIMESTAMP,..., a "
        "ShareGPT header num_prefill_tokens,..., or a .jsonl Mooncake trace)"
    )


def _positive_ints(path: Path, lineno: int, *values: str) -> list[int]:
    try:
        out = [int(v) for v in values]
    except ValueError:
        raise TraceError(f"{path}:{lineno}: token counts must be integers: {values}") from None
    if any(v < 0 for v in out):
        raise TraceError(f"{path}:{lineno}: negative token count: {values}")
    return out


def _azure(path: Path, lines: list[str]) -> list[Row]:
    rows: list[Row] = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.strip().split(",")
        if len(parts) != 3:
            raise TraceError(f"{path}:{lineno}: expected 3 columns, got {len(parts)}: {line!r}")
        stamp = parts[0].strip()
        date, _, frac = stamp.partition(".")
        try:
            t = datetime.fromisoformat(date).timestamp() + float("0." + (frac or "0"))
        except ValueError:
            raise TraceError(f"{path}:{lineno}: bad TIMESTAMP {stamp!r}") from None
        prompt, output = _positive_ints(path, lineno, parts[1], parts[2])
        rows.append((t, prompt, output))
    return rows


def _mooncake(path: Path, lines: list[str]) -> list[Row]:
    rows: list[Row] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            t = float(obj["timestamp"]) / 1000.0
            prompt, output = int(obj["input_length"]), int(obj["output_length"])
        except (ValueError, KeyError, TypeError) as err:
            raise TraceError(
                f"{path}:{lineno}: bad Mooncake record ({err}): {line[:80]!r}"
            ) from None
        rows.append((t, prompt, output))
    return rows


def _sharegpt(path: Path, lines: list[str], rate: float, seed: int) -> list[Row]:
    lengths = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.strip().split(",")
        if len(parts) < 2:
            raise TraceError(f"{path}:{lineno}: expected at least 2 columns: {line!r}")
        lengths.append(_positive_ints(path, lineno, parts[0], parts[1]))
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=len(lengths))
    times = np.cumsum(gaps) - gaps[0] if len(gaps) else gaps
    return [(float(t), p, o) for t, (p, o) in zip(times, lengths, strict=True)]


def model_label(path: str | Path) -> str:
    """The model label of a trace file: `AzureLLMInferenceTrace_code.csv` -> `code`."""
    stem = Path(path).stem
    return stem.rsplit("_", 1)[-1].lower() if "_" in stem else stem


def load_traces(
    paths: list[str | Path],
    *,
    scale_time: float = 1.0,
    scale_len: float = 1.0,
    max_len: int = 0,
    rate: float = 1.0,
    seed: int = 0,
    limit: int = 0,
) -> Trace:
    """Read one or more files, one model per file, merged by arrival time.

    Arrival gaps are divided by `scale_time` (more load), token counts multiplied by
    `scale_len`. With `max_len`, a request longer than it after scaling is shortened (prompt
    first, keeping at least one prompt token) and counted in `Trace.clamped`.
    """
    labels: list[str] = []
    parts = []
    for i, path in enumerate(paths):
        rows, _ = read_trace(path, rate=rate, seed=seed + i)
        label = model_label(path)
        while label in labels:
            label += "'"
        labels.append(label)
        if rows:
            arr = np.asarray(rows, dtype=np.float64)
            parts.append((arr, i))
    if not parts:
        raise TraceError(f"{', '.join(map(str, paths))}: no requests in the trace")
    t0 = min(float(a[:, 0].min()) for a, _ in parts)
    arrival = np.concatenate([(a[:, 0] - t0) / scale_time for a, _ in parts])
    prompt = np.concatenate([np.maximum(1, np.rint(a[:, 1] * scale_len)) for a, _ in parts])
    output = np.concatenate([np.maximum(1, np.rint(a[:, 2] * scale_len)) for a, _ in parts])
    model = np.concatenate([np.full(len(a), i, dtype=np.int32) for a, i in parts])
    order = np.argsort(arrival, kind="stable")
    arrival, prompt, output, model = arrival[order], prompt[order], output[order], model[order]
    prompt, output = prompt.astype(np.int64), output.astype(np.int64)
    clamped = 0
    if max_len:
        too_long = prompt + output > max_len
        clamped = int(too_long.sum())
        output = np.minimum(output, max_len - 1)
        prompt = np.where(too_long, np.maximum(1, max_len - output), prompt)
    if limit:
        arrival, prompt, output, model = (
            arrival[:limit],
            prompt[:limit],
            output[:limit],
            model[:limit],
        )
    return Trace(arrival, prompt, output, model, labels, clamped)
