"""OpenAI-style error bodies: `{"error": {"message", "type", "param", "code"}}`.

The HTTP status equals `code`, as in vLLM. 429 and 503 carry `Retry-After`.
"""

from __future__ import annotations

import msgspec
from aiohttp import web

from mell.common.errors import MellError

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
