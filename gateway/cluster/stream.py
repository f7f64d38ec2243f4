"""The outputs of one request on their way from the worker link to its HTTP handler.

Tokens are numbered per request: an output whose tokens were already delivered (a duplicate
after a migration) is dropped, an overlap is trimmed, so the client sees every token once.

Fast path: a streaming handler installs a `sink` that writes an output straight to its client
from the dispatcher's fan-out loop (no task switch per token). When the sink declines (slow
client, connection closing) outputs queue up and the handler is woken to deal with them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from mell.common.errors import MellError
from mell.common.messages import TokenOutput

log = structlog.get_logger("mell.gateway")
Sink = Callable[[TokenOutput], bool]


class StreamTimeout(Exception):
    pass


class RequestStream:
    """Single producer (the dispatcher), single consumer (the handler)."""

    __slots__ = (
        "_pending",
        "_waiter",
        "arrival",
        "error",
        "finish_reason",
        "first_token_at",
        "last_token_at",
        "max_tokens",
        "model",
        "next_index",
        "num_cached_tokens",
        "num_prompt_tokens",
        "prev_worker_id",
        "request_id",
        "sink",
        "token_ids",
        "worker_id",
    )

    def __init__(
        self,
        request_id: str,
        model: str,
        worker_id: str,
        num_prompt_tokens: int,
        max_tokens: int,
        arrival: float,
    ) -> None:
        self.request_id = request_id
        self.model = model
        self.worker_id = worker_id
        self.prev_worker_id = ""  # where it ran before its last migration (late tokens)
        self.num_prompt_tokens = num_prompt_tokens
        self.num_cached_tokens = 0  # prompt tokens found in a worker's prefix cache
        self.max_tokens = max_tokens
        self.arrival = arrival
        self.next_index = 0  # == tokens delivered so far
        self.token_ids: list[int] = []  # those tokens (to resume the request elsewhere)
        self.finish_reason: str | None = None  # set by the worker's last output
        self.error: MellError | None = None
        self.first_token_at = 0.0
        self.last_token_at = 0.0
        self.sink: Sink | None = None
        self._pending: list[TokenOutput] = []
        self._waiter: asyncio.Future[bool] | None = None

    @property
    def done(self) -> bool:
        """No more output will come (finished at the worker, or failed)."""
        return self.finish_reason is not None or self.error is not None

    def push(self, out: TokenOutput) -> bool:
        """Queue an output; False when it brings nothing new."""
        if self.done:
            return False
        skip = self.next_index - out.first_index
        if skip > 0:
            if skip >= len(out.token_ids) and out.finish_reason is None:
                return False
            out = _trimmed(out, skip)
        self.next_index += len(out.token_ids)
        self.token_ids += out.token_ids
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason
        if self.sink is not None and not self._pending and self._to_sink(out):
            return True
        self._pending.append(out)
        self.wake()
        return True

    def _to_sink(self, out: TokenOutput) -> bool:
        try:
            return self.sink(out)  # type: ignore[misc]
        except Exception:
            log.exception("sink_failed", request_id=self.request_id)
            self.sink = None
            return False

    def fail(self, error: MellError) -> None:
        if not self.done:
            self.error = error
            self.wake()

    async def next(self, timeout_s: float) -> list[TokenOutput]:
        """What queued since the last call ([] when woken with nothing queued, e.g. the sink
        finished); raises the stream's error once drained, StreamTimeout after `timeout_s`."""
        woken = True
        if not self._pending and self.error is None:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            # A bare timer, not asyncio.wait_for: this may run once per token of every stream.
            timer = loop.call_later(timeout_s, _expire, waiter)
            try:
                woken = await waiter
            finally:
                timer.cancel()
                self._waiter = None
        if self._pending:
            pending, self._pending = self._pending, []
            return pending
        if self.error is not None:
            raise self.error
        if not woken:
            raise StreamTimeout(self.request_id)
        return []

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


def _trimmed(out: TokenOutput, skip: int) -> TokenOutput:
    return TokenOutput(
        out.request_id,
        out.first_index + skip,
        out.token_ids[skip:],
        out.logprobs[skip:] if out.logprobs is not None else None,
        out.finish_reason,
        out.num_prompt_tokens,
        out.prompt_logprobs,
        out.num_cached_tokens,
    )
