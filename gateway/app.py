"""The gateway's aiohttp application: routes, middlewares, background tasks.

Routes: /v1/completions, /v1/chat/completions, /v1/models, /tokenize, /detokenize, /health,
/version, /load, /metrics. Every error leaves as OpenAI error JSON; an unexpected exception is
a 500 with the request id logged, never a traceback to the client.

Part of the wiring at the top of the gateway: it joins the handlers of `api/` with the
cluster's background tasks (the link's loops, the epoch loop, the sleeper, the journal keeper).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version

import msgspec
import structlog
from aiohttp import web

from mell.common.errors import Unauthorized
from mell.gateway.api.error_body import error_response, errors_middleware
from mell.gateway.api.routes import chat_completions, completions, detokenize, tokenize
from mell.gateway.api.served_models import context_length
from mell.gateway.cluster.epoch import run_epochs
from mell.gateway.cluster.loop_lag import probe_loop_lag
from mell.gateway.cluster.metrics import CONTENT_TYPE
from mell.gateway.cluster.recovery import reconcile_after_restart
from mell.gateway.cluster.sleeper import run_sleeper
from mell.gateway.context import CONTEXT, GatewayContext
from mell.gateway.policy.base import WorkerStatus

log = structlog.get_logger("mell.gateway")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_app(ctx: GatewayContext) -> web.Application:
    app = web.Application(
        middlewares=[errors_middleware, auth_middleware(ctx.config.api_keys)],
        client_max_size=ctx.models.max_body_bytes,
    )
    app[CONTEXT] = ctx
    app.add_routes(
        [
            web.post("/v1/completions", completions),
            web.post("/v1/chat/completions", chat_completions),
            web.get("/v1/models", list_models),
            web.post("/tokenize", tokenize),
            web.post("/detokenize", detokenize),
            web.get("/health", health),
            web.get("/version", get_version),
            web.get("/load", load),
            web.get("/metrics", metrics),
        ]
    )
    app.cleanup_ctx.append(background_tasks)
    return app


async def background_tasks(app: web.Application) -> AsyncIterator[None]:
    ctx = app[CONTEXT]
    tasks: list[asyncio.Task[object]] = [
        asyncio.create_task(ctx.link.receive_forever(), name="worker-receive"),
        asyncio.create_task(ctx.link.watch_forever(), name="worker-watch"),
        asyncio.create_task(probe_loop_lag(ctx.metrics.loop_lag.observe), name="loop-lag"),
        asyncio.create_task(
            run_epochs(ctx.policy, ctx.state.view, ctx.config.epoch_s, ctx.migrator),
            name="epochs",
        ),
        asyncio.create_task(
            run_sleeper(ctx.state.view, ctx.link, ctx.config.epoch_s), name="sleeper"
        ),
    ]
    if ctx.keeper is not None:
        tasks.append(asyncio.create_task(ctx.keeper.run_forever(), name="journal-snapshots"))
    if ctx.recovered_requests:  # after a restart: requests whose clients died with it
        reconcile = reconcile_after_restart(
            ctx.state,
            ctx.dispatcher.streams,
            ctx.link.send_quietly,
            ctx.config.reconcile_timeout_s,
            ctx.recovered_requests,
        )
        tasks.append(asyncio.create_task(reconcile, name="reconcile"))
    yield
    ctx.dispatcher.abort_all("gateway shutting down")
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


# Routes outside /v1/ that serve the model as /v1/ does, and need the API key as it does.
KEYED_PATHS = frozenset({"/tokenize", "/detokenize"})


def needs_key(path: str) -> bool:
    """Whether a request to `path` needs the API key (when the gateway has keys): every /v1/
    route, /tokenize and /detokenize; not /health, /version, /load, /metrics."""
    return path.startswith("/v1/") or path in KEYED_PATHS


def auth_middleware(api_keys: list[str]) -> Callable[..., Awaitable[web.StreamResponse]]:
    keys = [k.encode() for k in api_keys]

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if keys and needs_key(request.path):
            given = bearer_token(request)
            if not any(hmac.compare_digest(given, k) for k in keys):
                return error_response(Unauthorized("missing or invalid API key"))
        return await handler(request)

    return check


def bearer_token(request: web.Request) -> bytes:
    """The Authorization header's bearer token as bytes, whatever bytes the client sent."""
    header = request.headers.get("Authorization", "").removeprefix("Bearer ")
    return header.encode("utf-8", "surrogateescape")


async def list_models(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    data: list[dict[str, object]] = [
        {
            "id": m.name,
            "object": "model",
            "created": m.created,
            "owned_by": "mell",
            "root": str(m.path),
            "parent": None,
            "max_model_len": context_length(m, ctx.state.view),
            "permission": [],
        }
        for m in ctx.models.models.values()
    ]
    return _json({"object": "list", "data": data})


async def health(request: web.Request) -> web.Response:
    """200 when every configured model has an active worker, else 503; the body says why."""
    ctx = request.app[CONTEXT]
    view = ctx.state.view
    models = {}
    for name in ctx.models.names():
        rows = [w for w in view.worker_rows.values() if w.model == name]
        models[name] = {s.name.lower(): sum(w.status == s for w in rows) for s in WorkerStatus}
    lost = [
        {"worker_id": w.worker_id, "model": w.model, "reason": w.lost_reason}
        for w in view.worker_rows.values()
        if w.status == WorkerStatus.LOST
    ]
    ok = all(m["active"] > 0 for m in models.values())
    body = {"status": "ok" if ok else "unavailable", "models": models, "lost_workers": lost}
    return _json(body, 200 if ok else 503)


async def get_version(request: web.Request) -> web.Response:
    try:
        v = version("mell")
    except PackageNotFoundError:
        v = "0+unknown"
    return _json({"version": v})


async def load(request: web.Request) -> web.Response:
    return _json({"server_load": len(request.app[CONTEXT].dispatcher.streams)})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[CONTEXT].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def _json(obj: object, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(obj), status=status, content_type="application/json"
    )
