"""`mellctl journal check DIR` and `mellctl journal repair DIR`: offline journal tools.

Exit codes: 0 the journal replays cleanly (a torn tail, which start-up truncates, is a warning),
1 it does not (or repair could not make it so), with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from mell.common.errors import JournalError
from mell.gateway.journal import CheckReport, RepairReport, check, repair


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("journal", help="check or repair a journal directory")
    actions = parser.add_subparsers(dest="journal_command", metavar="ACTION", required=True)
    for name, func, text in (
        ("check", _check, "read every record and report damage (writes nothing)"),
        ("repair", _repair, "remove damaged bytes, keep every intact record, back up originals"),
    ):
        sub = actions.add_parser(name, help=text, description=text)
        sub.add_argument("directory", type=Path, metavar="DIR", help="journal directory")
        sub.add_argument("--json", action="store_true", help="print the report as JSON")
        sub.set_defaults(func=func)


def _existing(directory: Path) -> Path:
    if not directory.is_dir():
        raise JournalError(f"journal directory {directory} does not exist")
    return directory


def _check(args: argparse.Namespace) -> int:
    report = check(_existing(args.directory))
    if args.json:
        print(json.dumps(check_json(report)))
    else:
        _print_check(report)
    return _verdict(report, "run `mellctl journal repair` on it")


def _repair(args: argparse.Namespace) -> int:
    report = repair(_existing(args.directory))
    after = report.after
    assert after is not None
    if args.json:
        out = dataclasses.asdict(report)
        out["after"] = check_json(after)
        out["changed"] = report.changed
        print(json.dumps(out))
    else:
        _print_repair(report)
    return _verdict(after, "repair could not fix it; the originals are in damaged/")


def _verdict(report: CheckReport, advice: str) -> int:
    if report.ok:
        return 0
    errors = [p for p in report.problems if p.severity == "error"]
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    print(
        f"mellctl: error: journal {report.directory} is corrupt: {errors[0].line()}{more}; "
        f"{advice}",
        file=sys.stderr,
    )
    return 1


def check_json(report: CheckReport) -> dict:
    out = dataclasses.asdict(report)
    out["ok"] = report.ok
    return out


def _summary(report: CheckReport) -> str:
    seqs = f"seq {report.first_seq}..{report.last_seq}" if report.records else "no records"
    snap = f", last snapshot {report.last_snapshot_seq}" if report.last_snapshot_seq else ""
    return (
        f"journal {report.directory}: {report.segments} segments, {report.records} records "
        f"({report.events} events, {report.snapshots} snapshots), {seqs}{snap}, "
        f"{report.bytes / 2**20:.1f} MiB"
    )


def _print_check(report: CheckReport) -> None:
    print(_summary(report))
    for problem in report.problems:
        print(f"  {problem.severity}: {problem.line()}")
    print("ok" if report.ok else "CORRUPT")


def _print_repair(report: RepairReport) -> None:
    if not report.changed:
        print(f"journal {report.directory}: nothing to repair")
    for removed in report.removed:
        print(
            f"  removed {removed.length} bytes from {removed.segment} at offset "
            f"{removed.offset}: {removed.reason}"
        )
    for first, last in report.lost:
        print(f"  records {first}..{last} marked lost")
    for segment, offset, seq in report.dropped_records:
        print(f"  dropped out-of-order record seq {seq} from {segment} at offset {offset}")
    for name in report.moved:
        print(f"  moved {name} (nothing intact in it) to damaged/")
    for path in report.backups:
        print(f"  original kept in {path}")
    if report.after is not None:
        print(_summary(report.after))
        print("ok" if report.after.ok else "CORRUPT")
