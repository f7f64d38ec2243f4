"""`check` and `repair` of a journal directory.

`check` reads every segment, past damage too (it looks for the next intact record after each
damaged region), and reports every problem with its segment and offset. It never writes.

`repair` keeps every intact record. For each segment it has to change it first copies the
original into `damaged/` inside the journal directory, then rewrites the segment with: the
intact records in order, minus the damaged byte ranges, plus a "lost" marker record wherever
sequence numbers are missing, so that replay knows the gap is known and accepted. A segment left
with no record is moved to `damaged/` whole. The report lists exactly what was removed. Repair
takes the writer lock, so it refuses to run while a gateway has the journal open.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mell.gateway.journal.directory import fsync_directory, lock_directory
from mell.gateway.journal.format import (
    SEGMENT_HEADER,
    Frame,
    Kind,
    check_segment_header,
    decode_lost,
    encode_lost,
    encode_record,
    list_segments,
    parse_frame,
    resync,
    segment_first_seq,
    segment_header,
    segment_name,
)
from mell.gateway.journal.reader import _read

LostMarker = tuple[str, int, int]  # ("lost", first, last): a lost marker record to write
DAMAGED_DIR = "damaged"
Severity = Literal["error", "warning", "info"]


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding of `check`: where, how bad, what."""

    segment: str
    offset: int
    length: int  # damaged bytes from offset (0 for sequence findings)
    severity: Severity  # error: start-up fails; warning: start-up fixes it; info: fine
    kind: str  # torn-tail | corrupt | bad-header | missing | out-of-order | lost
    reason: str
    seqs: tuple[int, int] | None = None  # sequence numbers concerned, when known

    def line(self) -> str:
        where = f"{self.segment} @{self.offset}"
        span = f" ({self.length} bytes)" if self.length else ""
        seqs = f" [seq {self.seqs[0]}..{self.seqs[1]}]" if self.seqs else ""
        return f"{where}{span}: {self.kind}: {self.reason}{seqs}"


