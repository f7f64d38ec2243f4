"""Streaming through gateway + worker with the model's compute taken out, against the limit.

    python bench/gateway.py [--streams 256] [--rate 20] [--tokens 100] [--fast-rate 1000]

Gateway path: `mell-gateway` and `mell-workerd --fake-token-rate R` (no model: every running
request gets one token per step, steps on the wall-clock grid of multiples of 1/R). Limit: a
minimal aiohttp SSE server (uvloop, like the gateway) that streams the same completion chunks
from memory on the same grid. Each in its own process; the client is this process (uvloop, raw
asyncio protocol: it only counts chunks and timestamps them).

Two phases, both with `--streams` concurrent streams, the limit and the gateway alternating for
`--repeat` rounds (each path's best round is kept: lowest p99, highest tokens/s):
- latency: R = --rate tokens/s per stream. Every token is emitted at a grid point, so its
  latency is its arrival time minus the last grid point before it. Added latency = gateway
  percentile minus limit percentile (p50, p99).
- throughput: R = --fast-rate, far above what either path sustains; tokens/s delivered (the
  gateway counts tokens from its usage chunk: when it falls behind it coalesces a stream's
  pending tokens into one chunk, as vLLM does; the limit writes one chunk per token).

Target at 256 streams: gateway tokens/s >= 50% of the limit's, added p99 < 5 ms.

A third phase, `big_prompt` (`--big-prompt-mb`, 0 skips it): one prompt of that many MB arrives
while `--streams` streams run at --rate (a control window without it first). It goes to
`tiny-long`, mell-tiny with a context of 524,288 tokens, so its size alone does not refuse it:
the gateway tokenizes all of it (in its tokenizer process pool) and refuses it for its length.
Measured: the largest gap between two chunks of any running stream (target < 100 ms; the grid
puts one chunk every 1/rate s, so a gap of 1/rate is no stall), the prompt's answer time, and
the gateway's RSS growth, and from the gateway's `mell:event_loop_lag_seconds` the bucket of its
loop's worst lag in each window (`loop_lag_max_ms_at_most`): a gap with no matching loop lag was
not the gateway's loop holding it. A last window runs a busy process at the tokenizer's priority
(nice 10) for as long as the prompt took, with no prompt (`cpu_hog_max_gap_ms`): the cost of one
core taken away, which on a 2-core machine tokenizing 10 MB cannot avoid.
The last line is `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

PROMPT = "The quick brown fox jumps over the lazy dog while streaming tokens to everyone. " * 2
USAGE = re.compile(rb'"completion_tokens":(\d+)')


# ---------------------------------------------------------------- the limit server


def limit_server_main(data_dir: str) -> None:
    """A minimal SSE server: the same chunks as the gateway's, from memory, on the grid."""
    from aiohttp import web
    from tokenizers import Tokenizer

    from mell.gateway.api.chunks import DONE, CompletionFormat
    from mell.gateway.api.detokenizer import Detokenizer

    tokenizer = Tokenizer.from_file(str(Path(data_dir) / "models/mell-tiny/tokenizer.json"))
    ids = tokenizer.encode(PROMPT).ids
    detok = Detokenizer(tokenizer)
    pieces = [detok.step([ids[i % len(ids)]]) for i in range(4096)]

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        interval, n = 1.0 / float(request.query["rate"]), body["max_tokens"]
        fmt = CompletionFormat("cmpl-limit", "mell-tiny", int(time.time()), tokenizer)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(n):
            await _sleep_until_grid(interval)
            await response.write(
                fmt.delta_chunk(pieces[i], b"null", "length" if i == n - 1 else None)
            )
        await response.write(fmt.usage_chunk(len(ids), n) + DONE)
        await response.write_eof()
        return response

    async def serve() -> None:
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=2048)
        await site.start()
        print(json.dumps({"http": f"http://127.0.0.1:{runner.addresses[0][1]}"}), flush=True)
        await asyncio.Event().wait()

    uvloop.run(serve())


async def _sleep_until_grid(interval: float) -> None:
    target = math.floor(time.time() / interval + 1) * interval
    while (left := target - time.time()) > 0:  # event-loop timers may fire a little early
        await asyncio.sleep(left)


# ---------------------------------------------------------------- the client


@dataclass
class StreamResult:
    tokens: int = 0
    chunks: int = 0
    latencies: list[float] = field(default_factory=list)


