"""Handlers of the OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions.

Each handler: decode the body (400 on any mistake), resolve the model (404), build the prompt
(chat template, tokenization), check lengths, then `respond` (place, stream, end).
"""

from __future__ import annotations

import time
from typing import Any

import structlog
from aiohttp import web

from mell.common.errors import InvalidRequest
from mell.common.ids import new_request_id
from mell.gateway.api.bodies import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    chat_logprobs,
    check_top_logprobs,
    decode_chat,
    decode_completion,
    include_usage,
    stop_strings,
    template_kwargs,
    to_sampling,
)
from mell.gateway.api.chunks import ChatFormat, CompletionFormat
from mell.gateway.api.generation import Format, respond
from mell.gateway.api.served_models import ServedModel, check_token_ids
from mell.gateway.cluster.dispatcher import Job
from mell.gateway.context import CONTEXT, GatewayContext


async def chat_completions(request: web.Request) -> web.StreamResponse:
    arrival = time.monotonic()
    ctx = request.app[CONTEXT]
    body = decode_chat(await _body(request))
    check_top_logprobs(body.top_logprobs, "top_logprobs")
    model = ctx.models.resolve(body.model)
    prompt = _render_chat(model, body)
    ids = await ctx.models.encode(model, prompt, add_special_tokens=False)
    max_tokens = body.max_completion_tokens or body.max_tokens or _default_max_tokens(model, ids)
    _check_length(model, len(ids), max_tokens, "messages")
    request_id = new_request_id("chatcmpl")
    logprobs = chat_logprobs(body)
    sampling = to_sampling(body, max_tokens, logprobs, model.sampling_defaults)
    job = Job(request_id, model.name, ids, sampling, arrival)
    fmt = ChatFormat(request_id, model.name, int(time.time()), model.tokenizer)
    return await _respond(request, ctx, job, fmt, body, logprobs is not None)


async def completions(request: web.Request) -> web.StreamResponse:
    arrival = time.monotonic()
    ctx = request.app[CONTEXT]
    body = decode_completion(await _body(request))
    check_top_logprobs(body.logprobs, "logprobs")
    model = ctx.models.resolve(body.model)
    ids = await _prompt_ids(ctx, model, body.prompt)
    max_tokens = body.max_tokens or 16
    _check_length(model, len(ids), max_tokens, "prompt")
    request_id = new_request_id("cmpl")
    sampling = to_sampling(body, max_tokens, body.logprobs, model.sampling_defaults)
    job = Job(request_id, model.name, ids, sampling, arrival)
    fmt = CompletionFormat(request_id, model.name, int(time.time()), model.tokenizer)
    return await _respond(request, ctx, job, fmt, body, body.logprobs is not None)


async def _respond(
    request: web.Request,
    ctx: GatewayContext,
    job: Job,
    fmt: Format,
    body: CompletionRequest | ChatCompletionRequest,
    want_logprobs: bool,
) -> web.StreamResponse:
    with structlog.contextvars.bound_contextvars(request_id=job.request_id):
        return await respond(
            request,
            ctx.dispatcher,
            job,
            fmt,
            stop_strings(body),
            want_logprobs,
            bool(body.stream),
            include_usage(body),
            ctx.config.request_timeout_s,
        )


async def _body(request: web.Request) -> bytes:
    if request.content_type not in ("application/json", "application/octet-stream", ""):
        raise InvalidRequest(f"Content-Type must be application/json, not {request.content_type}")
    return await request.read()


def _render_chat(model: ServedModel, body: ChatCompletionRequest) -> str:
    if model.chat_template is None:
        raise InvalidRequest(f"model {model.name} has no chat template", param="messages")
    messages = [_message_dict(m) for m in body.messages]
    return model.chat_template.render(
        messages,
        add_generation_prompt=body.add_generation_prompt,
        **template_kwargs(body),
    )


def _message_dict(message: ChatMessage) -> dict[str, Any]:
    content = message.content
    if isinstance(content, list):
        for part in content:
            if part.type != "text":
                raise InvalidRequest(
                    f"content part type {part.type!r} is not supported", param="messages"
                )
        content = "".join(part.text or "" for part in content)
    role = "system" if message.role == "developer" else message.role
    out: dict[str, Any] = {"role": role, "content": content or ""}
    if message.name:
        out["name"] = message.name
    return out


async def _prompt_ids(ctx: GatewayContext, model: ServedModel, prompt: Any) -> list[int]:
    if isinstance(prompt, str):
        ids = await ctx.models.encode(model, prompt, add_special_tokens=True)
    elif prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = check_token_ids(model, prompt)
    elif len(prompt) == 1 and isinstance(prompt[0], str | list):
        return await _prompt_ids(ctx, model, prompt[0])
    elif len(prompt) > 1 and all(isinstance(p, str | list) for p in prompt):
        raise InvalidRequest("only one prompt per request is supported", param="prompt")
    else:
        raise InvalidRequest("prompt must be a string or a list of token ids", param="prompt")
    if not ids:
        raise InvalidRequest("prompt is empty", param="prompt")
    return ids


def _default_max_tokens(model: ServedModel, ids: list[int]) -> int:
    """The rest of the context, capped by generation_config's max_new_tokens (as vLLM)."""
    rest = model.max_model_len - len(ids)
    cap = model.sampling_defaults.get("max_tokens")
    return min(rest, int(cap)) if isinstance(cap, int) and cap > 0 else rest


def _check_length(model: ServedModel, num_prompt: int, max_tokens: int, what: str) -> None:
    if num_prompt == 0:
        raise InvalidRequest("prompt is empty", param=what)
    if num_prompt + max(max_tokens, 1) > model.max_model_len:
        raise InvalidRequest(
            f"This model's maximum context length is {model.max_model_len} tokens. However, "
            f"you requested {num_prompt + max_tokens} tokens ({num_prompt} in the {what}, "
            f"{max_tokens} in the completion). Please reduce the length of the {what} or "
            "completion.",
            param=what,
        )
