"""Trace readers: Azure LLM 2023 CSV, Mooncake JSONL, ShareGPT lengths (Poisson arrivals).

A trace is arrays of arrival seconds (from the first arrival), prompt and output tokens, and a
model label per request. A bad line raises TraceError naming the file and the line number.

Mooncake rows also carry `hash_ids`: one id per 512-token block of the prompt, equal ids in the
same leading positions meaning a shared prefix. The trace keeps, per request, the chained hashes
(`mell.common.hashing`, as the worker will hash token blocks) of its *full* prompt blocks (the
partial last block is never shared); files without ids give empty prefixes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from mell.common.errors import ConfigError
from mell.common.hashing import chain_hashes

Row = tuple[float, int, int]  # one request of a file: (arrival s, prompt tokens, output tokens)
MOONCAKE_BLOCK_TOKENS = 512  # tokens per `hash_ids` entry in the Mooncake traces


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
    # per request: chained hashes of its full prompt blocks of `prefix_block_tokens` tokens
    # (empty without hash ids); None when no file of the trace has any
    prefix: list[list[int]] | None = None
    prefix_block_tokens: int = MOONCAKE_BLOCK_TOKENS

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1] - self.arrival_s[0]) if len(self) else 0.0


def read_trace(
    path: str | Path, *, rate: float = 1.0, seed: int = 0
) -> tuple[list[Row], str, list[list[int]] | None]:
    """Rows (arrival_s absolute, prompt, output) of one file, its format name, and each row's
    prefix block ids (`hash_ids`, Mooncake only; None for the other formats)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise TraceError(f"{path}: cannot read trace: {err.strerror}") from None
    lines = text.splitlines()
    if path.suffix == ".jsonl":
        rows, ids = _mooncake(path, lines)
        return rows, "mooncake", ids
    header = lines[0].strip().lstrip("\ufeff") if lines else ""
    if header.startswith("TIMESTAMP"):
        return _azure(path, lines), "azure", None
    if header.startswith("num_prefill_tokens"):
        return _sharegpt(path, lines, rate, seed), "sharegpt", None
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


def _mooncake(path: Path, lines: list[str]) -> tuple[list[Row], list[list[int]]]:
    rows: list[Row] = []
    ids: list[list[int]] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            t = float(obj["timestamp"]) / 1000.0
            prompt, output = int(obj["input_length"]), int(obj["output_length"])
            hash_ids = [int(h) for h in obj.get("hash_ids", ())]
        except (ValueError, KeyError, TypeError) as err:
            raise TraceError(
                f"{path}:{lineno}: bad Mooncake record ({err}): {line[:80]!r}"
            ) from None
        rows.append((t, prompt, output))
        ids.append(hash_ids)
    return rows, ids


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
    first, keeping at least one prompt token) and counted in `Trace.clamped`. Prefix blocks
    scale with the lengths (`prefix_block_tokens` = 512 · `scale_len`); a shortened prompt
    keeps the hashes of the full blocks it still has.
    """
    labels: list[str] = []
    parts = []
    ids: list[list[int]] = []
    has_ids = False
    for i, path in enumerate(paths):
        rows, _, file_ids = read_trace(path, rate=rate, seed=seed + i)
        label = model_label(path)
        while label in labels:
            label += "'"
        labels.append(label)
        has_ids = has_ids or file_ids is not None
        if rows:
            arr = np.asarray(rows, dtype=np.float64)
            parts.append((arr, i))
            ids.extend(file_ids if file_ids is not None else [[] for _ in rows])
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
    block_tokens = max(1, round(MOONCAKE_BLOCK_TOKENS * scale_len))
    prefix = None
    if has_ids:
        prefix = [
            _prefix_hashes(ids[k], int(p) // block_tokens)
            for k, p in zip(order[: len(prompt)].tolist(), prompt.tolist(), strict=True)
        ]
    return Trace(arrival, prompt, output, model, labels, clamped, prefix, block_tokens)


def _prefix_hashes(hash_ids: list[int], full_blocks: int) -> list[int]:
    """The chained hashes of a request's first `full_blocks` prefix block ids (a block's
    hash stands for its content: the id, after the ids before it)."""
    return chain_hashes((h,) for h in hash_ids[:full_blocks])
