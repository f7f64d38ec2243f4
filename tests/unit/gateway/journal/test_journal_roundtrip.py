"""Append and read back: order, sequence numbers, rotation, snapshots, retention, policies."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from journal_helpers import SMALL, payload, payloads, write

from mell.common.errors import JournalError
from mell.gateway.journal import Journal, JournalConfig, check, read_records, replay
from mell.gateway.journal.format import list_segments, segment_first_seq


def test_round_trip_keeps_order_seq_and_bytes(tmp_path: Path) -> None:
    seqs = write(tmp_path, 500)
    assert seqs == list(range(1, 501))
    records = list(replay(tmp_path))
    assert [r.seq for r in records] == seqs
    assert [r.payload for r in records] == [payload(i) for i in range(500)]
    assert {r.kind for r in records} == {"event"}
    assert all(abs(r.timestamp - time.time()) < 60 for r in records)
    assert check(tmp_path).ok


def test_empty_and_binary_payloads(tmp_path: Path) -> None:
    data = [b"", bytes(range(256)), b"\x00" * 5000, b"\x89MJR" * 10]
    with Journal.open(tmp_path, SMALL) as journal:
        for d in data:
            journal.append(d)
    assert [r.payload for r in replay(tmp_path)] == data


def test_reopen_continues_the_sequence(tmp_path: Path) -> None:
    write(tmp_path, 10)
    assert write(tmp_path, 5, start=10) == list(range(11, 16))
    assert payloads(tmp_path) == [payload(i) for i in range(15)]


def test_rotation_by_size(tmp_path: Path) -> None:
    write(tmp_path, 2000)
    segments = list_segments(tmp_path)
    assert len(segments) > 5
    assert all(s.stat().st_size <= SMALL.segment_bytes for s in segments)
    # each segment is named after its first record
    for seg in segments:
        first = next(r for r in read_records(tmp_path) if r.segment == seg.name)
        assert first.seq == segment_first_seq(seg.name)
    assert payloads(tmp_path) == [payload(i) for i in range(2000)]


def test_snapshot_starts_replay_and_retention_removes_older_segments(tmp_path: Path) -> None:
    config = JournalConfig(segment_bytes=4096, fsync_interval_s=0.005, retain_segments=2)
    with Journal.open(tmp_path, config) as journal:
        for i in range(1000):
            journal.append(payload(i))
        journal.flush()
        before = len(list_segments(tmp_path))
        snap = journal.write_snapshot(b"state-at-1000")
        after = [journal.append(payload(i)) for i in range(1000, 1010)]
        journal.flush()
    assert before > 4
    remaining = list_segments(tmp_path)
    older = [p for p in remaining if (segment_first_seq(p.name) or 0) < snap]
    assert len(older) == 2  # retain_segments of them kept for the audit trail
    assert segment_first_seq(remaining[-1].name) == snap  # the snapshot starts its segment
    records = list(replay(tmp_path))
    assert records[0].kind == "snapshot" and records[0].payload == b"state-at-1000"
    assert [r.seq for r in records[1:]] == after
    # the full history still reads from the first retained segment on
    history = list(read_records(tmp_path))
    assert history[-1].seq == after[-1]
    assert check(tmp_path).ok


def test_replay_uses_the_last_snapshot(tmp_path: Path) -> None:
    with Journal.open(tmp_path, SMALL) as journal:
        journal.write_snapshot(b"s1")  # first record of the first segment: no rotation needed
        journal.append(b"a")
        journal.write_snapshot(b"s2")
        journal.append(b"b")
    assert [(r.kind, r.payload) for r in replay(tmp_path)] == [("snapshot", b"s2"), ("event", b"b")]
    assert [r.payload for r in read_records(tmp_path)] == [b"s1", b"a", b"s2", b"b"]


def test_second_writer_is_refused(tmp_path: Path) -> None:
    with Journal.open(tmp_path, SMALL), pytest.raises(JournalError, match="in use"):
        Journal.open(tmp_path, SMALL)
    Journal.open(tmp_path, SMALL).close()  # released on close


def test_policy_always_is_durable_on_return(tmp_path: Path) -> None:
    with Journal.open(tmp_path, JournalConfig(fsync="always")) as journal:
        for i in range(20):
            seq = journal.append(payload(i))
            assert journal.durable_seq == seq


def test_policy_interval_makes_records_durable_within_the_interval(tmp_path: Path) -> None:
    with Journal.open(tmp_path, JournalConfig(fsync_interval_s=0.01)) as journal:
        seq = journal.append(b"x")
        assert journal.wait_durable(seq, timeout=5)
        assert journal.durable_seq >= seq
        assert not journal.wait_durable(seq + 10, timeout=0.05)  # not appended: times out


def test_policy_never_still_writes(tmp_path: Path) -> None:
    with Journal.open(tmp_path, JournalConfig(fsync="never")) as journal:
        seq = journal.append(b"x")
        assert journal.flush() == seq
    assert payloads(tmp_path) == [b"x"]


async def test_durable_awaits_without_blocking_the_loop(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path, JournalConfig(fsync_interval_s=0.02))
    try:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        task = asyncio.create_task(ticker())
        seqs = [journal.append(payload(i)) for i in range(100)]
        await asyncio.wait_for(journal.durable(seqs[-1]), timeout=5)
        task.cancel()
        assert journal.durable_seq >= seqs[-1]
        assert ticks >= 1  # the loop kept running while the flusher fsynced
        await journal.durable(1)  # already durable: returns at once
    finally:
        journal.close()


def test_closed_journal_refuses_appends(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path, SMALL)
    journal.append(b"a")
    journal.close()
    journal.close()  # idempotent
    with pytest.raises(JournalError, match="closed"):
        journal.append(b"b")
    assert journal.wait_durable(1)


def test_bad_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(JournalError):
        Journal.open(tmp_path, JournalConfig(segment_bytes=100))


def test_backpressure_writes_when_the_buffer_is_full(tmp_path: Path) -> None:
    config = JournalConfig(fsync_interval_s=10.0, max_pending_bytes=4096)
    with Journal.open(tmp_path, config) as journal:
        for i in range(200):
            journal.append(payload(i))
        assert journal.durable_seq > 0  # the flusher sleeps; appends flushed themselves
    assert payloads(tmp_path) == [payload(i) for i in range(200)]
