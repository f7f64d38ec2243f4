"""OpenAI-style error bodies: `{"error": {"message", "type", "param", "code"}}`.

The HTTP status equals `code`, as in vLLM. 429 and 503 carry `Retry-After`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import msgspec
import structlog
from aiohttp import web

from mell.common.errors import InvalidRequest, MellError, NotFound

log = structlog.get_logger("mell.gateway")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

RETRY_AFTER_S = "1"


def error_json(err: MellError, status: int | None = None) -> bytes:
    status = status or err.http_status
    return msgspec.json.encode(
        {
            "error": {
                "message": err.message,
                "type": err.code.value,
                "param": err.param,
                "code": status,
            }
        }
    )


def error_response(err: MellError, status: int | None = None) -> web.Response:
    status = status or err.http_status
    headers = {"Retry-After": RETRY_AFTER_S} if status in (429, 503) else None
    return web.Response(
        body=error_json(err, status),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_event(err: MellError) -> bytes:
    """The SSE event that ends a stream in error (followed by `data: [DONE]`)."""
    return b"data: " + error_json(err) + b"\n\n"


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except MellError as err:
        return error_response(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        refused = NotFound(exc.reason) if exc.status == 404 else InvalidRequest(exc.reason)
        return error_response(refused, exc.status)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        log.exception("handler_failed", path=request.path)
        return error_response(MellError("internal error; see the gateway log"), 500)
