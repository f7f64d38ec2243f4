"""The live event feed: the recent cluster events in memory, and subscribers that follow them.

The gateway adds `EventFeed.publish` as an append hook of `ClusterState`, so the feed sees every
event the journal sees, in the same order. The admin API serves the tail (`recent`) and follows
new events (`subscribe`); a subscriber that falls more than its queue behind is dropped (its
stream ends with a line saying so) rather than slowing the gateway. The full history is the
journal (`mellctl events --journal DIR`). `matches`, `event_json` and `event_fields` are
shared with `mellctl`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import msgspec

from mell.common.events import Event, EventEnvelope

_WORKER_FIELDS = ("worker_id", "src", "dst")
_EMBEDDED = ("identity", "load")  # event fields holding a `mell.common.workers` struct


def matches(event: Any, request: str | None = None, worker: str | None = None) -> bool:
    """Whether an event is about `request` (and) `worker`; None means any."""
    if request is not None and not _about_request(event, request):
        return False
    return worker is None or any(getattr(event, f, None) == worker for f in _WORKER_FIELDS)


def _about_request(event: Any, request: str) -> bool:
    if getattr(event, "request_id", None) == request:
        return True
    return any(load.request_id == request for load in getattr(event, "requests", ()))  # loads


def event_json(envelope: EventEnvelope) -> dict[str, Any]:
    """{"type", "source", "source_seq", "ts", then the event's fields}; the fields of an
    embedded shared struct (a worker's identity or load) are spread in its place, as flat as
    the event was before it embedded them."""
    fields = event_fields(envelope.event)
    kind = fields.pop("type")
    return {"type": kind, "source": envelope.source, "source_seq": envelope.seq,
            "ts": envelope.ts, **fields}  # fmt: skip


def event_fields(event: Event) -> dict[str, Any]:
    """{"type", then the event's fields}, embedded shared structs spread in their place."""
    flat: dict[str, Any] = {}
    for name, value in msgspec.to_builtins(event).items():
        if name in _EMBEDDED:
            flat.update(value)
        else:
            flat[name] = value
    return flat


class Subscription:
    """A follower's queue of envelopes (None: the feed closed); `overflowed` once it fell too
    far behind."""

    def __init__(self, maxsize: int) -> None:
        self.queue: asyncio.Queue[EventEnvelope | None] = asyncio.Queue(maxsize)
        self.overflowed = False
        self.closed = False


class EventFeed:
    def __init__(self, capacity: int = 10_000, recent: Iterable[EventEnvelope] = ()) -> None:
        self._ring: deque[EventEnvelope] = deque(recent, maxlen=capacity)
        self._subs: set[Subscription] = set()

    def publish(self, envelope: EventEnvelope) -> None:
        self._ring.append(envelope)
        for sub in list(self._subs):
            try:
                sub.queue.put_nowait(envelope)
            except asyncio.QueueFull:
                sub.overflowed = True
                self._subs.discard(sub)

    def recent(
        self, n: int, request: str | None = None, worker: str | None = None
    ) -> list[EventEnvelope]:
        """The last `n` events held in memory that match."""
        if n <= 0:
            return []
        picked: deque[EventEnvelope] = deque(maxlen=n)
        for envelope in self._ring:
            if matches(envelope.event, request, worker):
                picked.append(envelope)
        return list(picked)

    def close(self) -> None:
        """End every follower (the gateway is stopping)."""
        for sub in list(self._subs):
            sub.closed = True
            with contextlib.suppress(asyncio.QueueFull):
                sub.queue.put_nowait(None)
        self._subs.clear()

    @contextlib.contextmanager
    def subscribe(self, maxsize: int = 10_000) -> Iterator[Subscription]:
        sub = Subscription(maxsize)
        self._subs.add(sub)
        try:
            yield sub
        finally:
            self._subs.discard(sub)
