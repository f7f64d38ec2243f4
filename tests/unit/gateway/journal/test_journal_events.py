"""Event envelopes in the journal, and `mellctl events --journal DIR`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mell.common import events as ev
from mell.common.workers import RequestLoad, WorkerIdentity, WorkerLoad
from mell.gateway.cluster.state import ClusterState
from mell.gateway.cluster.view import ClusterView
from mell.gateway.journal import CorruptRecord, Journal, JournalConfig
from mell.gateway.journal.codec import journal_hook, read_envelopes
from mell.gateway.mellctl.main import main as mellctl


def _history(state: ClusterState) -> None:
    for wid in ("w0", "w1"):
        state.record(
            ev.WorkerJoined(
                identity=WorkerIdentity(
                    worker_id=wid,
                    boot_id="boot-" + wid,
                    model="mell-tiny",
                    capacity_blocks=64,
                    block_size=16,
                    max_model_len=1024,
                    data_address="tcp://127.0.0.1:7201",
                )
            ),
            source=wid,
        )
    state.record(
        ev.RequestPlaced(
            request_id="r1",
            model="mell-tiny",
            worker_id="w0",
            num_prompt_tokens=20,
            max_tokens=8,
            num_blocks=2,
        )
    )
    state.record(
        ev.LoadReported(
            worker_id="w0",
            load=WorkerLoad(
                num_running=1,
                num_waiting=0,
                num_total_blocks=64,
                num_free_blocks=61,
                num_preemptions_total=0,
                requests=[RequestLoad("r1", 3, 40)],
            ),
        ),
        source="w0",
    )
    state.record(
        ev.MigrationStarted(migration_id="m1", request_id="r1", src="w0", dst="w1", kind="kv")
    )
    state.record(
        ev.MigrationCommitted(migration_id="m1", request_id="r1", src="w0", dst="w1", kind="kv")
    )
    state.record(
        ev.RequestFinished(
            request_id="r1",
            worker_id="w1",
            finish_reason="stop",
            num_prompt_tokens=20,
            num_generated_tokens=8,
        )
    )


def _journal(d: Path) -> ClusterState:
    """Record the history with the journal hooked in; returns the live state."""
    state = ClusterState(ClusterView(["mell-tiny"]))
    with Journal.open(d, JournalConfig()) as journal:
        state.add_append_hook(journal_hook(journal))
        _history(state)
        journal.write_snapshot(b"view-state")
    return state


@pytest.fixture
def journal_dir(tmp_path: Path) -> Path:
    d = tmp_path / "journal"
    _journal(d)
    return d


def test_envelopes_round_trip_and_refold(tmp_path: Path) -> None:
    live = _journal(tmp_path)
    pairs = list(read_envelopes(tmp_path))
    assert [type(e.event).__name__ for _, e in pairs] == [
        "WorkerJoined",
        "WorkerJoined",
        "RequestPlaced",
        "LoadReported",
        "MigrationStarted",
        "MigrationCommitted",
        "RequestFinished",
    ]
    assert [r.seq for r, _ in pairs] == list(range(1, 8))
    replayed = ClusterView(["mell-tiny"])
    for _, envelope in pairs:
        replayed.apply(envelope)
    assert replayed.worker_rows == live.view.worker_rows
    assert replayed.requests == live.view.requests and replayed.totals == live.view.totals


def test_a_record_that_is_not_an_envelope_is_named(tmp_path: Path) -> None:
    with Journal.open(tmp_path, JournalConfig()) as journal:
        journal.append(b"\x93not an envelope")
    with pytest.raises(CorruptRecord, match=r"offset 16: record 1 is not an event envelope"):
        list(read_envelopes(tmp_path))


def test_mellctl_events_text(journal_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert mellctl(["events", "--journal", str(journal_dir)]) == 0
    out = capsys.readouterr().out
    assert all(len(line) <= 100 for line in out.splitlines())
    assert "w0#1  WorkerJoined" in out and "gateway#1  RequestPlaced" in out
    assert "snapshot #8" in out


def test_mellctl_events_filters_and_json(
    journal_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert mellctl(["events", "--journal", str(journal_dir), "--request", "r1", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["type"] for r in rows] == [
        "RequestPlaced",
        "LoadReported",  # its load report names r1
        "MigrationStarted",
        "MigrationCommitted",
        "RequestFinished",
    ]
    assert rows[0]["source"] == "gateway" and rows[0]["request_id"] == "r1"

    assert mellctl(["events", "--journal", str(journal_dir), "--worker", "w1", "--json"]) == 0
    types = [json.loads(line)["type"] for line in capsys.readouterr().out.splitlines()]
    assert types == ["WorkerJoined", "MigrationStarted", "MigrationCommitted", "RequestFinished"]

    assert mellctl(["events", "--journal", str(journal_dir), "--tail", "2", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["kind"] for r in rows] == ["event", "snapshot"]


def test_mellctl_events_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert mellctl(["events", "--journal", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
    with Journal.open(tmp_path / "bad", JournalConfig()) as journal:
        journal.append(b"junk")
    assert mellctl(["events", "--journal", str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not an event envelope" in err
