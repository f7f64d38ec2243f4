"""Per-request streams: every token index is delivered once, in order."""

from __future__ import annotations

import asyncio

import pytest

from mell.common.errors import WorkerLostError
from mell.common.messages import TokenOutput
from mell.gateway.cluster.stream import RequestStream, StreamTimeout


def out(first: int, ids: list[int], finish: str | None = None) -> TokenOutput:
    return TokenOutput("r", first, ids, None, finish, 3)


async def test_duplicates_dropped_and_overlaps_trimmed() -> None:
    s = RequestStream("r", "m", "w", 3, 10, 0.0)
    assert s.push(out(0, [1, 2]))
    assert not s.push(out(0, [1, 2]))  # a duplicate (e.g. resent after a migration)
    assert s.push(out(1, [2, 3, 4]))  # overlap: only 3, 4 are new
    got = await s.next(1.0)
    assert [o.token_ids for o in got] == [[1, 2], [3, 4]]
    assert [o.first_index for o in got] == [0, 2]
    assert s.push(out(4, [5], "stop")) and s.done
    assert not s.push(out(5, [6]))


async def test_waiting_consumer_is_woken_and_errors_raise() -> None:
    s = RequestStream("r", "m", "w", 3, 10, 0.0)
    waiter = asyncio.create_task(s.next(5.0))
    await asyncio.sleep(0)
    s.push(out(0, [7]))
    assert (await waiter)[0].token_ids == [7]
    s.fail(WorkerLostError("gone"))
    with pytest.raises(WorkerLostError):
        await s.next(1.0)
    with pytest.raises(StreamTimeout):
        await RequestStream("q", "m", "w", 1, 1, 0.0).next(0.01)