class SSEClient(asyncio.Protocol):
    """One streaming request on its own connection; counts chunks, timestamps them, and keeps
    the largest gap between two chunks (from the second chunk on)."""

    def __init__(self, request: bytes, interval: float, done: asyncio.Future[StreamResult]):
        self.request, self.interval, self.done = request, interval, done
        self.result = StreamResult()
        self.tail = b""
        self.chunks = 0
        self.last_chunk_at: float | None = None
        self.max_gap = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        now = time.time()
        n = data.count(b'"text":')
        if n:
            if self.chunks and self.last_chunk_at is not None:
                self.max_gap = max(self.max_gap, now - self.last_chunk_at)
            self.last_chunk_at = now
            self.chunks += n
            lat = now - math.floor(now / self.interval) * self.interval
            self.result.latencies.extend([lat] * n)
        if b"[DONE]" in data or b"[DONE]" in self.tail + data[:16]:
            m = USAGE.search(self.tail + data)
            self.result.tokens = int(m.group(1)) if m else self.chunks
            self.result.chunks = self.chunks
            if not self.done.done():
                self.done.set_result(self.result)
            self.transport.close()
        self.tail = data[-64:]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(RuntimeError(f"stream ended early: {exc}"))


async def run_streams(
    url: str, streams: int, rate: float, tokens: int, model: str
) -> tuple[float, list[StreamResult]]:
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(
        {
            "model": model,
            "prompt": PROMPT,
            "max_tokens": tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
    ).encode()
    request = (
        # the limit server reads its pace from the query (the gateway refuses unknown fields)
        f"POST /v1/completions?rate={rate} HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
        f"application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in range(streams)]
    start = time.perf_counter()
    for future in futures:
        await loop.create_connection(
            lambda f=future: SSEClient(request, 1.0 / rate, f), host, int(port)
        )
    results = await asyncio.gather(*futures)
    return time.perf_counter() - start, results


async def big_prompt_phase(
    url: str, gateway_pid: int, streams: int, rate: float, megabytes: float
) -> dict[str, float | int]:
    """Largest chunk gap of `streams` running streams without, then with, one big prompt."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(
        {
            "model": "mell-tiny",
            "prompt": PROMPT,
            "max_tokens": 1500,
            "stream": True,
            "ignore_eos": True,
        }
    ).encode()
    request = _post(host, "/v1/completions", body)
    loop = asyncio.get_running_loop()
    clients: list[SSEClient] = []
    for _ in range(streams):
        _, client = await loop.create_connection(
            lambda: SSEClient(request, 1.0 / rate, loop.create_future()), host, int(port)
        )
        clients.append(client)
    # The big body is built before the windows: serializing 10 MB of JSON stalls this
    # process's own loop, which would show as a gap the gateway did not cause.
    text = (PROMPT * (int(megabytes * 1e6) // len(PROMPT) + 1))[: int(megabytes * 1e6)]
    big = _post(
        host,
        "/v1/completions",
        json.dumps({"model": "tiny-long", "prompt": text, "max_tokens": 1}).encode(),
    )
    del text
    await asyncio.sleep(3.0)  # every stream under way
    for c in clients:
        c.max_gap = 0.0
    lag_start = await asyncio.to_thread(_loop_lag_buckets, url)
    await asyncio.sleep(5.0)
    control = max(c.max_gap for c in clients)
    lag_mid = await asyncio.to_thread(_loop_lag_buckets, url)
    for c in clients:
        c.max_gap = 0.0
    rss_before = _rss(gateway_pid)
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(big)
    status = int((await reader.readline()).split()[1])
    await reader.read()
    answer_s = time.perf_counter() - start
    writer.close()
    rss_after = _rss(gateway_pid)
    await asyncio.sleep(1.0)
    with_big = max(c.max_gap for c in clients)
    lag_end = await asyncio.to_thread(_loop_lag_buckets, url)
    # The same streams while a busy process at the tokenizer's priority takes a core for as
    # long as the prompt took: what losing that core costs, with no prompt at all.
    for c in clients:
        c.max_gap = 0.0
    hog = subprocess.Popen([sys.executable, "-c", HOG, str(answer_s)])
    await asyncio.to_thread(hog.wait)
    with_hog = max(c.max_gap for c in clients)
    lag_hog = await asyncio.to_thread(_loop_lag_buckets, url)
    done = sum(c.done.done() for c in clients)
    for c in clients:
        c.done.cancel()  # ended by us: not an early end
        c.transport.close()
    if done:
        raise RuntimeError(f"{done} streams ended before the big prompt was answered")
    return {
        "prompt_mb": megabytes,
        "status": status,
        "answer_s": round(answer_s, 2),
        "max_gap_ms": round(with_big * 1e3, 1),
        "control_max_gap_ms": round(control * 1e3, 1),
        "rss_growth_mb": round((rss_after - rss_before) / 2**20, 1),
        "loop_lag_max_ms_at_most": _largest_new_lag_ms(lag_mid, lag_end),
        "control_loop_lag_max_ms_at_most": _largest_new_lag_ms(lag_start, lag_mid),
        "cpu_hog_max_gap_ms": round(with_hog * 1e3, 1),
        "cpu_hog_loop_lag_max_ms_at_most": _largest_new_lag_ms(lag_end, lag_hog),
    }


HOG = """import os, sys, time
os.nice(10)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    pass
"""


def _loop_lag_buckets(url: str) -> dict[float, float]:
    """The gateway's `mell:event_loop_lag_seconds` histogram: cumulative count per bucket."""
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    found = re.findall(r'mell:event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)', text)
    return {float(le): float(count) for le, count in found}


def _largest_new_lag_ms(before: dict[float, float], after: dict[float, float]) -> float | None:
    """The upper bound of the highest lag bucket that gained a sample between two scrapes
    (the loop's worst stall in that window lies at or below it); None if nothing was seen."""
    edges = sorted(after)
    prev = 0.0
    worst = None
    for le in edges:
        gained = (after[le] - before.get(le, 0.0)) - prev
        prev = after[le] - before.get(le, 0.0)
        if gained > 0:
            worst = le
    return None if worst is None else (round(worst * 1e3, 1) if math.isfinite(worst) else worst)


def _post(host: str, path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def summarize(elapsed: float, results: list[StreamResult], skip_first: bool) -> dict[str, float]:
    total = sum(r.tokens for r in results)
    lats = sorted(x for r in results for x in (r.latencies[1:] if skip_first else r.latencies))
    pct = (lambda q: lats[min(len(lats) - 1, int(q * len(lats)))] * 1e3) if lats else None
    chunks = sum(r.chunks for r in results)
    return {
        "tokens": total,
        "seconds": round(elapsed, 3),
        "tokens_per_s": round(total / elapsed),
        "chunks_per_s": round(chunks / elapsed),
        "p50_ms": round(pct(0.50), 3) if pct else None,
        "p99_ms": round(pct(0.99), 3) if pct else None,
    }


# ---------------------------------------------------------------- processes


def spawn(cmd: list[str], log: Path, read_line: bool) -> tuple[subprocess.Popen[bytes], dict]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(log, "wb"))  # noqa: SIM115
    if not read_line:
        return proc, {}
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    line = proc.stdout.readline() if ready else b""  # type: ignore[union-attr]
    if not line:
        raise RuntimeError(f"{cmd[2]} did not start; see {log}")
    return proc, json.loads(line)


def wait_healthy(url: str, timeout_s: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("gateway not healthy")


def start_all(work: Path, args: argparse.Namespace) -> tuple[list[subprocess.Popen], str, str]:
    from mell.common.tiny_model import ensure_tiny_model

    tiny = ensure_tiny_model(work / "models" / "mell-tiny")
    fast = work / "models" / "tiny-fast"
    shutil.copytree(tiny, fast, dirs_exist_ok=True)
    long = work / "models" / "tiny-long"  # a context a 10 MB prompt's size does not refuse
    shutil.copytree(tiny, long, dirs_exist_ok=True)
    config = json.loads((long / "config.json").read_text())
    (long / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1 << 19}))
    py = sys.executable
    limit, limit_addr = spawn([py, __file__, "--limit-server", str(work)], work / "limit.log", True)
    gw, gw_addr = spawn(
        [
            py,
            "-m",
            "mell.gateway.main",
            "--port",
            "0",
            "--worker-endpoint",
            "tcp://127.0.0.1:0",
            "--data-dir",
            str(work),
            "--model",
            "mell-tiny",
            "--model",
            str(fast),
            "--model",
            str(long),
            "--max-queued-requests",
            "100000",
        ],
        work / "gateway.log",
        True,
    )
    procs = [limit, gw]
    workers = (("w0", "mell-tiny", args.rate), ("w1", str(fast), args.fast_rate),
               ("w2", str(long), args.rate))  # fmt: skip
    for name, model, rate in workers:
        proc, _ = spawn(
            [
                py,
                "-m",
                "mell.workerd.main",
                "--gateway",
                gw_addr["workers"],
                "--model",
                model,
                "--worker-id",
                name,
                "--data-dir",
                str(work),
                "--fake-token-rate",
                str(rate),
                "--num-kv-blocks",
                "1000000",
            ],
            work / f"{name}.log",
            False,
        )
        procs.append(proc)
    wait_healthy(gw_addr["http"])
    return procs, limit_addr["http"], gw_addr["http"]


async def measure(args: argparse.Namespace, limit_url: str, gw_url: str, gateway_pid: int) -> dict:
    await run_streams(gw_url, 8, args.rate, 5, "mell-tiny")  # warm up both paths
    await run_streams(limit_url, 8, args.rate, 5, "mell-tiny")
    out: dict[str, dict] = {}
    if args.big_prompt_mb > 0:
        big = await big_prompt_phase(
            gw_url, gateway_pid, args.streams, args.rate, args.big_prompt_mb
        )
        print(f"big_prompt gateway streams={args.streams} {big}", flush=True)
        out["big_prompt"] = big
    if args.only_big_prompt:
        return out
    for phase, rate, tokens, model in (
        ("latency", args.rate, args.tokens, "mell-tiny"),
        ("throughput", args.fast_rate, args.fast_tokens, "tiny-fast"),
    ):
        for _ in range(args.repeat):  # alternate the two paths; keep each one's best round
            for path, url in (("limit", limit_url), ("gateway", gw_url)):
                elapsed, results = await run_streams(url, args.streams, rate, tokens, model)
                got = summarize(elapsed, results, skip_first=True)
                print(
                    f"{phase:10s} {path:8s} streams={args.streams} rate={rate:g}/s {got}",
                    flush=True,
                )
                key = f"{phase}_{path}"
                if key not in out or _better(phase, got, out[key]):
                    out[key] = got
    return out


def _better(phase: str, new: dict, old: dict) -> bool:
    if phase == "latency":
        return new["p99_ms"] < old["p99_ms"]
    return new["tokens_per_s"] > old["tokens_per_s"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--rate", type=float, default=20.0, help="tokens/s per stream (latency)")
    p.add_argument("--tokens", type=int, default=100, help="tokens per stream (latency)")
    p.add_argument("--fast-rate", type=float, default=1000.0, help="tokens/s per stream (tput)")
    p.add_argument("--fast-tokens", type=int, default=400, help="tokens per stream (tput)")
    p.add_argument("--repeat", type=int, default=2, help="rounds per phase (best is kept)")
    p.add_argument("--big-prompt-mb", type=float, default=10.0, help="0: no big-prompt phase")
    p.add_argument("--only-big-prompt", action="store_true", help="skip the other phases")
    p.add_argument("--limit-server", metavar="DATA_DIR", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.limit_server:
        limit_server_main(args.limit_server)
        return 0
    work = Path(tempfile.mkdtemp(prefix="mell-bench-gateway-"))
    procs: list[subprocess.Popen] = []
    try:
        procs, limit_url, gw_url = start_all(work, args)
        r = uvloop.run(measure(args, limit_url, gw_url, procs[1].pid))
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    big = r.get("big_prompt")
    big_met = big is None or (big["status"] == 400 and big["max_gap_ms"] < 100)
    if args.only_big_prompt:
        print("RESULT " + json.dumps({"streams": args.streams, "cpus": os.cpu_count(),
                                      "big_prompt": big, "target_met": big_met}))  # fmt: skip
        return 0
    ratio = r["throughput_gateway"]["tokens_per_s"] / r["throughput_limit"]["tokens_per_s"]
    added_p50 = r["latency_gateway"]["p50_ms"] - r["latency_limit"]["p50_ms"]
    added_p99 = r["latency_gateway"]["p99_ms"] - r["latency_limit"]["p99_ms"]
    result = {
        "streams": args.streams,
        "cpus": os.cpu_count(),
        "rate_per_stream": args.rate,
        "gateway_tokens_per_s": r["throughput_gateway"]["tokens_per_s"],
        "limit_tokens_per_s": r["throughput_limit"]["tokens_per_s"],
        "throughput_ratio": round(ratio, 3),
        "added_p50_ms": round(added_p50, 3),
        "added_p99_ms": round(added_p99, 3),
        "latency_gateway_ms": [r["latency_gateway"]["p50_ms"], r["latency_gateway"]["p99_ms"]],
        "latency_limit_ms": [r["latency_limit"]["p50_ms"], r["latency_limit"]["p99_ms"]],
        "paced_tokens_per_s": [
            r["latency_gateway"]["tokens_per_s"],
            r["latency_limit"]["tokens_per_s"],
        ],
        "big_prompt": big,
        "target_met": ratio >= 0.5 and added_p99 < 5.0 and big_met,
    }
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
