"""The gateway's side of the worker channel: membership, liveness, and message routing.

Workers connect to the gateway's ROUTER and say `Hello`, signed with the cluster secret; the
link binds the connection's route to the worker id (`WorkerPort.bind`), records `WorkerJoined`,
answers `Welcome`, turns load reports into `LoadReported` events (the first one activates the
worker), hands token batches to the dispatcher, and declares a worker lost when its connection
closes (at once), it falls silent for `worker_timeout_s`, fails, or cannot be sent to. A message
from a connection no hello was accepted from (a worker it does not know, or one it knows from
the journal after a restart) gets `Rejoin`, at most one per `_REJOIN_EVERY_S`.

Who may join: a hello that is not signed with the cluster secret gets `Refused`. A hello for a
worker id another connection holds is checked against the holder: if the holder answers a ping
within a second the newcomer is refused (two processes with one id), else the holder is lost and
the newcomer (a restart) joins in its place.

Reconciling on hello: a worker's `Hello` lists the requests it holds. Any of them that no live
stream of this gateway reads (their clients were connected to a previous gateway process), and
any request the view places on the worker that no stream reads, is aborted on the worker and
recorded `RequestAborted`: no KV stays held for a dead request.

Collaborators come through the constructor: the `WorkerPort` it receives from and sends
through, the `RequestListener` (the dispatcher) and the `MigrationListener` (the migrator) it
hands messages and losses to. Both listeners are built before the link, from the port, so no
component is wired after construction.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol, assert_never

import structlog

from mell.common.config import GatewayConfig
from mell.common.errors import Conflict, MellError, NotFound
from mell.common.events import (
    LoadReported,
    RequestAborted,
    WorkerActivated,
    WorkerDrained,
    WorkerDrainStarted,
    WorkerJoined,
    WorkerLost,
    WorkerUndrained,
)
from mell.common.ids import new_boot_id
from mell.common.messages import (
    AbortRequest,
    BoundariesReport,
    Drain,
    DrainCompleted,
    GatewayMessage,
    Heartbeat,
    Hello,
    LoadReport,
    MigratedIn,
    MigrationEnded,
    Ping,
    Refused,
    Rejoin,
    Reply,
    RequestFailed,
    Sleep,
    TokenBatch,
    Undrain,
    Wake,
    Welcome,
    WorkerFailed,
    WorkerMessage,
)
from mell.gateway.cluster.recovery import RESTART_REASON
from mell.gateway.cluster.state import ClusterState
from mell.gateway.cluster.view import ClusterView, WorkerRow
from mell.gateway.cluster.worker_port import MakeMessage, WorkerPort
from mell.gateway.policy.base import WorkerStatus

log = structlog.get_logger("mell.gateway")
_REJOIN_EVERY_S = 0.5


MigrationMessage = MigratedIn | MigrationEnded | BoundariesReport


class RequestListener(Protocol):
    """The link's view of the dispatcher: requests' outputs and failures, workers lost."""

    def on_token_batch(self, worker_id: str, batch: TokenBatch) -> None: ...

    def on_request_failed(self, worker_id: str, msg: RequestFailed) -> None: ...

    def on_worker_lost(self, worker_id: str, reason: str) -> None: ...

    def worker_of(self, request_id: str) -> str | None:
        """The worker a live stream of this gateway reads the request from, if any."""
        ...


class MigrationListener(Protocol):
    """The link's view of the migrator: migration outcomes, boundaries, workers lost."""

    def on_message(self, worker_id: str, message: MigrationMessage) -> None: ...

    def on_worker_lost(self, worker_id: str) -> None: ...


