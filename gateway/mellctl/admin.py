"""`mellctl status|workers|requests|drain|undrain|sleep|wake`: thin clients of the gateway's
admin API.

    mellctl status   [--json]               per worker: model, state, KV usage, requests; per
                                            model and cluster totals; releasable and sleeping
                                            workers, and the KV bytes the sleeping gave back
    mellctl workers  [--json]
    mellctl requests [--worker ID] [--json]
    mellctl drain WORKER      stop placing requests on it; it finishes what it runs
    mellctl undrain WORKER    place requests on it again
    mellctl sleep WORKER      an idle worker gives its KV memory back (a request wakes it)
    mellctl wake WORKER       it takes its KV memory again

Every command takes --url/--token/--data-dir (see `client`). Exit codes: 0 ok, 1 the gateway
answered with an error, 2 usage, 3 no gateway reachable.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from mell.gateway.mellctl.client import add_target_args, connect
from mell.gateway.mellctl.table import percent, table, wrap_words


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("status", help="cluster status: workers, KV usage, releasable")
    add_target_args(p)
    p.set_defaults(func=status)
    p = subparsers.add_parser("workers", help="list the workers")
    add_target_args(p)
    p.set_defaults(func=workers)
    p = subparsers.add_parser("requests", help="list the requests in flight")
    p.add_argument("--worker", metavar="ID", help="only the requests on this worker")
    add_target_args(p)
    p.set_defaults(func=requests)
    for action, text in (("drain", "stop placing requests on a worker"),
                         ("undrain", "place requests on a drained worker again"),
                         ("sleep", "an idle worker gives its KV memory back"),
                         ("wake", "a sleeping worker takes its KV memory again")):  # fmt: skip
        p = subparsers.add_parser(action, help=text)
        p.add_argument("worker", metavar="WORKER", help="worker id")
        add_target_args(p, json_output=False)
        p.set_defaults(func=_worker_action, action=action)


def status(args: argparse.Namespace) -> int:
    body = connect(args).get("/status")
    if args.json:
        print(json.dumps(body, indent=1))
        return 0
    print(render_status(body))
    return 0


def workers(args: argparse.Namespace) -> int:
    body = connect(args).get("/workers")
    print(json.dumps(body, indent=1) if args.json else render_workers(body["workers"]))
    return 0


def requests(args: argparse.Namespace) -> int:
    body = connect(args).get("/requests", worker=args.worker)
    print(json.dumps(body, indent=1) if args.json else render_requests(body["requests"]))
    return 0


def _worker_action(args: argparse.Namespace) -> int:
    row = connect(args).post(f"/workers/{args.worker}/{args.action}")
    note = f", asleep: {mib(row['kv_bytes_released'])} given back" if row["sleeping"] else ""
    print(f"{row['worker_id']}: {row['state']} ({row['num_requests']} requests{note})")
    return 0


# ---------------------------------------------------------------- rendering


def render_workers(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no workers"
    return table(
        ["WORKER", "MODEL", "STATE", "KV USED", "KV%", "KV MEM", "RUN", "WAIT", "REQS", "NOTE"],
        [
            [
                w["worker_id"],
                w["model"],
                w["state"],
                f"{w['used_blocks']}/{w['capacity_blocks']}",
                percent(w["kv_usage"]),
                mib(w.get("kv_pool_mapped_bytes", 0)),
                w["num_running"],
                w["num_waiting"],
                w["num_requests"],
                _note(w),
            ]
            for w in rows
        ],
        right="KV USED KV% RUN WAIT REQS",
    )


def _note(w: dict[str, Any]) -> str:
    if w["state"] == "lost":
        return f"lost: {w['lost_reason']}"
    if w["sleeping"]:
        return f"sleeping ({mib(w['kv_bytes_released'])} given back)"
    if w["releasable"]:
        return "releasable"
    return "drained" if w["drained"] else ""


def render_status(body: dict[str, Any]) -> str:
    t = body["totals"]
    models = table(
        ["MODEL", "WORKERS", "ACTIVE", "RELEASABLE", "KV USED", "KV%", "REQUESTS"],
        [
            [
                m["model"],
                m["workers"],
                m["active"],
                m["releasable"],
                f"{m['used_blocks']}/{m['capacity_blocks']}",
                percent(m["kv_usage"]),
                m["num_requests"],
            ]
            for m in body["models"]
        ],
        right="WORKERS ACTIVE RELEASABLE KV USED KV% REQUESTS",
    )
    migrations = " ".join(f"{k}={v}" for k, v in sorted(t["migrations"].items()))
    cluster = wrap_words(
        [
            f"cluster: {t['workers']} workers ({t['active']} active, {t['lost']} lost),",
            f"KV {t['used_blocks']}/{t['capacity_blocks']} blocks ({percent(t['kv_usage'])}),",
            f"{t['requests']} requests in flight, {t['finished']} finished,",
            f"{t['aborted']} aborted, migrations {migrations}",
        ]
    )
    releasable = ", ".join(body["releasable"]) or "none"
    sleeping = ", ".join(body["sleeping"]) or "none"
    given_back = (
        f" ({mib(t['kv_bytes_released'])} of KV memory given back)" if t["sleeping"] else ""
    )
    return "\n\n".join(
        [
            render_workers(body["workers"]),
            models,
            cluster
            + "\n"
            + wrap_words([f"releasable workers: {releasable}"])
            + "\n"
            + wrap_words([f"sleeping workers: {sleeping}{given_back}"]),
        ]
    )


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def render_requests(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no requests in flight"
    now = time.time()
    return table(
        ["REQUEST", "MODEL", "WORKER", "STATE", "BLOCKS", "TOKENS", "MAX", "AGE", "CLIENT"],
        [
            [
                r["request_id"],
                r["model"],
                r["worker_id"],
                r["state"],
                r["num_blocks"],
                r["num_tokens"],
                r["max_tokens"],
                f"{max(0.0, now - r['placed_at']):.1f}s",
                "yes" if r["streaming"] else "gone",
            ]
            for r in rows
        ],
        right="BLOCKS TOKENS MAX AGE",
    )
