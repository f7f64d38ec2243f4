"""Request/reply correlation for asyncio: call ids, futures and timeouts.

A message that wants an answer carries `call_id`; the peer answers with a reply carrying the
same id. Replies to unknown or expired ids are ignored (they came too late).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any


class CallTimeout(Exception):
    """No reply came within the timeout."""


class PendingCalls:
    """Futures of calls in flight, keyed by call id."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._futures: dict[int, asyncio.Future[Any]] = {}

    def __len__(self) -> int:
        return len(self._futures)

    async def call(self, send: Callable[[int], None], timeout_s: float) -> Any:
        """Send with a fresh call id (`send(call_id)`) and wait for its reply, or CallTimeout."""
        call_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._futures[call_id] = future
        try:
            send(call_id)
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise CallTimeout(f"no reply to call {call_id} within {timeout_s} s") from None
        finally:
            self._futures.pop(call_id, None)

    def resolve(self, call_id: int, result: Any) -> bool:
        """Deliver a reply; False when nobody waits for it any more."""
        future = self._futures.get(call_id)
        if future is None or future.done():
            return False
        future.set_result(result)
        return True

    def fail_all(self, error: BaseException) -> None:
        """Fail every waiting call (e.g. the peer is gone)."""
        for future in self._futures.values():
            if not future.done():
                future.set_exception(error)
