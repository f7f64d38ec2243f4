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
from mell.common.sampling import TokenLogprobs
from mell.gateway.api.chunks import (
    DONE,
    ChatFormat,
    CompletionFormat,
    encode,
    join_calls,
    merge_logprobs,
)
from mell.gateway.api.detokenizer import Detokenizer
from mell.gateway.api.error_body import error_event
from mell.gateway.api.reasoning import ReasoningSplitter
from mell.gateway.api.stop_strings import StopMatcher
from mell.gateway.api.tools.parser import ToolCallDelta, ToolParser
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


@dataclass(slots=True)
class Piece:
    """New output of a chat choice, split: reasoning, content and tool call deltas."""

    reasoning: str
    content: str
    calls: list[ToolCallDelta]


class TextOutput:
    """Text, logprobs and finish reason of one request, from its token outputs."""

    __slots__ = (
        "_detok",
        "_echo_top",
        "_prefix",
        "_prompt_ids",
        "_show_prompt",
        "_stop",
        "finish_reason",
        "fmt",
        "num_generated",
        "prompt_logprobs",
        "reasoning",
        "tools",
        "want_logprobs",
    )

    def __init__(
        self,
        fmt: Format,
        stops: list[str],
        want_logprobs: bool,
        *,
        skip_special_tokens: bool = True,
        include_stop: bool = False,
        prefix: str = "",
        prompt_ids: list[int] | None = None,
        echo_top: int | None = None,
        show_prompt_logprobs: bool = True,
        reasoning: ReasoningSplitter | None = None,
        tools: ToolParser | None = None,
    ) -> None:
        """`prefix` (the echoed prompt) comes before the first new text. With `prompt_ids`,
        the prompt logprobs the worker sends become `prompt_logprobs` (vLLM's JSON); with
        `echo_top` too (completions echo with logprobs=N) they also open the logprobs."""
        self.fmt = fmt
        self._prompt_ids = prompt_ids
        self._echo_top = echo_top
        self._show_prompt = show_prompt_logprobs
        self.reasoning = reasoning  # chat of a thinking model: splits reasoning from content
        self.tools = tools  # chat with tools: reads tool calls out of the content
        self.prompt_logprobs: Any = None
        self._detok = Detokenizer(fmt.tokenizer, skip_special_tokens)
        self._stop = StopMatcher(stops, include_stop) if stops else None
        self._prefix = prefix
        self.want_logprobs = want_logprobs
        self.num_generated = 0
        self.finish_reason: str | None = None

    def feed(self, outputs: list[TokenOutput]) -> tuple[str, Any]:
        """New text and the logprobs object (None when not requested) of these outputs."""
        parts: list[str] = []
        lp_ids: list[int] = []
        lp_entries: list[Any] = []
        echoed: Any = None
        for out in outputs:
            if out.prompt_logprobs is not None and self._prompt_ids is not None:
                echoed = self._prompt_part(self._prompt_ids, out.prompt_logprobs)
            self.num_generated += len(out.token_ids)
            text = self._detok.step(out.token_ids)
            if out.finish_reason is not None:
                text += self._detok.flush()
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
        logprobs = self.fmt.logprobs(lp_ids, lp_entries) if self.want_logprobs else None
        if echoed is not None and logprobs is not None:
            logprobs = merge_logprobs([echoed, logprobs])
        if self._prefix:
            parts.insert(0, self._prefix)
            self._prefix = ""
        return "".join(parts), logprobs

    def split(self, piece: str) -> Piece:
        """Reasoning, content and tool calls of new text; at the finish, what the splitter and
        the tool parser held back too, and finish reason `tool_calls` if the output made calls
        (and was not cut by its length)."""
        reasoning, content = "", piece
        finished = self.finish_reason is not None
        if self.reasoning is not None:
            reasoning, content = self.reasoning.feed(piece)
            if finished:
                held_reasoning, held_content = self.reasoning.flush()
                reasoning, content = reasoning + held_reasoning, content + held_content
        if self.tools is None:
            return Piece(reasoning, content, [])
        content, calls = self.tools.feed(content)
        if finished:
            held, held_calls = self.tools.flush()
            content, calls = content + held, calls + held_calls
            if self.tools.called and self.finish_reason == "stop":
                self.finish_reason = "tool_calls"
        return Piece(reasoning, content, calls)

    def _prompt_part(self, prompt_ids: list[int], entries: list[TokenLogprobs]) -> Any:
        """Record `prompt_logprobs` (if asked); the echoed prompt's part of the logprobs."""
        if self._show_prompt:
            self.prompt_logprobs = self.fmt.prompt_logprobs(prompt_ids, entries)
        if self._echo_top is None or not isinstance(self.fmt, CompletionFormat):
            return None
        return self.fmt.logprobs(prompt_ids, [None, *entries], self._echo_top)


