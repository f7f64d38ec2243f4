"""The API key guards every model route, /tokenize and /detokenize included; health, version,
load and metrics stay open."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from mell.gateway.api.error_body import errors_middleware
from mell.gateway.app import auth_middleware, needs_key


async def _ok(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def test_tokenize_and_detokenize_need_the_key() -> None:
    app = web.Application(middlewares=[errors_middleware, auth_middleware(["k1", "k2"])])
    paths = ["/v1/models", "/tokenize", "/detokenize", "/health", "/metrics"]
    app.add_routes([web.post(p, _ok) for p in paths])
    async with TestClient(TestServer(app)) as client:
        for path in paths:
            keyed = path not in ("/health", "/metrics")
            anonymous = await client.post(path, json={})
            wrong = await client.post(path, json={}, headers={"Authorization": "Bearer k3"})
            right = await client.post(path, json={}, headers={"Authorization": "Bearer k2"})
            assert (anonymous.status, wrong.status) == ((401, 401) if keyed else (200, 200))
            assert right.status == 200
            if keyed:
                assert (await anonymous.json())["error"]["type"] == "AuthenticationError"


async def test_no_keys_no_check() -> None:
    app = web.Application(middlewares=[errors_middleware, auth_middleware([])])
    app.add_routes([web.post("/tokenize", _ok)])
    async with TestClient(TestServer(app)) as client:
        assert (await client.post("/tokenize", json={})).status == 200


def test_keyed_paths() -> None:
    assert needs_key("/v1/chat/completions") and needs_key("/tokenize")
    assert needs_key("/detokenize")
    assert not any(needs_key(p) for p in ("/health", "/version", "/load", "/metrics", "/"))
