"""Torn writes: whatever the cut, start-up keeps every complete record and truncates the rest."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from journal_helpers import SMALL, copy, frames, last_segment, payload, payloads, write

from mell.gateway.journal import Journal, check, replay
from mell.gateway.journal.format import SEGMENT_HEADER, list_segments, segment_name

N = 30


@pytest.fixture
def journal_dir(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    write(src, N)
    assert len(list_segments(src)) == 1
    return src


def test_cutting_the_last_record_at_every_byte_offset(
    journal_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seg = last_segment(journal_dir)
    data = seg.read_bytes()
    last = frames(seg)[-1]
    assert last.seq == N
    for cut in range(last.offset, last.end + 1):
        d = copy(journal_dir, tmp_path / f"cut{cut}")
        (d / seg.name).write_bytes(data[:cut])
        complete = N if cut == last.end else N - 1
        torn = last.offset < cut < last.end

        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mell.journal"):
            assert payloads(d) == [payload(i) for i in range(complete)]  # read-only replay
        assert ("torn last record" in caplog.text) == torn, cut
        assert (d / seg.name).stat().st_size == cut  # readers never write

        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mell.journal"):
            journal = Journal.open(d, SMALL)
        assert ("truncated" in caplog.text) == torn, cut
        assert (journal.truncated is not None) == torn
        if torn:
            assert journal.truncated.offset == last.offset
            assert journal.truncated.nbytes == cut - last.offset
        assert journal.last_seq == complete
        journal.append(b"after")
        journal.close()

        assert payloads(d) == [payload(i) for i in range(complete)] + [b"after"]
        report = check(d)
        assert report.ok and not report.problems, report.problems


@pytest.mark.parametrize("cut", range(SEGMENT_HEADER.size + 1))
def test_segment_created_by_rotation_with_a_torn_header(tmp_path: Path, cut: int) -> None:
    write(tmp_path, N)
    name = segment_name(N + 1)  # the next segment, as a rotation would have created it
    header = SEGMENT_HEADER.pack(b"MELLJN\x00\x01", N + 1)
    (tmp_path / name).write_bytes(header[:cut])
    assert payloads(tmp_path) == [payload(i) for i in range(N)]
    with Journal.open(tmp_path, SMALL) as journal:
        assert journal.last_seq == N
        assert journal.append(b"after") == N + 1
    assert payloads(tmp_path) == [payload(i) for i in range(N)] + [b"after"]
    assert check(tmp_path).ok


@pytest.mark.parametrize("tail", [b"\x00" * 300, b"\xff" * 7, b"not a record at all" * 5])
def test_garbage_or_zeros_after_the_last_record_is_a_torn_tail(
    journal_dir: Path, tail: bytes
) -> None:
    seg = last_segment(journal_dir)
    size = seg.stat().st_size
    with seg.open("ab") as f:
        f.write(tail)
    report = check(journal_dir)
    assert report.ok
    assert [p.kind for p in report.problems] == ["torn-tail"]
    assert len(list(replay(journal_dir))) == N
    with Journal.open(journal_dir, SMALL) as journal:
        assert journal.truncated is not None and journal.truncated.nbytes == len(tail)
    assert seg.stat().st_size == size


def test_a_partly_flushed_record_is_completed_by_the_next_write(tmp_path: Path) -> None:
    # The flusher may write a record in two parts; a reader in between sees a torn tail.
    with Journal.open(tmp_path, SMALL) as journal:
        journal.append(b"one")
        journal.flush()
        with journal._flusher.lock:
            journal._buf += b"\x89MJR\x10"  # the start of a record, as if cut by a GIL switch
            journal._flusher.drain()
        assert payloads(tmp_path) == [b"one"]  # torn tail ignored, nothing raised
    with Journal.open(tmp_path, SMALL) as journal:  # start-up truncates it
        assert journal.truncated is not None
