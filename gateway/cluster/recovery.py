"""The gateway's memory across restarts: its journal, snapshots, and reconciling with workers.

At start `recover` opens DATA_DIR/journal (truncating a torn last record with a warning), replays
the last snapshot and the events after it into a `ClusterView`, and returns it with the open
journal; a corrupt record raises CorruptRecord naming the segment and offset, and start-up stops.
The segments before the last snapshot, which the view does not need, are verified too: damage
there is a warning naming segment and offset (`journal_damage_before_snapshot`), not a stop.
`JournalKeeper` then writes snapshot records of the view (periodically, after many events, and
at shutdown) and, after a restart, runs the reconcile deadline: every request the recovered view
holds had its client connection die with the old gateway, so a request that no live stream
reads when the deadline passes is recorded aborted and aborted on its worker. (Most are aborted
sooner, when their worker says hello again: see `WorkerLink`.) Workers of the recovered view
that never say hello are declared lost by the link's liveness clock at the same deadline; their
requests, no longer live in the view, are still recorded aborted then.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
import structlog

from mell.common.config import GatewayConfig
from mell.common.errors import JournalError
from mell.common.events import EventEnvelope, RequestAborted
from mell.common.messages import AbortRequest, GatewayMessage
from mell.gateway.cluster.state import ClusterState
from mell.gateway.cluster.view import ClusterView, ViewSnapshot
from mell.gateway.journal import CorruptRecord, Journal, Record, replay, verify_before_snapshot
from mell.gateway.journal.codec import decode, journal_hook

log = structlog.get_logger("mell.gateway")

JOURNAL_DIR = "journal"
RESTART_REASON = "gateway restarted: the client connection died with the previous gateway"
_snapshot_decoder = msgspec.msgpack.Decoder(ViewSnapshot)


@dataclass(slots=True)
class Recovered:
    """What start-up found in the journal."""

    view: ClusterView
    journal: Journal
    num_events: int  # events replayed after the snapshot
    from_snapshot: bool
    recent: list[EventEnvelope]  # the replayed events, for the admin API's event tail


def journal_directory(config: GatewayConfig) -> Path:
    return Path(config.data_dir) / JOURNAL_DIR


def recover(config: GatewayConfig, models: Sequence[str], keep_recent: int = 1000) -> Recovered:
    """Open the journal and fold snapshot + tail; JournalError / CorruptRecord on damage."""
    directory = journal_directory(config)
    journal = Journal.open(directory, config.journal)
    try:
        view, recent, num_events, from_snapshot = replay_view(directory, models, keep_recent)
        _verify_skipped(directory)
    except BaseException:
        journal.close()
        raise
    return Recovered(view, journal, num_events, from_snapshot, recent)


def _verify_skipped(directory: Path) -> None:
    """Say what the segments before the last snapshot hold: intact, or damaged where."""
    checked, damage = verify_before_snapshot(directory)
    for err in damage:
        log.warning(
            "journal_damage_before_snapshot",
            segment=err.segment,
            offset=err.offset,
            reason=err.reason,
            note="the view starts at the last snapshot and does not need this record; "
            "`mellctl journal check` lists the damage, `mellctl journal repair` removes it",
        )
    if checked:
        log.info("journal_verified_before_snapshot", segments=checked, damaged=len(damage))


def replay_view(
    directory: Path, models: Sequence[str], keep_recent: int = 1000
) -> tuple[ClusterView, list[EventEnvelope], int, bool]:
    """(view, the last `keep_recent` events, events folded, whether it began at a snapshot)."""
    view = ClusterView(models)
    recent: list[EventEnvelope] = []
    num_events, from_snapshot = 0, False
    for record in replay(directory):
        if record.kind == "snapshot":
            view = ClusterView.from_snapshot(decode_snapshot(record), models)
            from_snapshot = True
        elif record.kind == "event":
            envelope = decode(record)
            view.apply(envelope)
            num_events += 1
            recent.append(envelope)
            if len(recent) > 2 * keep_recent:
                del recent[:-keep_recent]
    return view, recent[-keep_recent:], num_events, from_snapshot


def encode_snapshot(view: ClusterView) -> bytes:
    return msgspec.msgpack.encode(view.snapshot())


def decode_snapshot(record: Record) -> ViewSnapshot:
    try:
        return _snapshot_decoder.decode(record.payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        raise CorruptRecord(
            record.segment, record.offset, f"record {record.seq} is not a view snapshot: {err}"
        ) from None


class JournalKeeper:
    """Appends every recorded event to the journal; writes snapshots; closes it at the end."""

    def __init__(self, state: ClusterState, journal: Journal, config: GatewayConfig) -> None:
        self.state = state
        self.journal = journal
        self.config = config.journal
        self._since_snapshot = 0
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        state.add_append_hook(journal_hook(journal))
        state.add_append_hook(self._count)

    def _count(self, _envelope: EventEnvelope) -> None:
        self._since_snapshot += 1
        every = self.config.snapshot_every_events
        if every and self._since_snapshot >= every and not self._scheduled and self._loop:
            # Not from inside the hook: the event being recorded is not folded yet.
            self._scheduled = True
            self._loop.call_soon(self.snapshot)

    def snapshot(self) -> int:
        """Write a snapshot record of the view now; returns its journal seq."""
        self._scheduled = False
        self._since_snapshot = 0
        seq = self.journal.write_snapshot(encode_snapshot(self.state.view))
        log.info("journal_snapshot", seq=seq, num_requests=len(self.state.view.requests))
        return seq

    async def run_forever(self) -> None:
        """Periodic snapshots (snapshot_interval_s; 0: only by event count)."""
        self._loop = asyncio.get_running_loop()
        interval = self.config.snapshot_interval_s
        while True:
            await asyncio.sleep(interval if interval > 0 else 3600.0)
            if interval > 0 and self._since_snapshot:
                self.snapshot()

    def close(self) -> None:
        """A last snapshot (the next start replays little), then flush and close."""
        try:
            self.snapshot()
        except JournalError as err:  # a failed journal: the next start replays what is on disk
            log.error("journal_snapshot_failed", error=err.message)
        finally:
            self.journal.close()


async def reconcile_after_restart(
    state: ClusterState,
    streams: Mapping[str, object],
    send: Callable[[str, GatewayMessage], object],
    timeout_s: float,
    recovered: Iterable[str],
) -> list[str]:
    """At the deadline, abort every recovered request that has not ended and no live stream
    reads; the ids. That includes requests whose worker was declared lost before it said hello
    again (the view keeps them as tombstones): each one's end is in the journal."""
    recovered = list(recovered)
    await asyncio.sleep(timeout_s)
    view = state.view
    rows = {rid: view.unended(rid) for rid in recovered if rid not in streams}
    dead = {rid: row.worker_id for rid, row in rows.items() if row is not None}
    for rid, worker_id in dead.items():
        state.record(RequestAborted(request_id=rid, worker_id=worker_id, reason=RESTART_REASON))
        send(worker_id, AbortRequest([rid]))
    log.info("reconcile_done", aborted_at_deadline=len(dead), num_recovered=len(recovered))
    return list(dead)
