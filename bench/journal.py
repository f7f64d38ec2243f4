"""Journal append throughput with group commit, against the raw-file limit of the same run.

    python bench/journal.py [--records N] [--payload-bytes B] [--interval-s S] [--dir DIR]

Journal: `Journal.append` of N event-sized payloads under the "interval" policy (one fdatasync
per interval from the flusher thread), then `flush()`, so every record counted is durable. It
frames records in C when the optional extension `_frame` was built (printed as `framing`).
Limit: the very bytes the journal wrote (its framed records, read back from its segments) appended
one record at a time to a plain buffered file, with a thread doing flush + fdatasync on the same
interval, then a final flush + fdatasync. Both run in this process on the same filesystem,
alternating, best of `--repeat`. Also printed for context: the same bytes with one os.write per
record (a write-through log), and the latency of single append() calls.

The last line is `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgspec

from mell.gateway.journal import Journal, JournalConfig
from mell.gateway.journal.appender import PyAppender
from mell.gateway.journal.format import SEGMENT_HEADER, Frame, iter_frames, list_segments

TARGET = 0.5


def make_payloads(n: int, size: int, seed: int = 0) -> list[bytes]:
    """Event-envelope-like MessagePack payloads of about `size` bytes each."""
    rng = random.Random(seed)
    kinds = ["RequestPlaced", "RequestAdmitted", "LoadReported", "RequestFinished"]
    out = []
    for i in range(n):
        body = {
            "source": f"worker-{rng.randrange(8)}",
            "seq": i,
            "ts": 1.7e9 + i * 1e-4,
            "type": kinds[i % 4],
            "request_id": f"req-{rng.getrandbits(48):012x}",
        }
        raw = msgspec.msgpack.encode(body)
        pad = max(0, size - len(raw) - 8)
        body["pad"] = rng.randbytes(pad)
        out.append(msgspec.msgpack.encode(body))
    return out


def run_journal(directory: Path, payloads: list[bytes], interval: float) -> tuple[float, int]:
    shutil.rmtree(directory, ignore_errors=True)
    journal = Journal.open(directory, JournalConfig(fsync="interval", fsync_interval_s=interval))
    append = journal.append
    start = time.perf_counter()
    for p in payloads:
        append(p)
    durable = journal.flush()
    elapsed = time.perf_counter() - start
    journal.close()
    assert durable == len(payloads), (durable, len(payloads))
    return elapsed, durable


def journal_frames(directory: Path) -> list[bytes]:
    """The framed records exactly as the journal wrote them."""
    frames = []
    for path in list_segments(directory):
        data = path.read_bytes()
        for item in iter_frames(data, SEGMENT_HEADER.size):
            assert isinstance(item, Frame)
            frames.append(data[item.offset : item.end])
    return frames


class _Syncer:
    """Flush + fdatasync a file every `interval` from a thread (the same policy)."""

    def __init__(self, f, interval: float) -> None:
        self.f, self.interval = f, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            self.f.flush()
            os.fdatasync(self.f.fileno())

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def run_buffered_file(path: Path, frames: list[bytes], interval: float) -> float:
    path.unlink(missing_ok=True)
    with path.open("ab", buffering=1 << 20) as f:
        syncer = _Syncer(f, interval)
        write = f.write
        start = time.perf_counter()
        for fr in frames:
            write(fr)
        f.flush()
        os.fdatasync(f.fileno())
        elapsed = time.perf_counter() - start
        syncer.close()
    return elapsed


def run_write_through(path: Path, frames: list[bytes], interval: float) -> float:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    stop = threading.Event()

    def sync() -> None:
        while not stop.wait(interval):
            os.fdatasync(fd)

    thread = threading.Thread(target=sync, daemon=True)
    thread.start()
    write = os.write
    start = time.perf_counter()
    for fr in frames:
        write(fd, fr)
    os.fdatasync(fd)
    elapsed = time.perf_counter() - start
    stop.set()
    thread.join()
    os.close(fd)
    return elapsed


def run_journal_always(directory: Path, payloads: list[bytes]) -> float:
    shutil.rmtree(directory, ignore_errors=True)
    journal = Journal.open(directory, JournalConfig(fsync="always"))
    start = time.perf_counter()
    for p in payloads:
        journal.append(p)
    elapsed = time.perf_counter() - start
    journal.close()
    return elapsed


def run_file_always(path: Path, frames: list[bytes]) -> float:
    """One write + fdatasync per record: the limit under the "always" policy."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    start = time.perf_counter()
    for fr in frames:
        os.write(fd, fr)
        os.fdatasync(fd)
    elapsed = time.perf_counter() - start
    os.close(fd)
    return elapsed


