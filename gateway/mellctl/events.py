"""`mellctl events`: the cluster's events, from the gateway or from a journal directory.

    mellctl events [--tail N] [--follow] [--request ID] [--worker ID] [--json]   (admin API)
    mellctl events --journal DIR [--tail N] [--request ID] [--worker ID] [--json] (offline)

One line per event: time, source#seq, event type, then its fields; `--request` / `--worker`
keep the events about one request or one worker; `--json` prints one JSON object per line.
Without --journal it asks the running gateway's admin API for its recent events (the last 100 by
default) and with --follow keeps printing new ones until interrupted. With --journal it reads
the whole audit trail offline; reading a running gateway's journal is safe (readers take no
lock; a record being written shows up as a torn tail and is skipped with a warning).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import deque
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mell.common.errors import JournalError
from mell.common.events import EventEnvelope
from mell.gateway.admin.event_feed import event_fields, matches
from mell.gateway.journal.codec import decode
from mell.gateway.journal.format import Record
from mell.gateway.journal.reader import read_records
from mell.gateway.mellctl.client import add_target_args, connect

_WIDTH = 100
_API_TAIL = 100


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "events",
        help="show cluster events (from the gateway, or a journal directory)",
        description="Show cluster events, oldest first: the running gateway's recent ones, or "
        "those recorded in a journal directory (--journal).",
    )
    p.add_argument(
        "--journal",
        type=Path,
        metavar="DIR",
        help="journal directory to read offline (e.g. /var/lib/mell/journal)",
    )
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    p.add_argument("--request", metavar="ID", help="only events about this request")
    p.add_argument("--worker", metavar="ID", help="only events about this worker")
    p.add_argument("--tail", type=int, metavar="N", help="only the last N matching events")
    add_target_args(p, json_output=False)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.journal is None:
        return _from_gateway(args)
    if args.follow:
        print("mellctl: error: --follow reads the gateway, not a journal", file=sys.stderr)
        return 2
    if not args.journal.is_dir():
        raise JournalError(f"journal directory {args.journal} does not exist")
    rows: Iterator[tuple[Record, EventEnvelope | None]] = _rows(args.journal)
    rows = (r for r in rows if _matches(r[1], args.request, args.worker))
    if args.tail is not None:
        rows = iter(deque(rows, maxlen=max(args.tail, 0)))
    out = sys.stdout
    for record, envelope in rows:
        out.write(json.dumps(_as_json(record, envelope)) if args.json else _line(record, envelope))
        out.write("\n")
    return 0


def _from_gateway(args: argparse.Namespace) -> int:
    client = connect(args)
    tail = args.tail if args.tail is not None else _API_TAIL
    query = {"tail": tail, "request": args.request, "worker": args.worker}
    if args.follow:
        query["follow"] = 1
    out = sys.stdout
    for event in client.lines("/events", timeout_s=60.0 if args.follow else None, **query):
        if "error" in event:
            print(f"mellctl: error: {event['error']}", file=sys.stderr)
            return 1
        out.write(json.dumps(event) if args.json else format_event(dict(event)))
        out.write("\n")
        out.flush()
    return 0


def format_event(event: dict[str, Any]) -> str:
    """One event as the admin API gives it ({type, source, source_seq, ts, fields...})."""
    kind, source, seq, ts = (event.pop(k) for k in ("type", "source", "source_seq", "ts"))
    head = f"{_time(ts)}  {source}#{seq}  {kind}"
    return _wrap(head, [f"{k}={_short(v)}" for k, v in event.items()])


def _rows(directory: Path) -> Iterator[tuple[Record, EventEnvelope | None]]:
    for record in read_records(directory, include_lost=True):
        yield record, decode(record) if record.kind == "event" else None


def _matches(envelope: EventEnvelope | None, request: str | None, worker: str | None) -> bool:
    if request is None and worker is None:
        return True
    # snapshots and lost markers are about no one in particular
    return envelope is not None and matches(envelope.event, request, worker)


def _fields(envelope: EventEnvelope) -> dict[str, Any]:
    return event_fields(envelope.event)


def _as_json(record: Record, envelope: EventEnvelope | None) -> dict[str, Any]:
    out: dict[str, Any] = {"journal_seq": record.seq, "kind": record.kind}
    if envelope is not None:
        fields = _fields(envelope)
        out |= {
            "type": fields.pop("type"),
            "source": envelope.source,
            "source_seq": envelope.seq,
            "ts": envelope.ts,
            **fields,
        }
    elif record.kind == "lost":
        out["lost"] = list(record.lost_range())
    else:
        out |= {"ts": record.timestamp, "bytes": len(record.payload)}
    return out


def _time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _line(record: Record, envelope: EventEnvelope | None) -> str:
    if envelope is None:
        if record.kind == "lost":
            first, last = record.lost_range()
            return f"{_time(record.timestamp)}  -- records {first}..{last} lost (repaired) --"
        return f"{_time(record.timestamp)}  -- snapshot #{record.seq} ({len(record.payload)} B) --"
    fields = _fields(envelope)
    kind = fields.pop("type")
    head = f"{_time(envelope.ts)}  {envelope.source}#{envelope.seq}  {kind}"
    parts = [f"{k}={_short(v)}" for k, v in fields.items()]
    return _wrap(head, parts)


def _short(value: Any) -> str:
    if isinstance(value, list):
        return f"[{len(value)}]"
    return str(value)


def _wrap(head: str, parts: list[str]) -> str:
    """head then fields, continuing on indented lines so that no line passes 100 columns."""
    lines, line = [], head
    for part in parts:
        if len(line) + 1 + len(part) > _WIDTH and line.strip():
            lines.append(line)
            line = "    " + part
        else:
            line += " " + part
    lines.append(line)
    return "\n".join(lines)