@dataclass(slots=True)
class CheckReport:
    directory: str
    segments: int = 0
    records: int = 0
    events: int = 0
    snapshots: int = 0
    bytes: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    last_snapshot_seq: int | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No error: start-up replay will succeed (a torn tail it truncates is a warning)."""
        return not any(p.severity == "error" for p in self.problems)


@dataclass(frozen=True, slots=True)
class Removed:
    """Bytes that repair took out of a segment (a copy stays in `backup`)."""

    segment: str
    offset: int
    length: int
    reason: str


@dataclass(slots=True)
class RepairReport:
    directory: str
    removed: list[Removed] = field(default_factory=list)
    lost: list[tuple[int, int]] = field(default_factory=list)  # seq ranges marked lost
    dropped_records: list[tuple[str, int, int]] = field(default_factory=list)  # (seg, off, seq)
    rewritten: list[str] = field(default_factory=list)  # segment names written anew
    moved: list[str] = field(default_factory=list)  # segments moved whole to damaged/
    backups: list[str] = field(default_factory=list)  # paths of the copies of the originals
    after: CheckReport | None = None  # check() of the repaired journal

    @property
    def changed(self) -> bool:
        return bool(self.rewritten or self.moved)


@dataclass(slots=True)
class _Segment:
    """One segment read with resync: its intact frames and damaged byte ranges."""

    path: Path
    size: int
    frames: list[Frame]
    regions: list[tuple[int, int, str]]  # (start, end, reason)
    header_bad: str | None


def _scan(path: Path) -> _Segment:
    data = _read(path)
    frames: list[Frame] = []
    regions: list[tuple[int, int, str]] = []
    header_bad = check_segment_header(data, path.name)
    offset = SEGMENT_HEADER.size
    if header_bad is not None:
        found = resync(data, -1)
        end = found.offset if found is not None else len(data)
        regions.append((0, end, header_bad))
        offset = end
    while offset < len(data):
        item = parse_frame(data, offset)
        if isinstance(item, Frame):
            frames.append(item)
            offset = item.end
            continue
        found = resync(data, offset)
        end = found.offset if found is not None else len(data)
        regions.append((offset, end, item.reason))
        offset = end
    return _Segment(path, len(data), frames, regions, header_bad)


def _scan_all(directory: Path) -> list[_Segment]:
    return [_scan(p) for p in list_segments(directory)]


def _damage_problems(seg: _Segment, *, last: bool) -> list[Problem]:
    out = []
    for start, end, reason in seg.regions:
        tail = last and end == seg.size and not any(f.offset > start for f in seg.frames)
        if tail:
            out.append(Problem(seg.path.name, start, end - start, "warning", "torn-tail", reason))
        elif start == 0 and seg.header_bad is not None:
            out.append(Problem(seg.path.name, 0, end, "error", "bad-header", reason))
        else:
            out.append(Problem(seg.path.name, start, end - start, "error", "corrupt", reason))
    return out


def _walk(segments: list[_Segment], report: CheckReport) -> list[list[Frame | LostMarker]]:
    """Check sequence order across all segments into `report`; returns the repair plan per
    segment: Frames to keep and ("lost", first, last) markers to insert before them."""
    plans: list[list[Frame | LostMarker]] = []
    expected: int | None = None
    for seg in segments:
        plan: list[Frame | LostMarker] = []
        if expected is None:
            expected = segment_first_seq(seg.path.name) or 0
        for frame in seg.frames:
            name, offset = seg.path.name, frame.offset
            if frame.seq < expected:
                reason = f"sequence {frame.seq} after {expected - 1}"
                report.problems.append(
                    Problem(name, offset, frame.end - offset, "error", "out-of-order", reason,
                            (frame.seq, frame.seq))
                )  # fmt: skip
                continue
            if frame.seq > expected:
                reason = f"records {expected}..{frame.seq - 1} are missing before this one"
                report.problems.append(
                    Problem(name, offset, 0, "error", "missing", reason, (expected, frame.seq - 1))
                )
                plan.append(("lost", expected, frame.seq - 1))
            plan.append(frame)
            expected = frame.seq + 1
            if frame.kind == Kind.LOST:
                first, last = decode_lost(frame.payload)
                reason = "records lost and accepted by an earlier repair"
                report.problems.append(
                    Problem(name, offset, 0, "info", "lost", reason, (first, last))
                )
                expected = last + 1
            _count(report, frame)
        plans.append(plan)
    return plans


def _count(report: CheckReport, frame: Frame) -> None:
    report.records += 1
    if report.first_seq is None:
        report.first_seq = frame.seq
    report.last_seq = frame.seq
    if frame.kind == Kind.EVENT:
        report.events += 1
    elif frame.kind == Kind.SNAPSHOT:
        report.snapshots += 1
        report.last_snapshot_seq = frame.seq


def check(directory: Path | str) -> CheckReport:
    """Read the whole journal and report every problem; writes nothing."""
    directory = Path(directory)
    report = CheckReport(str(directory))
    segments = _scan_all(directory)
    report.segments = len(segments)
    report.bytes = sum(s.size for s in segments)
    for i, seg in enumerate(segments):
        report.problems.extend(_damage_problems(seg, last=i == len(segments) - 1))
    _walk(segments, report)
    report.problems.sort(key=lambda p: (p.segment, p.offset))
    return report


def repair(directory: Path | str) -> RepairReport:
    """Remove only what is damaged, keep every intact record, back up what it changes."""
    directory = Path(directory)
    lock_fd = lock_directory(directory)
    try:
        return _repair(directory)
    finally:
        os.close(lock_fd)


def _repair(directory: Path) -> RepairReport:
    report = RepairReport(str(directory))
    segments = _scan_all(directory)
    checked = CheckReport(str(directory))
    plans = _walk(segments, checked)
    for problem in checked.problems:
        if problem.kind == "out-of-order":
            report.dropped_records.append(
                (problem.segment, problem.offset, problem.seqs[0] if problem.seqs else -1)
            )
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    backup_dir = directory / DAMAGED_DIR
    for seg, plan in zip(segments, plans, strict=True):
        kept = [item for item in plan if isinstance(item, Frame)]
        dropped = len(kept) != len(seg.frames)
        markers = [item for item in plan if not isinstance(item, Frame)]
        if not seg.regions and not dropped and not markers:
            continue
        backup_dir.mkdir(exist_ok=True)
        backup = backup_dir / f"{seg.path.name}.{stamp}"
        shutil.copy2(seg.path, backup)
        report.backups.append(str(backup))
        for start, end, reason in seg.regions:
            report.removed.append(Removed(seg.path.name, start, end - start, reason))
        report.lost.extend((m[1], m[2]) for m in markers)
        if not plan:
            seg.path.unlink()
            report.moved.append(seg.path.name)
            continue
        first = plan[0]
        first_seq = first.seq if isinstance(first, Frame) else first[1]
        name = segment_name(first_seq)
        _write_segment(directory / name, first_seq, plan)
        if name != seg.path.name:
            seg.path.unlink()
        report.rewritten.append(name)
    if report.changed:
        fsync_directory(directory)
    report.after = check(directory)
    return report


def _write_segment(path: Path, first_seq: int, plan: list[Frame | LostMarker]) -> None:
    parts = [segment_header(first_seq)]
    now = time.time()
    for item in plan:
        if isinstance(item, Frame):
            parts.append(encode_record(item.kind, item.seq, item.timestamp, item.payload))
        else:
            parts.append(encode_lost(item[1], item[2], now))
    tmp = path.with_name(path.name + ".repair-tmp")
    with tmp.open("wb") as f:
        f.write(b"".join(parts))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
