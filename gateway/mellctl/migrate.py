"""`mellctl migrate REQUEST_ID --to WORKER_ID [--kind kv|tokens|auto]`: move a running request.

A thin client of the admin API (`POST /admin/v1/requests/{id}/migrate`); it waits until the
migration committed or aborted and says which. Exit codes: 0 committed, 1 aborted or refused,
3 no gateway reachable.
"""

from __future__ import annotations

import argparse
import json
import urllib.parse

from mell.gateway.mellctl.client import add_target_args, connect


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("migrate", help="move a running request to another worker")
    p.add_argument("request_id", metavar="REQUEST_ID")
    p.add_argument("--to", required=True, metavar="WORKER_ID", help="destination worker")
    p.add_argument(
        "--kind",
        choices=("kv", "tokens", "auto"),
        default="auto",
        help="KV transfer, token transfer (re-prefill), or the adaptive choice (default)",
    )
    add_target_args(p)
    p.set_defaults(func=migrate)


def migrate(args: argparse.Namespace) -> int:
    query = urllib.parse.urlencode({"to": args.to, "kind": args.kind})
    rid = urllib.parse.quote(args.request_id, safe="")
    out = connect(args).post(f"/requests/{rid}/migrate?{query}")
    if args.json:
        print(json.dumps(out, indent=1))
    elif out["committed"]:
        print(f"{out['request_id']}: {out['src']} -> {out['dst']} ({out['kind']}) committed")
    else:
        print(f"{out['request_id']}: stays on {out['src']} ({out['kind']}): {out['reason']}")
    return 0 if out["committed"] else 1
