"""The worker daemon's engine loop: commands in, engine steps, tokens and load out.

Runs on the main thread and reads as a story: receive commands → step the engine → emit one
`TokenBatch` for every request that produced tokens → report load once per epoch. The loop is
the liveness signal: heartbeats and systemd watchdog pings come from it, never from a timer
thread. Per-request errors go back as `RequestFailed`; an engine error is fatal (`WorkerFailed`,
exit 1), because the device state is then in doubt and systemd restarts the worker.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Sequence
from typing import Protocol, assert_never

import structlog

from mell.common.config import WorkerConfig
from mell.common.errors import ErrorCode, MellError
from mell.common.ids import new_boot_id
from mell.common.messages import (
    AbortRequest,
    AddRequest,
    CancelMigration,
    Drain,
    DrainCompleted,
    GatewayMessage,
    Heartbeat,
    Hello,
    LoadReport,
    MeasurePeers,
    PeerMessage,
    Ping,
    Probe,
    ProbeAck,
    Refused,
    Rejoin,
    Reply,
    RequestFailed,
    Sleep,
    StartMigration,
    TokenBatch,
    TokenOutput,
    Undrain,
    Wake,
    Welcome,
    WorkerFailed,
    WorkerMessage,
)
from mell.common.notify import Notifier
from mell.common.workers import CachedPrefixes, RequestLoad, WorkerIdentity, WorkerLoad
from mell.transport.codec import Buffer
from mell.workerd.engine.contract import EngineBusy, MigratableEngine, ServingEngine
from mell.workerd.io import PeerInput
from mell.workerd.migration.boundaries import (
    Boundaries,
    kv_bytes_per_token,
    measure_prefill_tokens_per_s,
)
from mell.workerd.migration.hub import MigrationHub

log = structlog.get_logger("mell.workerd")


class Link(Protocol):
    """The worker's sockets (`io.WorkerIO`): the gateway, and other workers' data planes."""

    inbox: queue.Queue[GatewayMessage | PeerInput]
    data_address: str
    # (message, frames, received_at) -> True when handled on the I/O thread, not queued
    take_on_io_thread: Callable[[PeerMessage, list[memoryview], float], bool] | None

    def send(self, message: WorkerMessage) -> None: ...

    def sign(self, hello: Hello) -> Hello:
        """The hello signed with the cluster secret for this connection."""
        ...

    def send_peer(
        self, address: str, message: PeerMessage, buffers: Sequence[Buffer] = ()
    ) -> None: ...


class _Port:
    """The migration machines' way out: peers' data planes and the gateway, via the link."""

    def __init__(self, link: Link) -> None:
        self.link = link

    def to_peer(
        self, address: str, message: PeerMessage, buffers: Sequence[Buffer] | None = None
    ) -> None:
        self.link.send_peer(address, message, buffers or ())

    def to_gateway(self, message: WorkerMessage) -> None:
        self.link.send(message)


class Worker:
    """One engine behind one gateway link."""

    def __init__(
        self,
        config: WorkerConfig,
        engine: ServingEngine,
        link: Link,
        model_name: str,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.link = link
        self.model_name = model_name
        self.notifier = notifier or Notifier()
        self.boot_id = new_boot_id()
        self.welcomed = False
        self.refused: str | None = None  # why the gateway will not take this worker
        self.draining = False
        self._sleeping = False  # as last reported
        self.stop_deadline: float | None = None  # set by SIGTERM: drain, then exit by this time
        self._tokens: dict[str, int] = {}  # request id -> prompt + generated tokens
        self._step = 0
        self._drain_reported = False
        self._next_load = 0.0
        self._next_heartbeat = 0.0
        self._load_interval_s = config.load_report_interval_s  # the gateway's epoch, once known
        # Live migration needs an engine with a KV cache (not the fake one).
        self.migrations: MigrationHub | None = None
        self.boundaries: Boundaries | None = None
        kv_engine = engine.migratable()
        if kv_engine is not None:
            self._start_migrations(kv_engine)

    def _start_migrations(self, engine: MigratableEngine) -> None:
        port = _Port(self.link)
        self.migrations = MigrationHub(
            engine,
            port,
            self.config.worker_id,
            self.link.data_address,
            accepting=lambda: not self.draining,
            moved_out=self._moved_out,
            moved_in=self._moved_in,
        )
        if engine.kv_layout.on_host:
            # KV lands in the cache as it arrives, not between the engine's steps (CPU
            # only: on CUDA the copy to the device stays on the engine thread's stream)
            self.link.take_on_io_thread = self.migrations.take_blocks
        self.boundaries = Boundaries(port, self.link.data_address, 0.0, kv_bytes_per_token(engine))

    # ------------------------------------------------------------ lifecycle

    def run(self) -> int:
        """Join the gateway, serve until stopped; the process exit code."""
        if self.boundaries is not None:
            self.boundaries.prefill_tokens_per_s = measure_prefill_tokens_per_s(self.engine)
        if not self._join():
            if self.refused is not None:
                log.error("worker_refused", gateway=self.config.gateway, reason=self.refused)
                return 2
            log.error("gateway_unreachable", gateway=self.config.gateway)
            return 1
        self.notifier.ready(f"serving {self.model_name}")
        try:
            while not self._finished():
                self._receive(block=not self.engine.has_unfinished())
                self._poll_migrations()
                started = time.monotonic()
                if self._run_step() and self.config.min_step_ms > 0:
                    self._wait_until(started + self.config.min_step_ms / 1000.0)
                self._report()
        except Exception as err:  # the engine's state is in doubt: report and exit
            log.exception("worker_failed")
            self.link.send(WorkerFailed(code=ErrorCode.INTERNAL.value, message=repr(err)))
            return 1
        self.notifier.stopping()
        if self.refused is not None:
            log.error("worker_refused", gateway=self.config.gateway, reason=self.refused)
            return 2
        return 0

    def request_stop(self) -> None:
        """SIGTERM: stop admitting, finish running requests within the grace period, exit 0."""
        if self.stop_deadline is None:
            self.stop_deadline = time.monotonic() + self.config.drain_grace_s
            self.draining = True
            log.info(
                "worker_stopping", grace_s=self.config.drain_grace_s, num_requests=len(self._tokens)
            )

    def _join(self) -> bool:
        deadline = time.monotonic() + self.config.hello_timeout_s
        while not self.welcomed:
            if time.monotonic() > deadline or self.stop_deadline is not None:
                return False
            if self.refused is not None:
                return False
            self.link.send(self._hello())
            self._receive(block=True, timeout_s=1.0)
        return True

    def _hello(self) -> Hello:
        stats = self.engine.stats()
        identity = WorkerIdentity(
            worker_id=self.config.worker_id,
            boot_id=self.boot_id,
            model=self.model_name,
            capacity_blocks=stats.num_total_blocks,
            block_size=stats.block_size,
            max_model_len=self.engine.max_model_len,
            data_address=self.link.data_address,
            sleep_after_s=self.config.sleep_after_s,
        )
        return self.link.sign(Hello(identity=identity, request_ids=list(self._tokens)))

    def _finished(self) -> bool:
        if self.refused is not None:
            self._abort_all("the gateway refused this worker")
            return True
        if self.stop_deadline is None:
            return False
        if not self._tokens:
            self._report_drained(exiting=True)
            return True
        if time.monotonic() >= self.stop_deadline:
            self._abort_all("drain grace period over")
            self._report_drained(exiting=True)
            return True
        return False

    # ------------------------------------------------------------ commands

    def _receive(self, block: bool, timeout_s: float | None = None) -> None:
        if block:
            wait = timeout_s if timeout_s is not None else self._idle_wait()
            try:
                self._handle(self.link.inbox.get(timeout=wait))
            except queue.Empty:
                return
        while True:
            try:
                self._handle(self.link.inbox.get_nowait())
            except queue.Empty:
                return

    def _wait_until(self, deadline: float) -> None:
        """Handle messages until `deadline` (the rest of a step paced by `min_step_ms`)."""
        while (left := deadline - time.monotonic()) > 0:
            self._receive(block=True, timeout_s=left)
            self._poll_migrations()

    def _idle_wait(self) -> float:
        now = time.monotonic()
        if (self.migrations is not None and self.migrations.busy) or (
            self.boundaries is not None and self.boundaries.measuring
        ):
            return 0.005  # deadlines to watch
        return max(0.0, min(self._next_load, self._next_heartbeat) - now) + 0.001

    def _handle(self, message: GatewayMessage | PeerInput) -> None:
        self._dispatch(message)
        self._note_sleep(type(message).__name__)  # (work given to a sleeping engine wakes it)

    def _dispatch(self, message: GatewayMessage | PeerInput) -> None:
        match message:
            case AddRequest():
                self._add(message)
            case AbortRequest(request_ids=ids):
                for request_id in ids:
                    if self.engine.abort(request_id):
                        self._tokens.pop(request_id, None)
            case Drain(call_id=call_id):
                self.draining = True
                self._drain_reported = False
                self._reply(call_id)
            case Undrain(call_id=call_id):
                if self.stop_deadline is None:
                    self.draining = False
                self._reply(call_id)
            case Ping(call_id=call_id):
                self._reply(call_id)
            case Sleep(call_id=call_id):
                error = self._sleep()
                self._note_sleep("Sleep")
                if call_id:
                    self.link.send(Reply(call_id=call_id, error=error))
            case Wake(call_id=call_id):
                self.engine.wake()
                self._note_sleep("Wake")
                self._reply(call_id)
            case Welcome(epoch_s=epoch_s):
                self.welcomed = True
                if epoch_s > 0:  # one load report per gateway epoch
                    self._load_interval_s = epoch_s
                self._next_load = 0.0  # report at once: the report activates this worker
            case Rejoin():
                self.link.send(self._hello())
            case Refused(reason=reason):
                self.refused = reason
            case StartMigration():
                self._start_migration(message)
            case CancelMigration(migration_id=mid):
                if self.migrations is not None:
                    self.migrations.cancel(mid, "cancelled by the gateway")
            case MeasurePeers(peers=peers):
                if self.boundaries is not None:
                    self.boundaries.measure(peers, time.monotonic())
            case PeerInput(message=Probe() as probe):
                if self.boundaries is not None:
                    self.boundaries.on_probe(probe)
            case PeerInput(message=ProbeAck() as ack):
                if self.boundaries is not None:
                    self.boundaries.on_ack(ack)
            case PeerInput(message=peer_message, frames=frames, received_at=at):
                if self.migrations is not None:  # times from arrival, not from this loop
                    self.migrations.handle(peer_message, frames, at or None)
            case _:
                assert_never(message)

    # ------------------------------------------------------------ sleep and wake

    def _sleep(self) -> str | None:
        """Give the KV memory back; why not when it cannot (None: asleep)."""
        if self.migrations is not None and self.migrations.busy:
            return "cannot sleep: a migration is in flight"
        try:
            self.engine.sleep()
        except EngineBusy as err:
            return err.message
        return None

    def _note_sleep(self, cause: str) -> None:
        """When the engine slept or woke since the last note: log it and send a load report
        at once (before any reply), so the gateway's view shows it."""
        sleeping = self.engine.sleeping
        if sleeping == self._sleeping:
            return
        self._sleeping = sleeping
        log.info("worker_slept" if sleeping else "worker_woke", cause=cause,
                 kv_bytes=self.engine.stats().kv_bytes_released)  # fmt: skip
        self.link.send(self._load_report())

    # ------------------------------------------------------------ migration

    def _start_migration(self, start: StartMigration) -> None:
        if self.migrations is None:
            error: str | None = "this worker cannot migrate requests (no KV engine)"
        else:
            error = self.migrations.start(start)
        self.link.send(Reply(call_id=start.call_id, error=error))

    def _poll_migrations(self) -> None:
        now = time.monotonic()
        if self.migrations is not None:
            self.migrations.poll(now)
        if self.boundaries is not None:
            self.boundaries.poll(now)

    def _moved_out(self, request_id: str) -> None:
        self._tokens.pop(request_id, None)

    def _moved_in(self, request_id: str, num_tokens: int) -> None:
        self._tokens[request_id] = num_tokens

    def _add(self, message: AddRequest) -> None:
        if self.draining:
            self._fail(message.request_id, ErrorCode.NO_CAPACITY, "worker is draining")
            return
        try:
            self.engine.add_request(
                message.request_id,
                message.prompt_token_ids,
                message.sampling.validate(),
                message.output_token_ids,
                message.slo,
            )
        except MellError as err:
            self._fail(message.request_id, err.code, err.message)
            return
        except Exception as err:  # one request's problem, not the worker's
            log.exception("add_request_failed", request_id=message.request_id)
            self._fail(message.request_id, ErrorCode.INTERNAL, f"cannot start request: {err!r}")
            return
        self._tokens[message.request_id] = len(message.prompt_token_ids) + len(
            message.output_token_ids
        )
        if message.output_token_ids:
            log.info(
                "request_resumed",
                request_id=message.request_id,
                num_output_tokens=len(message.output_token_ids),
            )

    def _reply(self, call_id: int) -> None:
        if call_id:
            self.link.send(Reply(call_id=call_id))

    def _fail(self, request_id: str, code: ErrorCode, message: str) -> None:
        log.info("request_rejected", request_id=request_id, code=code.value, reason=message)
        self.link.send(RequestFailed(request_id=request_id, code=code.value, message=message))

    def _abort_all(self, reason: str) -> None:
        for request_id in list(self._tokens):
            self.engine.abort(request_id)
            self._fail(request_id, ErrorCode.ABORTED, reason)
        self._tokens.clear()

    # ------------------------------------------------------------ step and emit

    def _run_step(self) -> bool:
        """One engine step, its tokens sent to the gateway; False when it produced none."""
        outputs = self.engine.step()
        if not outputs:
            return False
        self._step += 1
        batch = []
        for out in outputs:
            batch.append(
                TokenOutput(
                    out.request_id,
                    out.first_index,
                    out.new_token_ids,
                    out.logprobs,
                    out.finish_reason.value if out.finish_reason is not None else None,
                    out.num_prompt_tokens,
                    out.prompt_logprobs,
                    out.num_cached_tokens,
                )
            )
            if out.finish_reason is not None:
                self._tokens.pop(out.request_id, None)
            elif out.request_id in self._tokens:
                self._tokens[out.request_id] += len(out.new_token_ids)
        self.link.send(TokenBatch(self._step, batch))
        return True

    def _report(self) -> None:
        now = time.monotonic()
        self.notifier.watchdog(now)
        if now >= self._next_load:
            self._next_load = now + self._load_interval_s
            self._next_heartbeat = now + self.config.heartbeat_interval_s
            self.link.send(self._load_report())
        elif now >= self._next_heartbeat:
            self._next_heartbeat = now + self.config.heartbeat_interval_s
            self.link.send(Heartbeat(self._step))
        if self.draining and not self._tokens and self.stop_deadline is None:
            self._report_drained(exiting=False)

    def _load_report(self) -> LoadReport:
        """The engine's stats whole, with the requests this worker holds (their blocks as the
        engine counts them, their tokens as this loop does) and its prefix cache summary."""
        stats = self.engine.stats()
        requests = [
            RequestLoad(rid, stats.request_blocks.get(rid, 0), num_tokens)
            for rid, num_tokens in self._tokens.items()
        ]
        load = WorkerLoad.of(stats, requests)
        prefixes = None
        if self.config.engine.enable_prefix_caching:
            prefixes = CachedPrefixes(*stats.cached_hashes)
        return LoadReport(load=load, draining=self.draining, prefixes=prefixes)

    def _report_drained(self, exiting: bool) -> None:
        if not self._drain_reported:
            self._drain_reported = True
            self.link.send(self._load_report())
            self.link.send(DrainCompleted(exiting))
