"""The admin API: its own listener (loopback by default), every route behind a bearer token.

    GET  /admin/v1/status                      cluster status: models, workers, totals, releasable
    GET  /admin/v1/workers                     every worker the view knows
    GET  /admin/v1/workers/{id}                one worker, with its requests
    GET  /admin/v1/requests[?worker=ID]        requests in flight
    GET  /admin/v1/events[?tail=N&request=ID&worker=ID&follow=1]
                                               recent events as JSON lines; with follow=1 the
                                               stream stays open and new events follow
    POST /admin/v1/workers/{id}/drain          stop placing on it; it finishes what it runs
    POST /admin/v1/workers/{id}/undrain        place on it again
    POST /admin/v1/workers/{id}/sleep          an idle worker gives its KV memory back (409
                                               while it holds requests); a request wakes it
    POST /admin/v1/workers/{id}/wake           it takes its KV memory again
    POST /admin/v1/requests/{id}/migrate       {"to": WORKER, "kind": "kv"|"tokens"|"auto"}
                                               (or ?to=WORKER&kind=KIND):
                                               move a running request; answers when it
                                               committed or aborted

Reads come from the cluster view (the fold of the journal's events); drain, undrain, sleep and
wake go through the worker link (drain and undrain record events; a worker's sleep is in its
load report, journaled as `LoadReported`). Errors are `{"error": {"message", "type", "code"}}`.
The token lives in DATA_DIR/admin.token (0600, created at first start: `admin.token`).
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

from mell.common.errors import InvalidRequest, MellError, NotFound, Unauthorized
from mell.common.events import EventEnvelope
from mell.gateway.admin.event_feed import Subscription, event_json, matches
from mell.gateway.api.error_body import error_response, errors_middleware
from mell.gateway.cluster.migrator import move_kind
from mell.gateway.cluster.view import RequestRow, WorkerRow
from mell.gateway.context import CONTEXT, GatewayContext
from mell.gateway.policy.base import Move, WorkerStatus
from mell.transport.channel import PeerUnreachable
from mell.transport.rpc import CallTimeout

PREFIX = "/admin/v1"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_KEEPALIVE_S = 15.0
_DEFAULT_TAIL = 100
_MAX_TAIL = 1_000_000  # more than the feed holds in memory


def build_admin_app(ctx: GatewayContext, token: str) -> web.Application:
    app = web.Application(middlewares=[errors_middleware, token_middleware(token)])
    app[CONTEXT] = ctx
    app.on_shutdown.append(_end_followers)
    app.add_routes(
        [
            web.get(f"{PREFIX}/status", status),
            web.get(f"{PREFIX}/workers", workers),
            web.get(f"{PREFIX}/workers/{{worker_id}}", worker),
            web.get(f"{PREFIX}/requests", requests),
            web.get(f"{PREFIX}/events", events),
            web.post(f"{PREFIX}/workers/{{worker_id}}/drain", drain),
            web.post(f"{PREFIX}/workers/{{worker_id}}/undrain", undrain),
            web.post(f"{PREFIX}/workers/{{worker_id}}/sleep", sleep),
            web.post(f"{PREFIX}/workers/{{worker_id}}/wake", wake),
            web.post(f"{PREFIX}/requests/{{request_id}}/migrate", migrate),
        ]
    )
    return app


async def _end_followers(app: web.Application) -> None:
    app[CONTEXT].feed.close()


def token_middleware(token: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    expected = token.encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("Authorization", "")
        if not given.startswith("Bearer ") or not hmac.compare_digest(
            given.removeprefix("Bearer ").encode("utf-8", "surrogateescape"), expected
        ):
            return error_response(Unauthorized("missing or invalid admin token"))
        return await handler(request)

    return check


# ---------------------------------------------------------------- reads


def worker_json(row: WorkerRow, with_requests: bool = False) -> dict[str, Any]:
    used = row.num_used_blocks
    out = {
        "worker_id": row.worker_id,
        "model": row.model,
        "state": row.status.name.lower(),
        "releasable": row.releasable,
        "drained": row.drained,
        "sleeping": row.sleeping,
        "kv_bytes_released": row.kv_bytes_released,
        "capacity_blocks": row.capacity_blocks,
        "used_blocks": used,
        "kv_usage": round(used / row.capacity_blocks, 4) if row.capacity_blocks else 0.0,
        "kv_pool_mapped_bytes": row.kv_pool_mapped_bytes,
        "block_size": row.block_size,
        "num_running": row.num_running,
        "num_waiting": row.num_waiting,
        "num_requests": len(row.request_blocks),
        "num_preemptions_total": row.num_preemptions_total,
        "joined_at": row.joined_at,
        "boot_id": row.boot_id,
        "lost_reason": row.lost_reason,
    }
    if with_requests:
        out["requests"] = dict(row.request_blocks)
    return out


def request_json(row: RequestRow, streaming: bool) -> dict[str, Any]:
    return {
        "request_id": row.request_id,
        "model": row.model,
        "worker_id": row.worker_id,
        "state": row.state.value,
        "num_blocks": row.num_blocks,
        "num_tokens": row.num_tokens,
        "num_prompt_tokens": row.num_prompt_tokens,
        "max_tokens": row.max_tokens,
        "placed_at": row.placed_at,
        "streaming": streaming,  # a client of this gateway process reads it
    }


def status_json(ctx: GatewayContext) -> dict[str, Any]:
    view = ctx.state.view
    rows = sorted(view.worker_rows.values(), key=lambda w: w.worker_id)
    live = [w for w in rows if w.status != WorkerStatus.LOST]
    models = []
    for name in view.model_names:
        pool = [w for w in live if w.model == name]
        capacity = sum(w.capacity_blocks for w in pool)
        used = sum(w.num_used_blocks for w in pool)
        models.append(
            {
                "model": name,
                "workers": len(pool),
                "active": sum(w.status == WorkerStatus.ACTIVE for w in pool),
                "releasable": sum(w.releasable for w in pool),
                "capacity_blocks": capacity,
                "used_blocks": used,
                "kv_usage": round(used / capacity, 4) if capacity else 0.0,
                "num_requests": sum(1 for r in view.requests.values() if r.model == name),
            }
        )
    capacity = sum(w.capacity_blocks for w in live)
    used = sum(w.num_used_blocks for w in live)
    totals = view.totals
    journal = None
    if ctx.keeper is not None:
        j = ctx.keeper.journal
        journal = {"directory": str(j.directory), "last_seq": j.last_seq,
                   "durable_seq": j.durable_seq}  # fmt: skip
    return {
        "gateway": {"boot_id": ctx.link.boot_id, "policy": ctx.config.policy, "journal": journal},
        "models": models,
        "workers": [worker_json(w) for w in rows],
        "releasable": [w.worker_id for w in rows if w.releasable],
        "sleeping": [w.worker_id for w in rows if w.sleeping],
        "migrations": [msgspec.to_builtins(m) for m in view.migrations.values()],
        "totals": {
            "workers": len(live),
            "active": sum(w.status == WorkerStatus.ACTIVE for w in live),
            "lost": len(rows) - len(live),
            "capacity_blocks": capacity,
            "used_blocks": used,
            "kv_usage": round(used / capacity, 4) if capacity else 0.0,
            "sleeping": sum(w.sleeping for w in live),
            "kv_bytes_released": sum(w.kv_bytes_released for w in live),
            "requests": len(view.requests),
            "streams": len(ctx.dispatcher.streams),
            "finished": totals.num_finished,
            "aborted": totals.num_aborted,
            "migrations": dict(totals.num_migrations),
            "migrations_aborted": totals.num_migrations_aborted,
            "resumed": totals.num_resumed,
        },
    }


async def status(request: web.Request) -> web.Response:
    return _json(status_json(request.app[CONTEXT]))


async def workers(request: web.Request) -> web.Response:
    view = request.app[CONTEXT].state.view
    rows = sorted(view.worker_rows.values(), key=lambda w: w.worker_id)
    return _json({"workers": [worker_json(w) for w in rows]})


async def worker(request: web.Request) -> web.Response:
    view = request.app[CONTEXT].state.view
    row = view.worker_rows.get(request.match_info["worker_id"])
    if row is None:
        raise NotFound(f"no worker {request.match_info['worker_id']!r}", param="worker_id")
    return _json(worker_json(row, with_requests=True))


async def requests(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    wanted = request.query.get("worker")
    rows = [r for r in ctx.state.view.requests.values() if wanted is None or r.worker_id == wanted]
    rows.sort(key=lambda r: (r.placed_at, r.request_id))
    streams = ctx.dispatcher.streams
    return _json({"requests": [request_json(r, r.request_id in streams) for r in rows]})


async def events(request: web.Request) -> web.StreamResponse:
    """Recent matching events as JSON lines; `follow=1` keeps the stream open for new ones."""
    ctx = request.app[CONTEXT]
    q = request.query
    tail = _int(q.get("tail"), _DEFAULT_TAIL, "tail")
    who = {"request": q.get("request"), "worker": q.get("worker")}
    follow = q.get("follow", "0").lower() in ("1", "true", "yes")
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    # Subscribed and tail read with no await between: no event is missed or sent twice.
    with ctx.feed.subscribe() as sub:
        backlog = ctx.feed.recent(tail, **who)
        lines = b"".join(_line(e) for e in backlog)  # any error is still an HTTP status
        await response.prepare(request)
        await response.write(lines)
        if follow:
            await _follow(response, sub, who)
    await response.write_eof()
    return response


async def _follow(response: web.StreamResponse, sub: Subscription, who: dict[str, Any]) -> None:
    while True:
        try:
            envelope = await asyncio.wait_for(sub.queue.get(), _KEEPALIVE_S)
        except TimeoutError:
            await response.write(b"\n")  # keepalive; finds a client that went away
            continue
        if envelope is None or sub.closed:
            return  # the gateway is stopping
        if matches(envelope.event, who["request"], who["worker"]):
            await response.write(_line(envelope))
        if sub.overflowed and sub.queue.empty():
            await response.write(b'{"error": "fell behind; follow again"}\n')
            return


# ---------------------------------------------------------------- actions


async def drain(request: web.Request) -> web.Response:
    return await _worker_call(request, "drain")


async def undrain(request: web.Request) -> web.Response:
    return await _worker_call(request, "undrain")


async def sleep(request: web.Request) -> web.Response:
    return await _worker_call(request, "sleep")


async def wake(request: web.Request) -> web.Response:
    return await _worker_call(request, "wake")


async def _worker_call(request: web.Request, action: str) -> web.Response:
    ctx = request.app[CONTEXT]
    worker_id = request.match_info["worker_id"]
    try:
        await getattr(ctx.link, action)(worker_id)
    except CallTimeout:
        err = MellError(f"worker {worker_id} did not answer {action} in time")
        return error_response(err, 504)
    except PeerUnreachable:
        return error_response(MellError(f"worker {worker_id} is unreachable"), 503)
    row = ctx.state.view.worker_rows[worker_id]
    return _json(worker_json(row, with_requests=True))


class MigrateBody(msgspec.Struct, forbid_unknown_fields=True):
    to: str
    kind: str = "auto"


async def migrate(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    request_id = request.match_info["request_id"]
    raw = await request.read()
    try:  # a JSON body, or the same fields as query parameters
        body = (
            msgspec.json.decode(raw, type=MigrateBody)
            if raw
            else msgspec.convert(dict(request.query), MigrateBody)
        )
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        raise InvalidRequest(f"bad migrate request: {err}") from None
    row = ctx.state.view.requests.get(request_id)
    if row is None or ctx.migrator is None:
        raise NotFound(f"no request {request_id!r} in flight", param="request_id")
    src = row.worker_id  # the row follows the request: read it before it moves
    outcome = await ctx.migrator.migrate(Move(request_id, src, body.to, move_kind(body.kind)))
    return _json(
        {
            "migration_id": outcome.migration_id,
            "request_id": request_id,
            "src": src,
            "dst": body.to,
            "kind": outcome.kind,
            "committed": outcome.committed,
            "reason": outcome.reason,
            "source": msgspec.structs.asdict(outcome.ended) if outcome.ended else None,
        }
    )


def _int(value: str | None, default: int, name: str, most: int = _MAX_TAIL) -> int:
    """A query parameter as an integer in 0..`most` (negative counts as 0); else a 400."""
    if value is None:
        return default
    try:
        number = max(0, int(value))
    except ValueError:
        number = -1
    if not 0 <= number <= most:
        raise InvalidRequest(f"{name} must be an integer in 0..{most}, got {value!r}", param=name)
    return number


def _line(envelope: EventEnvelope) -> bytes:
    return msgspec.json.encode(event_json(envelope)) + b"\n"


def _json(obj: object, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(obj), status=status, content_type="application/json"
    )