def append_latency_us(directory: Path, payloads: list[bytes], interval: float) -> dict:
    """Per-call append() latency, with the flusher fsyncing concurrently."""
    shutil.rmtree(directory, ignore_errors=True)
    journal = Journal.open(directory, JournalConfig(fsync="interval", fsync_interval_s=interval))
    clock = time.perf_counter_ns
    samples = []
    for p in payloads:
        t0 = clock()
        journal.append(p)
        samples.append(clock() - t0)
    journal.close()
    samples.sort()

    def q(x: float) -> float:
        return round(samples[min(len(samples) - 1, int(x * len(samples)))] / 1000, 2)

    return {"p50": q(0.5), "p99": q(0.99), "p999": q(0.999), "max": round(samples[-1] / 1000, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=500_000)
    ap.add_argument("--payload-bytes", type=int, default=120)
    ap.add_argument("--interval-s", type=float, default=0.02)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--always-records", type=int, default=2000, help="for the fsync=always rows")
    ap.add_argument("--dir", type=Path, default=None, help="scratch directory (default: tmp)")
    args = ap.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="mell-bench-journal-", dir=args.dir))
    try:
        payloads = make_payloads(args.records, args.payload_bytes)
        jdir, raw = scratch / "journal", scratch / "plain.bin"
        journal_s, buffered_s, through_s = [], [], []
        frames: list[bytes] = []
        for _ in range(args.repeat):
            elapsed, _ = run_journal(jdir, payloads, args.interval_s)
            journal_s.append(elapsed)
            frames = frames or journal_frames(jdir)
            buffered_s.append(run_buffered_file(raw, frames, args.interval_s))
            through_s.append(run_write_through(raw, frames, args.interval_s))
        latency = append_latency_us(jdir, payloads[:200_000], args.interval_s)
        few = args.always_records
        always_j = min(run_journal_always(jdir, payloads[:few]) for _ in range(args.repeat))
        always_f = min(run_file_always(raw, frames[:few]) for _ in range(args.repeat))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    n = args.records
    ours = n / min(journal_s)
    limit = n / min(buffered_s)
    through = n / min(through_s)
    frame_bytes = statistics.mean(len(f) for f in frames)
    print(f"records           {n} x {args.payload_bytes} B payload ({frame_bytes:.0f} B framed)")
    interval_ms = args.interval_s * 1000
    print(f"fsync policy      interval {interval_ms:.0f} ms, fdatasync, best of {args.repeat}")
    framing = "python" if Journal.append is PyAppender.append else "c"
    print(f"framing           {framing} (the C extension _frame, else its pure-Python twin)")
    print(f"journal           {ours:12,.0f} events/s durable")
    print(f"limit (buffered)  {limit:12,.0f} events/s  same bytes, plain file, same fsync policy")
    print(f"write-through     {through:12,.0f} events/s  same bytes, one os.write per record")
    print(f"ratio             {ours / limit:.1%} of the limit (target >= {TARGET:.0%})")
    always_ours, always_limit = few / always_j, few / always_f
    print(
        f"fsync=always      {always_ours:12,.0f} events/s journal, {always_limit:,.0f} plain file "
        f"(write + fdatasync per record): {always_ours / always_limit:.1%}"
    )
    print(
        f"append() latency  p50 {latency['p50']} us, p99 {latency['p99']} us, "
        f"p99.9 {latency['p999']} us, max {latency['max']} us"
    )
    result = {
        "bench": "journal",
        "records": n,
        "payload_bytes": args.payload_bytes,
        "frame_bytes": round(frame_bytes, 1),
        "fsync_interval_s": args.interval_s,
        "events_per_s": round(ours),
        "limit_events_per_s": round(limit),
        "ratio": round(ours / limit, 3),
        "target": TARGET,
        "write_through_events_per_s": round(through),
        "always_events_per_s": round(always_ours),
        "always_limit_events_per_s": round(always_limit),
        "always_ratio": round(always_ours / always_limit, 3),
        "append_latency_us": latency,
        "framing": framing,
        "python": sys.version.split()[0],
    }
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
