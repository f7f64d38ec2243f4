"""A worker's stats travel whole (`WorkerStats`): journals written before a field existed still
replay, records from a newer worker decode, hostile load records are refused with one error,
and the /metrics table names only fields that exist."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cluster_view import joined
from test_metrics import sample

from mell.common import events as ev
from mell.common.workers import RequestLoad, WorkerLoad, WorkerStats
from mell.gateway.cluster.metrics import Metrics
from mell.gateway.cluster.recovery import replay_view
from mell.gateway.cluster.view import ClusterView
from mell.gateway.cluster.view_metrics import Family
from mell.gateway.journal import Journal, JournalConfig
from mell.gateway.journal.codec import encode

# A LoadReported's load as journals before `WorkerStats` held it: the same map, fewer fields.
OLD_LOAD: dict[str, Any] = {
    "num_running": 1,
    "num_waiting": 2,
    "num_total_blocks": 10,
    "num_free_blocks": 4,
    "num_preemptions_total": 3,
    "requests": [["r1", 3, 40]],
    "num_host_total_blocks": 20,
    "num_host_free_blocks": 15,
    "num_swapped": 1,
    "offload_bytes_total": {"d2h": 4096, "h2d": 1024},
    "slo_violations_total": {"tpot": 2},
    "prefix_cache_queries_total": 90,
    "prefix_cache_hits_total": 30,
    "sleeping": False,
    "kv_bytes_released": 0,
    "kv_pool_cap_blocks": 8,
    "kv_pool_mapped_bytes": 1 << 20,
    "kv_pool_resizes_total": {"shrink": 2, "grow": 1},
    "kv_pool_blocks_moved_total": 5,
    "kv_pool_victims_total": 1,
    "kv_pool_trims_total": 4,
}
# ... and as the first journals wrote it, before the host tier and the pool were reported.
OLDEST_LOAD: dict[str, Any] = {k: OLD_LOAD[k] for k in list(OLD_LOAD)[:6]}


def raw_event(seq: int, event: dict[str, Any], source: str = "w0") -> bytes:
    return msgspec.msgpack.encode([source, seq, float(seq), event])


def write_journal(
    directory: Path, snapshot_load: dict[str, Any], load: dict[str, Any] | None
) -> None:
    """A real journal: a snapshot whose worker register holds `snapshot_load`, then a tail with
    a placement and (unless None) a LoadReported record holding `load`, both raw maps."""
    view = ClusterView(["m"])
    view.apply(ev.EventEnvelope("w0", 1, 1.0, joined("w0")))
    view.apply(ev.EventEnvelope("w0", 2, 2.0, ev.WorkerActivated(worker_id="w0")))
    image = msgspec.to_builtins(view.snapshot())
    image["workers"]["w0"]["load"] = snapshot_load
    placed = ev.RequestPlaced(
        request_id="r1", model="m", worker_id="w0", num_prompt_tokens=20, max_tokens=8, num_blocks=2
    )
    with Journal.open(directory, JournalConfig()) as journal:
        journal.append(encode(ev.EventEnvelope("w0", 1, 1.0, joined("w0"))))
        journal.append(encode(ev.EventEnvelope("w0", 2, 2.0, ev.WorkerActivated(worker_id="w0"))))
        journal.write_snapshot(msgspec.msgpack.encode(image))
        journal.append(encode(ev.EventEnvelope("gateway", 1, 3.0, placed)))
        if load is not None:
            journal.append(raw_event(3, {"type": "LoadReported", "worker_id": "w0", "load": load}))


def test_a_journal_of_the_old_shape_replays(tmp_path: Path) -> None:
    write_journal(tmp_path, OLDEST_LOAD, OLD_LOAD)
    view, _recent, num_events, from_snapshot = replay_view(tmp_path, ["m"])
    assert from_snapshot and num_events == 2
    load = view.worker_rows["w0"].load
    assert load.requests == [RequestLoad("r1", 3, 40)] and load.num_free_blocks == 4
    assert load.kv_pool_resizes_total == {"shrink": 2, "grow": 1}
    assert load.num_tokens_recomputed_total == 0  # a field the old records lacked: its default
    text = Metrics(view).render().decode()
    assert sample(text, "mell:kv_offload_bytes_total", model_name="m", direction="d2h") == 4096
    assert sample(text, "mell:kv_pool_blocks_moved_total", model_name="m") == 5
    assert sample(text, "mell:slo_violations_total", model_name="m", kind="ttft") == 0


def test_a_snapshot_of_the_oldest_shape_restores_its_load(tmp_path: Path) -> None:
    write_journal(tmp_path, OLDEST_LOAD, None)
    view, _recent, num_events, from_snapshot = replay_view(tmp_path, ["m"])
    assert from_snapshot and num_events == 1
    row = view.worker_rows["w0"]
    assert row.num_running == 1 and row.num_used_blocks == 6 and row.num_preemptions_total == 3
    assert row.load.num_swapped == 0 and row.load.kv_pool_cap_blocks == 0


def test_a_record_from_a_newer_worker_decodes() -> None:
    """Fields this version does not know are skipped (a newer gateway's journal replays)."""
    load = {**OLD_LOAD, "a_counter_from_later": 7}
    report = {"type": "LoadReported", "worker_id": "w0", "load": load}
    envelope = ev.decode_envelope(raw_event(1, report))
    assert isinstance(envelope.event, ev.LoadReported)
    assert envelope.event.load.num_preemptions_total == 3


def test_the_load_carries_every_stats_field_whole() -> None:
    figures = {**OLD_LOAD, "num_parked_total": 2}
    del figures["requests"]
    stats = WorkerStats(**figures)
    load = WorkerLoad.of(stats, [RequestLoad("r", 6, 9)])
    assert load.figures() == stats.figures() and load.requests == [RequestLoad("r", 6, 9)]
    assert set(stats.figures()) == set(WorkerStats.__struct_fields__)


def test_a_table_row_naming_no_field_fails_at_once() -> None:
    with pytest.raises(ValueError, match="no field 'num_runing'"):
        Family("mell:x", "x", "gauge", "num_runing")
    with pytest.raises(ValueError, match="dict field"):
        Family("mell:x", "x", "counter", lambda w: 0.0, by=("kind", ("a",)))


_ints = st.integers(-(2**63), 2**63 - 1)  # what MessagePack holds
_values = st.one_of(
    _ints,
    st.text(max_size=5),
    st.booleans(),
    st.none(),
    st.lists(_ints, max_size=3),
    st.dictionaries(st.text(max_size=3), _ints, max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([*OLD_LOAD, "other"]), _values, max_size=12))
def test_a_hostile_load_record_decodes_or_is_refused(fields: dict[str, Any]) -> None:
    """Any map as a LoadReported load: it decodes to typed stats, or raises msgspec's error
    (which the journal reader names as a corrupt record); nothing else escapes."""
    data = raw_event(1, {"type": "LoadReported", "worker_id": "w0", "load": fields})
    try:
        envelope = ev.decode_envelope(data)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return
    assert isinstance(envelope.event, ev.LoadReported)
    view = ClusterView(["m"])
    view.apply(ev.EventEnvelope("w0", 1, 1.0, joined("w0")))
    view.apply(ev.EventEnvelope("w0", 2, 2.0, envelope.event))
    Metrics(view).render()