class WorkerLink:
    """Owns the liveness clock of every worker; receives through the port."""

    def __init__(
        self,
        config: GatewayConfig,
        state: ClusterState,
        port: WorkerPort,
        requests: RequestListener | None = None,
        migrations: MigrationListener | None = None,
    ) -> None:
        """Without `requests` (tests of the link alone) only unknown ids are reconciled."""
        self.config = config
        self.state = state
        self.port = port
        self.requests = requests
        self.migrations = migrations
        self.boot_id = new_boot_id()
        self.endpoint = port.endpoint
        self._last_seen: dict[str, float] = {}
        self._rejoin_sent: dict[str, float] = {}  # route -> when
        self._contests: dict[str, tuple[str, Hello]] = {}  # worker id -> newcomer route, hello
        self._checks: set[asyncio.Task[None]] = set()

    @property
    def view(self) -> ClusterView:
        return self.state.view

    def send(self, worker_id: str, message: GatewayMessage) -> bool:
        """Send without blocking; a worker that cannot be reached is declared lost."""
        if self.port.try_send(worker_id, message):
            return True
        self.lose(worker_id, "unreachable")
        return False

    async def call(self, worker_id: str, make: MakeMessage, timeout_s: float = 5.0) -> None:
        await self.port.call(worker_id, make, timeout_s)

    async def drain(self, worker_id: str, timeout_s: float = 5.0) -> None:
        """Stop placing on the worker and tell it to stop admitting (it finishes what runs)."""
        self._require(worker_id)
        self.state.record(WorkerDrainStarted(worker_id=worker_id))
        await self.call(worker_id, lambda call_id: Drain(call_id=call_id), timeout_s)

    async def undrain(self, worker_id: str, timeout_s: float = 5.0) -> None:
        self._require(worker_id)
        await self.call(worker_id, lambda call_id: Undrain(call_id=call_id), timeout_s)
        self.state.record(WorkerUndrained(worker_id=worker_id))

    async def sleep(self, worker_id: str, timeout_s: float = 5.0) -> None:
        """Make an idle worker give its KV memory back (it stays joined; a request placed on
        it wakes it). Conflict while it holds requests (as the view knows, or as the worker
        answers: a placement may race this call). The view shows it asleep on return."""
        row = self._require(worker_id)
        held = len(row.request_blocks) or row.num_running + row.num_waiting
        if held:
            raise Conflict(
                f"worker {worker_id!r} holds {held} requests: only an idle worker sleeps"
            )
        try:
            await self.call(worker_id, lambda call_id: Sleep(call_id=call_id), timeout_s)
        except MellError as err:  # the worker's answer: busy
            raise Conflict(err.message) from None

    async def wake(self, worker_id: str, timeout_s: float = 5.0) -> None:
        """Make a sleeping worker take its KV memory again (a no-op when awake)."""
        self._require(worker_id)
        await self.call(worker_id, lambda call_id: Wake(call_id=call_id), timeout_s)

    async def ping(self, worker_id: str, timeout_s: float = 2.0) -> float:
        """Round-trip time through the worker's engine loop, in seconds."""
        start = time.monotonic()
        await self.call(worker_id, lambda call_id: Ping(call_id=call_id), timeout_s)
        return time.monotonic() - start

    def _require(self, worker_id: str) -> WorkerRow:
        row = self.view.worker_rows.get(worker_id)
        if row is None or row.status == WorkerStatus.LOST:
            raise NotFound(f"no live worker {worker_id!r}", param="worker_id")
        return row

    def expect_rejoin(self, worker_ids: list[str], timeout_s: float) -> None:
        """After a restart: these workers (from the journal) are lost unless they say hello
        within `timeout_s`."""
        start = time.monotonic() + timeout_s - self.config.worker_timeout_s
        for worker_id in worker_ids:
            self._last_seen[worker_id] = start

    def lose(self, worker_id: str, reason: str) -> None:
        row = self.view.worker_rows.get(worker_id)
        if row is None or row.status == WorkerStatus.LOST:
            return
        log.warning(
            "worker_lost", worker_id=worker_id, reason=reason, num_requests=len(row.request_blocks)
        )
        self._last_seen.pop(worker_id, None)
        self.port.unbind(worker_id)
        # The migrator first (its migrations abort), then the view (no placement on it any
        # more), then the dispatcher (its requests resume elsewhere, or their streams fail).
        if self.migrations is not None:
            self.migrations.on_worker_lost(worker_id)
        self.state.record(WorkerLost(worker_id=worker_id, reason=reason))
        if self.requests is not None:
            self.requests.on_worker_lost(worker_id, reason)

    # ------------------------------------------------------------ tasks

    async def receive_forever(self) -> None:
        while True:
            peer, message, _frames = await self.port.channel.recv()
            try:
                self._handle(peer, message)
            except Exception:  # a handler bug must not stop the receive loop
                log.exception("worker_message_failed", peer=peer, kind=type(message).__name__)

    async def watch_forever(self) -> None:
        """Declare silent workers lost, and those the port found unreachable."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._watch_silence())
            group.create_task(self._watch_unreachable())
            group.create_task(self._watch_disconnects())

    async def _watch_disconnects(self) -> None:
        while True:
            self.lose(await self.port.disconnected(), "connection closed")

    async def _watch_unreachable(self) -> None:
        while True:
            self.lose(await self.port.unreachable.get(), "unreachable")

    async def _watch_silence(self) -> None:
        period = min(0.25, self.config.worker_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            deadline = time.monotonic() - self.config.worker_timeout_s
            for worker_id, seen in list(self._last_seen.items()):
                if seen < deadline:
                    self.lose(worker_id, f"silent for {self.config.worker_timeout_s} s")

    def close(self) -> None:
        for task in self._checks:
            task.cancel()
        self.port.close()

    # ------------------------------------------------------------ messages

    def _handle(self, route: str, message: WorkerMessage) -> None:
        if isinstance(message, Hello):
            self._hello(route, message)
            return
        peer = self.port.worker_at(route)
        row = self.view.worker_rows.get(peer) if peer is not None else None
        if peer is None or row is None or row.status == WorkerStatus.LOST:
            self._ask_rejoin(route)
            return
        self._last_seen[peer] = time.monotonic()
        match message:
            case TokenBatch():
                if self.requests is not None:
                    self.requests.on_token_batch(peer, message)
            case Heartbeat():
                pass
            case LoadReport():
                self._load(peer, row.status, message)
            case RequestFailed():
                if self.requests is not None:
                    self.requests.on_request_failed(peer, message)
            case WorkerFailed(message=text):
                self.lose(peer, f"worker failed: {text}")
            case DrainCompleted(exiting=exiting):
                self._drained(peer, exiting)
            case Reply(call_id=call_id, error=error):
                self.port.calls.resolve(call_id, error)
            case MigratedIn() | MigrationEnded() | BoundariesReport():
                if self.migrations is not None:
                    self.migrations.on_message(peer, message)
            case Hello():
                pass
            case _:
                assert_never(message)

    def _hello(self, route: str, hello: Hello) -> None:
        identity = hello.identity
        peer = identity.worker_id
        if not self.port.authentic(route, hello):
            self._refuse(route, peer, "its hello is not signed with this cluster's secret")
            return
        holder = self.port.route_of(peer)
        if holder is not None and holder != route:
            self._contest(peer, route, hello)
            return
        row = self.view.worker_rows.get(peer)
        known = row is not None and row.boot_id == identity.boot_id
        if row is not None and not known:
            self.lose(peer, "restarted")
        if row is None or not known or row.status == WorkerStatus.LOST:
            self.state.record(WorkerJoined(identity=hello.identity), source=peer)
            log.info(
                "worker_joined",
                worker_id=peer,
                model=identity.model,
                capacity_blocks=identity.capacity_blocks,
                block_size=identity.block_size,
            )
        self._last_seen[peer] = time.monotonic()
        self.port.bind(peer, route)
        self.send(peer, Welcome(gateway_boot_id=self.boot_id, epoch_s=self.config.epoch_s))
        self._reconcile(peer, hello.request_ids)

    def _reconcile(self, peer: str, held: list[str]) -> None:
        """Abort what the worker holds, or the view places on it, that no stream reads."""
        streams = self.requests
        if streams is None:  # no dispatcher (tests of the link alone): only unknown ids
            requests = self.view.requests
            orphans = [r for r in held if r not in requests or requests[r].worker_id != peer]
        else:
            orphans = [r for r in held if streams.worker_of(r) != peer]
            for rid in self.view.requests_on(peer):
                if streams.worker_of(rid) is None:  # its client died with an earlier gateway
                    self.state.record(
                        RequestAborted(request_id=rid, worker_id=peer, reason=RESTART_REASON)
                    )
                    if rid not in orphans:
                        orphans.append(rid)
        if orphans:
            log.info("worker_reconciled", worker_id=peer, aborted=len(orphans))
            self.send(peer, AbortRequest(orphans))

    def _contest(self, worker_id: str, route: str, hello: Hello) -> None:
        """A second connection says hello as `worker_id`: ping the holder, then decide."""
        first = worker_id not in self._contests
        self._contests[worker_id] = (route, hello)  # the newest hello is the one answered
        if first:
            task = asyncio.get_running_loop().create_task(self._check_holder(worker_id))
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)

    async def _check_holder(self, worker_id: str) -> None:
        try:
            await self.ping(worker_id, timeout_s=min(1.0, self.config.worker_timeout_s))
            alive = True
        except Exception:  # no answer, unreachable, or lost meanwhile
            alive = False
        route, hello = self._contests.pop(worker_id)
        if alive:
            self._refuse(route, worker_id, f"worker id {worker_id!r} is held by a live worker")
            return
        self.lose(worker_id, "did not answer while another process said hello with its id")
        self._hello(route, hello)

    def _refuse(self, route: str, worker_id: str, reason: str) -> None:
        log.warning("worker_refused", worker_id=worker_id, reason=reason)
        self.port.send_route(route, Refused(reason))

    def _ask_rejoin(self, route: str) -> None:
        now = time.monotonic()
        if now - self._rejoin_sent.get(route, -_REJOIN_EVERY_S) >= _REJOIN_EVERY_S:
            if len(self._rejoin_sent) > 4096:  # many connections come and go: forget old ones
                self._rejoin_sent = {
                    r: t for r, t in self._rejoin_sent.items() if now - t < _REJOIN_EVERY_S
                }
            self._rejoin_sent[route] = now
            self.port.send_route(route, Rejoin())

    def _load(self, peer: str, status: WorkerStatus, report: LoadReport) -> None:
        if status == WorkerStatus.JOINING and not report.draining:
            self.state.record(WorkerActivated(worker_id=peer), source=peer)
        elif report.draining and status == WorkerStatus.ACTIVE:
            self.state.record(WorkerDrainStarted(worker_id=peer), source=peer)
        self.state.record(LoadReported(worker_id=peer, load=report.load), source=peer)
        self.state.view.note_prefixes(peer, report.prefixes)

    def _drained(self, peer: str, exiting: bool) -> None:
        log.info("worker_drained", worker_id=peer, exiting=exiting)
        if not exiting:
            self.state.record(WorkerDrained(worker_id=peer, exiting=False), source=peer)
            return
        self._last_seen.pop(peer, None)
        self.port.unbind(peer)
        if self.migrations is not None:
            self.migrations.on_worker_lost(peer)
        self.state.record(WorkerDrained(worker_id=peer, exiting=True), source=peer)
        if self.requests is not None:
            self.requests.on_worker_lost(peer, "worker shut down")

    def send_quietly(self, peer: str, message: GatewayMessage) -> None:
        self.port.send_quietly(peer, message)
