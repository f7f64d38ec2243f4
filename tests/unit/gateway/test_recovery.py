"""The gateway's journal wiring: events appended before the fold, snapshots, replay at start,
sequence numbers that continue after a restart, and a corrupt record that stops start-up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mell.common import events as ev
from mell.common.config import GatewayConfig, JournalConfig
from mell.common.errors import JournalError
from mell.common.workers import RequestLoad, WorkerIdentity, WorkerLoad
from mell.gateway.cluster.recovery import JournalKeeper, journal_directory, recover
from mell.gateway.cluster.state import ClusterState
from mell.gateway.journal import CorruptRecord, read_records
from mell.gateway.journal.format import iter_frames, list_segments

MODELS = ["m"]


def config(tmp_path: Path) -> GatewayConfig:
    return GatewayConfig(data_dir=str(tmp_path), journal=JournalConfig(fsync="never"))


def joined(wid: str) -> ev.WorkerJoined:
    return ev.WorkerJoined(
        identity=WorkerIdentity(
            worker_id=wid,
            boot_id="b-" + wid,
            model="m",
            capacity_blocks=32,
            block_size=16,
            max_model_len=256,
            data_address="",
        )
    )


def placed(rid: str, wid: str) -> ev.RequestPlaced:
    return ev.RequestPlaced(request_id=rid, model="m", worker_id=wid, num_prompt_tokens=20,
                            max_tokens=8, num_blocks=2)  # fmt: skip


def load(wid: str, rids: list[str]) -> ev.LoadReported:
    return ev.LoadReported(
        worker_id=wid,
        load=WorkerLoad(
            num_running=len(rids),
            num_waiting=0,
            num_total_blocks=32,
            num_free_blocks=32 - 3 * len(rids),
            num_preemptions_total=0,
            requests=[RequestLoad(r, 3, 40) for r in rids],
        ),
    )


def start(tmp_path: Path) -> tuple[ClusterState, JournalKeeper]:
    recovered = recover(config(tmp_path), MODELS)
    state = ClusterState(recovered.view)
    return state, JournalKeeper(state, recovered.journal, config(tmp_path))


def history(state: ClusterState, keeper: JournalKeeper) -> None:
    for wid in ("w0", "w1"):
        state.record(joined(wid), source=wid)
        state.record(ev.WorkerActivated(worker_id=wid), source=wid)
    state.record(placed("r1", "w0"))
    state.record(placed("r2", "w1"))
    keeper.snapshot()
    state.record(load("w0", ["r1"]), source="w0")
    state.record(ev.RequestFinished(request_id="r2", worker_id="w1", finish_reason="stop",
                                    num_prompt_tokens=20, num_generated_tokens=8))  # fmt: skip
    state.record(ev.WorkerDrainStarted(worker_id="w1"))


def test_a_restart_replays_snapshot_and_tail_into_the_same_view(tmp_path: Path) -> None:
    state, keeper = start(tmp_path)
    history(state, keeper)
    live = state.view
    keeper.journal.close()  # no last snapshot: replay folds the tail after the first one

    again = recover(config(tmp_path), MODELS)
    assert again.from_snapshot and again.num_events == 3
    view = again.view
    assert view.worker_rows == live.worker_rows and view.requests == live.requests
    assert view.totals == live.totals and view.last_seq == live.last_seq
    assert view.requests["r1"].num_blocks == 3 and "r2" not in view.requests

    # The restarted gateway continues every source's numbering: its events are not skipped.
    state2 = ClusterState(view)
    JournalKeeper(state2, again.journal, config(tmp_path))
    envelope = state2.record(ev.WorkerUndrained(worker_id="w1"))
    assert envelope.seq == live.last_seq["gateway"] + 1
    assert envelope.ts > max(r.placed_at for r in live.requests.values())
    assert view.worker_rows["w1"].status.name == "ACTIVE"
    again.journal.close()


def test_every_event_is_in_the_journal_before_the_view_changes(tmp_path: Path) -> None:
    state, keeper = start(tmp_path)
    seen: list[int] = []
    state.add_append_hook(lambda e: seen.append(keeper.journal.last_seq))
    state.record(joined("w0"), source="w0")
    assert seen == [1] and "w0" in state.view.worker_rows
    keeper.close()  # writes a last snapshot
    kinds = [r.kind for r in read_records(journal_directory(config(tmp_path)))]
    assert kinds == ["event", "snapshot"]


def test_a_corrupt_record_names_segment_and_offset(tmp_path: Path) -> None:
    state, keeper = start(tmp_path)
    history(state, keeper)
    keeper.journal.close()
    segment = list_segments(journal_directory(config(tmp_path)))[-1]
    data = bytearray(segment.read_bytes())
    frames = list(iter_frames(bytes(data)))
    target = frames[1]  # not the last record: not a torn tail
    data[target.offset + 12] ^= 0xFF
    segment.write_bytes(bytes(data))
    with pytest.raises(CorruptRecord) as info:
        recover(config(tmp_path), MODELS)
    assert info.value.segment == segment.name and info.value.offset == target.offset


@pytest.mark.slow
def test_the_gateway_refuses_to_start_on_a_corrupt_journal(tmp_path: Path) -> None:
    test_a_corrupt_record_names_segment_and_offset(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "mell.gateway.main", "--data-dir", str(tmp_path), "--port", "0",
         "--admin-port", "0", "--worker-endpoint", "tcp://127.0.0.1:0", "--log-level", "error"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mell-gateway: journal segment "), lines
    assert "at offset" in lines[0] and "mellctl journal" in lines[0]


def test_a_second_gateway_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    _, keeper = start(tmp_path)
    with pytest.raises(JournalError, match="in use"):
        recover(config(tmp_path), MODELS)
    keeper.close()


def test_damage_before_the_last_snapshot_is_a_warning_naming_it(tmp_path: Path) -> None:
    from structlog.testing import capture_logs

    state, keeper = start(tmp_path)
    history(state, keeper)  # events, a snapshot (a new segment), events
    keeper.journal.close()
    first = list_segments(journal_directory(config(tmp_path)))[0]
    data = bytearray(first.read_bytes())
    target = list(iter_frames(bytes(data)))[1]
    data[target.offset + 12] ^= 0xFF
    first.write_bytes(bytes(data))
    with capture_logs() as logs:
        again = recover(config(tmp_path), MODELS)
    again.journal.close()
    assert again.from_snapshot and again.num_events == 3  # start-up did not need it
    [warning] = [e for e in logs if e["event"] == "journal_damage_before_snapshot"]
    assert warning["segment"] == first.name and warning["offset"] == target.offset
    assert warning["log_level"] == "warning"
    [verified] = [e for e in logs if e["event"] == "journal_verified_before_snapshot"]
    assert verified["segments"] == 1 and verified["damaged"] == 1


def test_an_intact_journal_says_it_verified_what_it_skipped(tmp_path: Path) -> None:
    from structlog.testing import capture_logs

    state, keeper = start(tmp_path)
    history(state, keeper)
    keeper.journal.close()
    with capture_logs() as logs:
        recover(config(tmp_path), MODELS).journal.close()
    [verified] = [e for e in logs if e["event"] == "journal_verified_before_snapshot"]
    assert verified == {"event": "journal_verified_before_snapshot", "segments": 1,
                        "damaged": 0, "log_level": "info"}  # fmt: skip
    assert not [e for e in logs if e["event"] == "journal_damage_before_snapshot"]
