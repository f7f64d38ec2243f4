"""Corruption: named by segment and offset at start-up; `check` reports it, `repair` removes
exactly the damaged bytes, keeps every intact record and a backup of what it changed."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from journal_helpers import SMALL, copy, flip, frames, last_segment, payload, payloads, write

from mell.common.errors import JournalError
from mell.gateway.journal import CorruptRecord, Journal, check, read_records, repair, replay
from mell.gateway.journal.format import RECORD_HEADER, list_segments
from mell.gateway.mellctl.main import main as mellctl

N = 30


@pytest.fixture
def one_segment(tmp_path: Path) -> Path:
    d = tmp_path / "j"
    write(d, N)
    return d


@pytest.fixture
def many_segments(tmp_path: Path) -> Path:
    d = tmp_path / "many"
    write(d, 600)
    assert len(list_segments(d)) >= 4
    return d


def test_corrupt_record_in_the_middle_names_segment_and_offset(one_segment: Path) -> None:
    seg = last_segment(one_segment)
    bad = frames(seg)[10]
    flip(seg, bad.offset + RECORD_HEADER.size + 5)
    with pytest.raises(CorruptRecord) as err:
        list(replay(one_segment))
    assert err.value.segment == seg.name and err.value.offset == bad.offset
    assert seg.name in err.value.message and f"offset {bad.offset}" in err.value.message
    assert isinstance(err.value, JournalError)
    with pytest.raises(CorruptRecord):  # start-up stops too: it is not a torn tail
        Journal.open(one_segment, SMALL)


def test_a_bad_length_that_runs_past_the_end_is_still_corruption(one_segment: Path) -> None:
    seg = last_segment(one_segment)
    bad = frames(seg)[3]
    data = bytearray(seg.read_bytes())
    struct.pack_into("<I", data, bad.offset + 4, 1 << 20)  # claims to run past the file's end
    seg.write_bytes(bytes(data))
    with pytest.raises(CorruptRecord, match="valid records follow") as err:
        Journal.open(one_segment, SMALL)
    assert err.value.offset == bad.offset


def test_damage_at_the_end_of_an_older_segment_is_not_a_torn_tail(many_segments: Path) -> None:
    first = list_segments(many_segments)[0]
    last = frames(first)[-1]
    flip(first, last.end - 1)
    with pytest.raises(CorruptRecord) as err:
        list(replay(many_segments))
    assert (err.value.segment, err.value.offset) == (first.name, last.offset)


def test_check_and_repair_remove_only_the_damaged_record(one_segment: Path) -> None:
    seg = last_segment(one_segment)
    original = frames(seg)
    bad = original[10]
    flip(seg, bad.offset + RECORD_HEADER.size + 5)
    damaged = seg.read_bytes()

    report = check(one_segment)
    assert not report.ok
    errors = [p for p in report.problems if p.severity == "error"]
    assert (errors[0].segment, errors[0].offset, errors[0].kind) == (
        seg.name,
        bad.offset,
        "corrupt",
    )
    assert errors[0].length == bad.end - bad.offset
    assert any(p.kind == "missing" and p.seqs == (11, 11) for p in errors)

    result = repair(one_segment)
    assert [(r.segment, r.offset, r.length) for r in result.removed] == [
        (seg.name, bad.offset, bad.end - bad.offset)
    ]
    assert result.lost == [(11, 11)]
    assert result.rewritten == [seg.name]
    assert len(result.backups) == 1 and Path(result.backups[0]).read_bytes() == damaged
    assert result.after is not None and result.after.ok

    kept = [payload(i) for i in range(N) if i != 10]
    assert payloads(one_segment) == kept
    lost = [r for r in read_records(one_segment, include_lost=True) if r.kind == "lost"]
    assert [r.lost_range() for r in lost] == [(11, 11)]
    with Journal.open(one_segment, SMALL) as journal:  # start-up works again
        assert journal.append(b"after") == N + 1
    again = repair(one_segment)
    assert not again.changed and not again.removed


def test_repair_of_a_missing_segment_marks_its_records_lost(many_segments: Path) -> None:
    segments = list_segments(many_segments)
    gone = segments[1]
    gone_seqs = [f.seq for f in frames(gone)]
    gone.unlink()
    with pytest.raises(CorruptRecord, match="missing"):
        list(replay(many_segments))
    assert not check(many_segments).ok
    result = repair(many_segments)
    assert result.lost == [(gone_seqs[0], gone_seqs[-1])]
    assert result.after is not None and result.after.ok
    survivors = [payload(i) for i in range(600) if i + 1 not in gone_seqs]
    assert payloads(many_segments) == survivors


def test_repair_truncates_a_torn_tail_and_keeps_a_backup(one_segment: Path) -> None:
    seg = last_segment(one_segment)
    with seg.open("ab") as f:
        f.write(b"\x89MJR\x00\x01")
    result = repair(one_segment)
    assert [(r.offset, r.length) for r in result.removed] == [(frames(seg)[-1].end, 6)]
    assert result.lost == [] and result.after is not None and not result.after.problems
    assert payloads(one_segment) == [payload(i) for i in range(N)]


def test_repair_refuses_while_a_writer_holds_the_journal(one_segment: Path) -> None:
    with Journal.open(one_segment, SMALL), pytest.raises(JournalError, match="in use"):
        repair(one_segment)


def test_mellctl_journal_check_and_repair(
    one_segment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert mellctl(["journal", "check", str(one_segment)]) == 0
    out = capsys.readouterr().out
    assert f"{N} records" in out and out.strip().endswith("ok")

    seg = last_segment(one_segment)
    bad = frames(seg)[4]
    flip(seg, bad.offset + 2)
    backup = copy(one_segment, tmp_path / "backup")

    assert mellctl(["journal", "check", str(one_segment)]) == 1
    captured = capsys.readouterr()
    reason = captured.err.strip().splitlines()
    assert len(reason) == 1 and f"{seg.name} @{bad.offset}" in reason[0]

    assert mellctl(["journal", "check", "--json", str(backup)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["problems"][0]["offset"] == bad.offset

    assert mellctl(["journal", "repair", "--json", str(one_segment)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["changed"] and result["after"]["ok"] and result["lost"] == [[5, 5]]
    assert mellctl(["journal", "repair", str(one_segment)]) == 0
    assert "nothing to repair" in capsys.readouterr().out

    assert mellctl(["journal", "check", str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err
