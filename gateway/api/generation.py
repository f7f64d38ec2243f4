"""From a request's token stream to the HTTP response: SSE chunks or one JSON body.

`TextOutput` turns token outputs into text (incremental detokenization, stop strings held back,
logprobs). `respond` runs one placed request to its end; its `finally` is the one place a
request ends (`Dispatcher.release`), whether it finished, failed, or its client went away (aiohttp
cancels the handler then: `handler_cancellation=True`). Errors before the first token are HTTP
errors (the response starts only with the first token); a worker lost before the first token is
retried on another worker, since the client has seen nothing yet.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web

from mell.common.errors import MellError, RequestAbortedError, WorkerLostError
from mell.common.messages import TokenOutput
from mell.gateway.api.chunks import DONE, ChatFormat, CompletionFormat, encode, merge_logprobs
from mell.gateway.api.detokenizer import Detokenizer
from mell.gateway.api.error_body import error_event
from mell.gateway.api.stop_strings import StopMatcher
from mell.gateway.cluster.dispatcher import Dispatcher, Job
from mell.gateway.cluster.stream import RequestStream, StreamTimeout

log = structlog.get_logger("mell.gateway")
Format = ChatFormat | CompletionFormat
MAX_PLACEMENTS = 2  # placements of a request whose worker is lost before its first token
HIGH_WATER = 256 * 1024  # bytes buffered for a client before its handler takes over
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "Connection": "keep-alive",
}


class TextOutput:
    """Text, logprobs and finish reason of one request, from its token outputs."""

    __slots__ = ("_detok", "_fmt", "_stop", "finish_reason", "num_generated", "want_logprobs")

    def __init__(self, fmt: Format, stops: list[str], want_logprobs: bool) -> None:
        self._fmt = fmt
        self._detok = Detokenizer(fmt.tokenizer)
        self._stop = StopMatcher(stops) if stops else None
        self.want_logprobs = want_logprobs
        self.num_generated = 0
        self.finish_reason: str | None = None

    def feed(self, outputs: list[TokenOutput]) -> tuple[str, Any]:
        """New text and the logprobs object (None when not requested) of these outputs."""
        parts: list[str] = []
        lp_ids: list[int] = []
        lp_entries: list[Any] = []
        for out in outputs:
            self.num_generated += len(out.token_ids)
            text = self._detok.step(out.token_ids)
            if self.want_logprobs and out.logprobs is not None:
                lp_ids.extend(out.token_ids)
                lp_entries.extend(out.logprobs)
            if self._stop is not None:
                text = self._stop.feed(text)
                if self._stop.stopped:
                    parts.append(text)
                    self.finish_reason = "stop"
                    break
                if out.finish_reason is not None:
                    text += self._stop.flush()
            parts.append(text)
            if out.finish_reason is not None:
                self.finish_reason = out.finish_reason
                break
        logprobs = self._fmt.logprobs(lp_ids, lp_entries) if self.want_logprobs else None
        return "".join(parts), logprobs


@dataclass(slots=True)
class Outcome:
    finish_reason: str | None = None
    reason: str = "client disconnected"
    text: list[str] = field(default_factory=list)


async def respond(
    request: web.Request,
    dispatcher: Dispatcher,
    job: Job,
    fmt: Format,
    stops: list[str],
    want_logprobs: bool,
    stream_mode: bool,
    include_usage: bool,
    timeout_s: float,
) -> web.StreamResponse:
    """Place the request and answer it; the request always ends in `release`."""
    stream, outputs = await _start(dispatcher, job, timeout_s)
    text = TextOutput(fmt, stops, want_logprobs)
    outcome = Outcome()
    try:
        if stream_mode:
            return await _sse(
                request, stream, outputs, fmt, text, include_usage, timeout_s, outcome
            )
        return await _collect(stream, outputs, fmt, text, timeout_s, outcome)
    finally:
        dispatcher.release(stream, outcome.finish_reason, outcome.reason, text.num_generated)


async def _start(
    dispatcher: Dispatcher, job: Job, timeout_s: float
) -> tuple[RequestStream, list[TokenOutput]]:
    """Place the request and wait for its first outputs. A worker lost before producing any
    token costs the client nothing: the request is placed again (up to MAX_PLACEMENTS)."""
    for attempt in range(1, MAX_PLACEMENTS + 1):
        stream = dispatcher.submit(job)
        try:
            return stream, await _next(stream, timeout_s)
        except WorkerLostError as err:
            dispatcher.release(stream, None, err.message, 0)
            if attempt == MAX_PLACEMENTS:
                raise
            log.info("request_replaced", request_id=job.request_id, lost=stream.worker_id)
        except MellError as err:
            dispatcher.release(stream, None, err.message, 0)
            raise
        except BaseException:
            dispatcher.release(stream, None, "client disconnected", 0)
            raise
    raise AssertionError("unreachable")


async def _next(stream: RequestStream, timeout_s: float) -> list[TokenOutput]:
    """The next outputs; times out only after `timeout_s` without any token."""
    while True:
        try:
            return await stream.next(timeout_s)
        except StreamTimeout:
            idle = time.monotonic() - max(stream.last_token_at, stream.arrival)
            if idle >= timeout_s:
                raise RequestAbortedError(f"no output from the worker for {timeout_s} s") from None


class SseWriter:
    """Renders outputs as SSE chunks; after the first write it can write to the socket
    directly from the fan-out loop (`sink`), one write per step per request."""

    def __init__(
        self, fmt: Format, text: TextOutput, include_usage: bool, num_prompt_tokens: int
    ) -> None:
        self.fmt, self.text = fmt, text
        self.include_usage = include_usage
        self.num_prompt_tokens = num_prompt_tokens
        self.num_cached_tokens = 0
        self.finished = False

    def render(self, outputs: list[TokenOutput]) -> bytes:
        """The chunks of these outputs; with the last one, usage (if asked) and [DONE]."""
        piece, logprobs = self.text.feed(outputs)
        finish = self.text.finish_reason
        self.num_cached_tokens = max(
            [self.num_cached_tokens, *(o.num_cached_tokens for o in outputs)]
        )
        if not piece and finish is None and logprobs is None:
            return b""
        lp = b"null" if logprobs is None else encode(logprobs)
        data = self.fmt.delta_chunk(piece, lp, finish)
        if finish is not None:
            self.finished = True
            if self.include_usage:
                data += self.fmt.usage_chunk(
                    self.num_prompt_tokens, self.text.num_generated, self.num_cached_tokens
                )
            data += DONE
        return data

    def sink(self, transport: Any, stream: RequestStream) -> Callable[[TokenOutput], bool]:
        def write(out: TokenOutput) -> bool:
            if (
                transport is None
                or transport.is_closing()
                or transport.get_write_buffer_size() > HIGH_WATER
            ):
                return False  # let the handler deal with it (drain, or notice the close)
            data = self.render([out])
            if data:  # one HTTP chunk, framed here: the response's headers are already out
                transport.write(b"%x\r\n%b\r\n" % (len(data), data))
            if self.finished:
                stream.sink = None
                stream.wake()
            return True

        return write


async def _sse(
    request: web.Request,
    stream: RequestStream,
    outputs: list[TokenOutput],
    fmt: Format,
    text: TextOutput,
    include_usage: bool,
    timeout_s: float,
    outcome: Outcome,
) -> web.StreamResponse:
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    writer = SseWriter(fmt, text, include_usage, stream.num_prompt_tokens)
    try:
        await response.write((fmt.role_chunk() or b"") + writer.render(outputs))
        while not writer.finished:
            stream.sink = writer.sink(request.transport, stream)
            outputs = await _next(stream, timeout_s)
            stream.sink = None
            if outputs:
                await response.write(writer.render(outputs))
        outcome.finish_reason = text.finish_reason
        await response.write_eof()
    except MellError as err:
        stream.sink = None
        outcome.reason = err.message
        await _end_with_error(response, err)
    except ConnectionError:
        pass
    return response


async def _end_with_error(response: web.StreamResponse, err: MellError) -> None:
    try:
        await response.write(error_event(err) + DONE)
        await response.write_eof()
    except ConnectionError:
        pass


async def _collect(
    stream: RequestStream,
    outputs: list[TokenOutput],
    fmt: Format,
    text: TextOutput,
    timeout_s: float,
    outcome: Outcome,
) -> web.Response:
    parts: list[str] = []
    logprobs: list[Any] = []
    try:
        while True:
            piece, lp = text.feed(outputs)
            parts.append(piece)
            if lp is not None:
                logprobs.append(lp)
            if text.finish_reason is not None:
                break
            outputs = await _next(stream, timeout_s)
    except MellError as err:
        outcome.reason = err.message
        raise
    outcome.finish_reason = text.finish_reason
    body = fmt.response(
        "".join(parts),
        merge_logprobs(logprobs) if text.want_logprobs else None,
        text.finish_reason,
        stream.num_prompt_tokens,
        text.num_generated,
        stream.num_cached_tokens,
    )
    return web.Response(body=body, content_type="application/json")