@dataclass(slots=True)
class Outcome:
    finish_reason: str | None = None
    reason: str = "client disconnected"
    text: list[str] = field(default_factory=list)


async def respond(
    request: web.Request,
    dispatcher: Dispatcher,
    job: Job,
    text: TextOutput,
    stream_mode: bool,
    include_usage: bool,
    timeout_s: float,
) -> web.StreamResponse:
    """Place the request and answer it; the request always ends in `release`."""
    stream, outputs = await start(dispatcher, job, timeout_s)
    fmt = text.fmt
    outcome = Outcome()
    try:
        if stream_mode:
            return await _sse(
                request, stream, outputs, fmt, text, include_usage, timeout_s, outcome
            )
        return await _collect(stream, outputs, fmt, text, timeout_s, outcome)
    finally:
        dispatcher.release(stream, outcome.finish_reason, outcome.reason, text.num_generated)


async def start(
    dispatcher: Dispatcher, job: Job, timeout_s: float
) -> tuple[RequestStream, list[TokenOutput]]:
    """Place the request and wait for its first outputs. A worker lost before producing any
    token costs the client nothing: the request is placed again (up to MAX_PLACEMENTS)."""
    for attempt in range(1, MAX_PLACEMENTS + 1):
        stream = dispatcher.submit(job)
        try:
            return stream, await next_outputs(stream, timeout_s)
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


async def next_outputs(stream: RequestStream, timeout_s: float) -> list[TokenOutput]:
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
        self,
        fmt: Format,
        text: TextOutput,
        include_usage: bool,
        num_prompt_tokens: int,
        ends_stream: bool = True,
    ) -> None:
        self.fmt, self.text = fmt, text
        self.include_usage = include_usage
        self.num_prompt_tokens = num_prompt_tokens
        self.ends_stream = ends_stream  # False for one choice of several: the caller ends it
        self.num_cached_tokens = 0
        self.finished = False

    def render(self, outputs: list[TokenOutput]) -> bytes:
        """The chunks of these outputs; with the last one, usage (if asked) and [DONE]
        (unless another writes them: `ends_stream` False)."""
        text, logprobs = self.text.feed(outputs)
        piece = self.text.split(text)
        finish = self.text.finish_reason
        self.num_cached_tokens = max(
            [self.num_cached_tokens, *(o.num_cached_tokens for o in outputs)]
        )
        if not (piece.content or piece.reasoning or piece.calls or finish or logprobs):
            return b""
        lp = b"null" if logprobs is None else encode(logprobs)
        data = self.fmt.delta_chunk(piece.content, lp, finish, piece.reasoning, piece.calls)
        if finish is not None:
            self.finished = True
            if not self.ends_stream:
                return data
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
            outputs = await next_outputs(stream, timeout_s)
            stream.sink = None
            if outputs:
                await response.write(writer.render(outputs))
        outcome.finish_reason = text.finish_reason
        await response.write_eof()
    except MellError as err:
        stream.sink = None
        outcome.reason = err.message
        await end_with_error(response, err)
    except ConnectionError:
        pass
    return response


async def end_with_error(response: web.StreamResponse, err: MellError) -> None:
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
    choice = await collect_choice(stream, outputs, text, timeout_s, outcome)
    body = fmt.full(
        [choice], stream.num_prompt_tokens, text.num_generated, stream.num_cached_tokens
    )
    return web.Response(body=body, content_type="application/json")


async def collect_choice(
    stream: RequestStream,
    outputs: list[TokenOutput],
    text: TextOutput,
    timeout_s: float,
    outcome: Outcome,
) -> dict[str, Any]:
    """Read a request to its end; its choice object of a non-streamed response."""
    parts: list[str] = []
    thoughts: list[str] = []
    calls: list[ToolCallDelta] = []
    logprobs: list[Any] = []
    try:
        while True:
            new, lp = text.feed(outputs)
            piece = text.split(new)
            thoughts.append(piece.reasoning)
            parts.append(piece.content)
            calls.extend(piece.calls)
            if lp is not None:
                logprobs.append(lp)
            if text.finish_reason is not None:
                break
            outputs = await next_outputs(stream, timeout_s)
    except MellError as err:
        outcome.reason = err.message
        raise
    outcome.finish_reason = text.finish_reason
    merged = merge_logprobs(logprobs) if text.want_logprobs else None
    reasoning = None if text.reasoning is None else "".join(thoughts)
    tool_calls = None if text.tools is None else join_calls(calls)
    choice = text.fmt.choice("".join(parts), merged, text.finish_reason, reasoning, tool_calls)
    if text.prompt_logprobs is not None:
        choice["prompt_logprobs"] = text.prompt_logprobs
    return choice
