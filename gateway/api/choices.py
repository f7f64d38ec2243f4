"""Several choices in one response: `n` > 1 and completions with a list of prompts.

Each choice is its own placed request (its own `Job`, id `<request id>-<i>`), answered
concurrently: a non-streamed response lists every choice; a stream interleaves their chunks,
each with its `index`, then one usage chunk (if asked) summed over the choices and `[DONE]`.
Every choice ends in `Dispatcher.release`, whatever happens to the others. The choices of one
prompt share a placement group (one worker, which prefills their prompt once); usage counts
each prompt once, its cached tokens those its one prefill did not compute.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import web

from mell.common.errors import MellError
from mell.common.messages import TokenOutput
from mell.gateway.api.chunks import DONE
from mell.gateway.api.generation import (
    SSE_HEADERS,
    Format,
    Outcome,
    SseWriter,
    TextOutput,
    collect_choice,
    end_with_error,
    next_outputs,
    start,
)
from mell.gateway.cluster.dispatcher import Dispatcher, Job
from mell.gateway.cluster.stream import RequestStream


@dataclass(slots=True)
class Choice:
    """One choice of a response: its request and how it is rendered."""

    job: Job
    fmt: Format  # carries the choice's index
    text: TextOutput
    outcome: Outcome
    prompt: int = 0  # which prompt of the request
    stream: RequestStream | None = None


async def respond_many(
    request: web.Request,
    dispatcher: Dispatcher,
    choices: list[Choice],
    num_prompt_tokens: int,
    stream_mode: bool,
    include_usage: bool,
    timeout_s: float,
) -> web.StreamResponse:
    """Place every choice's request and answer them in one response; all end in `release`."""
    try:
        started = await asyncio.gather(
            *(start(dispatcher, c.job, timeout_s) for c in choices), return_exceptions=True
        )
        outputs: list[list[TokenOutput]] = []
        for choice, result in zip(choices, started, strict=True):
            if not isinstance(result, BaseException):
                choice.stream, first = result
                outputs.append(first)
        failed = next((r for r in started if isinstance(r, BaseException)), None)
        if failed is not None:
            raise failed
        if stream_mode:
            return await _sse(
                request, choices, outputs, num_prompt_tokens, include_usage, timeout_s
            )
        return await _collect(choices, outputs, num_prompt_tokens, timeout_s)
    finally:
        for c in choices:
            if c.stream is not None:
                dispatcher.release(
                    c.stream, c.outcome.finish_reason, c.outcome.reason, c.text.num_generated
                )


async def _collect(
    choices: list[Choice],
    outputs: list[list[TokenOutput]],
    num_prompt_tokens: int,
    timeout_s: float,
) -> web.Response:
    tasks = [
        asyncio.ensure_future(collect_choice(_stream(c), first, c.text, timeout_s, c.outcome))
        for c, first in zip(choices, outputs, strict=True)
    ]
    try:
        bodies = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    generated = sum(c.text.num_generated for c in choices)
    body = choices[0].fmt.full(list(bodies), num_prompt_tokens, generated, cached_tokens(choices))
    return web.Response(body=body, content_type="application/json")


async def _sse(
    request: web.Request,
    choices: list[Choice],
    outputs: list[list[TokenOutput]],
    num_prompt_tokens: int,
    include_usage: bool,
    timeout_s: float,
) -> web.StreamResponse:
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    lock = asyncio.Lock()

    async def write(data: bytes) -> None:
        if data:
            async with lock:
                await response.write(data)

    async def pump(choice: Choice, first: list[TokenOutput]) -> None:
        stream = _stream(choice)
        writer = SseWriter(choice.fmt, choice.text, False, 0, ends_stream=False)
        await write((choice.fmt.role_chunk() or b"") + writer.render(first))
        while not writer.finished:
            await write(writer.render(await next_outputs(stream, timeout_s)))
        choice.outcome.finish_reason = choice.text.finish_reason

    tasks = [asyncio.ensure_future(pump(c, o)) for c, o in zip(choices, outputs, strict=True)]
    try:
        await asyncio.gather(*tasks)
        tail = b""
        if include_usage:
            generated = sum(c.text.num_generated for c in choices)
            tail = choices[0].fmt.usage_chunk(num_prompt_tokens, generated, cached_tokens(choices))
        await response.write(tail + DONE)
        await response.write_eof()
    except MellError as err:
        for c in choices:
            c.outcome.reason = err.message
        await end_with_error(response, err)
    except ConnectionError:
        pass
    finally:
        for task in tasks:
            task.cancel()
    return response


def cached_tokens(choices: list[Choice]) -> int:
    """Prompt tokens of the request found computed: per prompt, the fewest any of its choices
    found (the choice that prefilled it; the others took its KV), summed over the prompts."""
    per_prompt: dict[int, int] = {}
    for c in choices:
        found = c.stream.num_cached_tokens if c.stream is not None else 0
        per_prompt[c.prompt] = min(per_prompt.get(c.prompt, found), found)
    return sum(per_prompt.values())


def _stream(choice: Choice) -> RequestStream:
    if choice.stream is None:
        raise AssertionError("a choice is read only once placed")
    return choice.stream
