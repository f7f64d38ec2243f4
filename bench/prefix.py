"""Automatic prefix caching through the whole stack: multi-turn chat on `mellctl up --workers 2`
(mell-tiny), each turn resending the whole history, prefix caching on vs off in one run.

Workload: `--sessions` concurrent chats (4), `--turns` turns each (6); every chat opens with
a shared system prompt (80 words, ~250 tokens) and its own first message (150 words), each
later turn adds a 40-word user message to the history and the previous reply (greedy,
`--max-tokens` 16, ignore_eos). Turns of one chat are sequential, chats run concurrently.
Two clusters, one after the other, on the same machine: workers with prefix caching (and the
gateway's prefix-aware least-loaded placement) vs workers started with `--no-prefix-caching`.

`--model small` (the default) serves a random llama with mell-tiny's tokenizer and chat template
but wider and deeper (hidden 256, 4 layers, 4 heads; written by this script with
transformers): mell-tiny's prefill of a whole history (~1.3k tokens) costs about as much as
the serving path around it on a CPU, which hides what caching saves; `--model mell-tiny` runs
mell-tiny itself.

Figures per mode: TTFT p50/p99 (first streamed content chunk) of first turns and of later
turns, and prefill tokens computed = mell:prompt_tokens_total - mell:prefix_cache_hits_total
(both from the gateway's /metrics; recomputation after a preemption not counted), with the
cached tokens the responses' usage reported. The target: later turns' TTFT p50 at least 3x
lower with caching.

    python bench/prefix.py [--model small|mell-tiny] [--sessions 4] [--turns 6] [--device cpu]

The last line is `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

MELLCTL = [sys.executable, "-m", "mell.gateway.mellctl.main"]
WORDS = [
    "cache",
    "block",
    "token",
    "prompt",
    "model",
    "worker",
    "gateway",
    "memory",
    "prefix",
    "history",
    "turn",
    "answer",
    "question",
    "server",
    "request",
    "latency",
    "batch",
    "kernel",
    "layer",
    "attention",
    "value",
    "key",
    "query",
]


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_small_model(directory: Path) -> Path:
    """A random llama, bigger than mell-tiny, with mell-tiny's tokenizer files."""
    import shutil

    import torch
    import transformers

    from mell.common.tiny_model import write_tiny_model

    tiny = write_tiny_model(directory / "tiny")
    config = json.loads((tiny / "config.json").read_text())
    config.update(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=64,
    )
    for key in ("architectures", "model_type", "torch_dtype"):
        config.pop(key)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    out = directory / "mell-small"
    model.save_pretrained(out)
    for f in tiny.iterdir():
        if f.name not in ("config.json", "model.safetensors") and f.is_file():
            shutil.copy(f, out / f.name)
    return out


def start(
    data_dir: Path, model: str, device: str, caching: bool
) -> tuple[subprocess.Popen[bytes], str]:
    cmd = [*MELLCTL, "up", "--workers", "2", "--device", device, "--data-dir", str(data_dir)]
    cmd += ["--model", model]
    if not caching:
        cmd.append("--no-prefix-caching")
    err = open(data_dir / "mellctl.err", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
    err.close()
    ready, _, _ = select.select([proc.stdout], [], [], 180)
    line = proc.stdout.readline().decode() if ready else ""  # type: ignore[union-attr]
    if "http://" not in line:
        stop(proc)
        raise RuntimeError(f"mellctl up did not start; see {data_dir / 'mellctl.err'}")
    return proc, next(w for w in line.split() if w.startswith("http://"))


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


MODEL = "mell-tiny"  # the served name (set by main)


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and f'model_name="{MODEL}"' in line
    )


async def turn(
    session: aiohttp.ClientSession, url: str, messages: list[dict[str, str]], max_tokens: int
) -> tuple[float, str, int]:
    """One streamed chat turn: (TTFT s, the reply, cached prompt tokens)."""
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    ttft = 0.0
    reply: list[str] = []
    cached = 0
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
        async for raw in r.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                cached = chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    if not ttft:
                        ttft = time.perf_counter() - started
                    reply.append(choice["delta"]["content"])
    return ttft, "".join(reply), cached


async def chat(
    session: aiohttp.ClientSession, url: str, index: int, args: argparse.Namespace
) -> list[tuple[int, float, int]]:
    """One conversation: (turn, TTFT, cached tokens) per turn."""
    rng = random.Random(1000 + index)
    system = words(random.Random(7), 80)  # shared by every chat
    messages = [{"role": "system", "content": system}]
    out = []
    for t in range(args.turns):
        messages.append({"role": "user", "content": words(rng, 150 if t == 0 else 40)})
        ttft, reply, cached = await turn(session, url, messages, args.max_tokens)
        messages.append({"role": "assistant", "content": reply})
        out.append((t, ttft, cached))
    return out


async def measure(url: str, args: argparse.Namespace) -> dict[str, float]:
    async with aiohttp.ClientSession() as session:  # warm-up: one short chat, off the books
        await turn(session, url, [{"role": "user", "content": "warm up"}], 4)
    await asyncio.sleep(0.6)
    prompt0, hits0 = (
        metric(url, "mell:prompt_tokens_total"),
        metric(url, "mell:prefix_cache_hits_total"),
    )
    started = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        chats = await asyncio.gather(*(chat(session, url, i, args) for i in range(args.sessions)))
    elapsed = time.perf_counter() - started
    await asyncio.sleep(0.6)  # the workers' last load reports (hit counters)
    prompt = metric(url, "mell:prompt_tokens_total") - prompt0
    hits = metric(url, "mell:prefix_cache_hits_total") - hits0
    first = [ttft for c in chats for t, ttft, _ in c if t == 0]
    later = [ttft for c in chats for t, ttft, _ in c if t > 0]
    return {
        "ttft_first_p50_ms": 1000 * statistics.median(first),
        "ttft_first_p99_ms": 1000 * pct(first, 0.99),
        "ttft_later_p50_ms": 1000 * statistics.median(later),
        "ttft_later_p99_ms": 1000 * pct(later, 0.99),
        "prompt_tokens": prompt,
        "prefill_tokens_computed": prompt - hits,
        "cached_tokens_reported": float(sum(cached for c in chats for _, _, cached in c)),
        "elapsed_s": elapsed,
    }


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=4)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", choices=["small", "mell-tiny"], default="small")
    args = p.parse_args()
    global MODEL
    result: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="mell-prefix-") as tmp:
        model = "mell-tiny" if args.model == "mell-tiny" else str(write_small_model(Path(tmp)))
        MODEL = Path(model).name
        for mode in ("off", "on"):
            data_dir = Path(tmp) / mode
            data_dir.mkdir()
            proc, url = start(data_dir, model, args.device, caching=mode == "on")
            try:
                result[mode] = asyncio.run(measure(url, args))
            finally:
                stop(proc)
            print(mode, json.dumps({k: round(v, 1) for k, v in result[mode].items()}), flush=True)
    on, off = result["on"], result["off"]
    summary = {
        "model": MODEL,
        "sessions": args.sessions,
        "turns": args.turns,
        "device": args.device,
        "ttft_later_p50_speedup": off["ttft_later_p50_ms"] / on["ttft_later_p50_ms"],
        "ttft_later_p99_speedup": off["ttft_later_p99_ms"] / on["ttft_later_p99_ms"],
        "prefill_tokens_saved_frac": 1 - on["prefill_tokens_computed"] / on["prompt_tokens"],
        "on": on,
        "off": off,
    }
    print("RESULT " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
