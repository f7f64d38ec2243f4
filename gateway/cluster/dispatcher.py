"""Mechanism of serving one request: place it, send it, fan its tokens out, end it.

The policy decides where (`place`); the dispatcher records `RequestPlaced` through the cluster
state before `AddRequest` leaves, so back-to-back requests see each other. Token batches from
workers are fanned out to the per-request streams in one pass. `release` is the one place a
request ends: it aborts the request on its worker if the worker has not finished it, records
`RequestFinished` or `RequestAborted`, and writes the request's one lifecycle log line.

When a worker is lost, each of its unfinished requests resumes on another worker of its model
(`_resume`): the prompt and the tokens its stream already holds travel in `AddRequest`, are
prefilled again there, and the stream reads on from the next index (`RequestResumed`). Seeded
sampling continues exactly (the worker's randomness is a function of seed and token index).
Only when no worker can take it does its client see an error.

It sends through a `Send` callable (the worker port's `send`) given at construction; it hears
from workers through the link, which holds it as its `RequestListener`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass

import structlog

from mell.common.errors import (
    ErrorCode,
    InvalidRequest,
    MellError,
    NoCapacity,
    Overloaded,
    RequestAbortedError,
    WorkerLostError,
)
from mell.common.events import (
    RequestAborted,
    RequestAdmitted,
    RequestFinished,
    RequestPlaced,
    RequestResumed,
)
from mell.common.hashing import block_hashes
from mell.common.messages import (
    AbortRequest,
    AddRequest,
    GatewayMessage,
    RequestFailed,
    TokenBatch,
    TokenOutput,
)
from mell.common.sampling import SamplingParams
from mell.common.slo import RequestSLO
from mell.gateway.cluster.metrics import Metrics
from mell.gateway.cluster.state import ClusterState
from mell.gateway.cluster.stream import RequestStream
from mell.gateway.policy.base import (
    Arrival,
    Placement,
    Policy,
    Rejection,
    active_workers,
    arrival_blocks,
    blocks_for_tokens,
    free_blocks,
)

log = structlog.get_logger("mell.gateway")
Send = Callable[[str, GatewayMessage], bool]  # (worker id, message) -> delivered

_ERRORS: dict[str, type[MellError]] = {
    ErrorCode.INVALID_REQUEST.value: InvalidRequest,
    ErrorCode.NO_CAPACITY.value: NoCapacity,
    ErrorCode.ABORTED.value: RequestAbortedError,
}


@dataclass(slots=True)
class Job:
    """A request ready to place: tokenized prompt and sampling parameters."""

    request_id: str
    model: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival: float  # time.monotonic() when the HTTP request arrived
    _: KW_ONLY
    # Choices of one prompt (n > 1) share a group: placed on the worker of the group's first
    # while it has room, so that the worker prefills their prompt once.
    group: str | None = None
    slo: RequestSLO | None = None  # its own SLOs (the body's extension)


class Dispatcher:
    def __init__(
        self,
        state: ClusterState,
        policy: Policy,
        send: Send,
        metrics: Metrics,
        max_in_flight: int,
    ) -> None:
        self.state = state
        self.policy = policy
        self._send = send
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        self.streams: dict[str, RequestStream] = {}
        self.jobs: dict[str, Job] = {}  # what each stream's request was submitted with
        self._groups: dict[str, tuple[str, int]] = {}  # group -> (its worker, requests in flight)

    # ------------------------------------------------------------ requests

    def submit(self, job: Job) -> RequestStream:
        """Place and send a request; Overloaded (429) or NoCapacity (503) when it cannot."""
        if len(self.streams) >= self.max_in_flight:
            raise Overloaded(f"too many requests in flight ({self.max_in_flight}); retry later")
        num_prompt = len(job.prompt_token_ids)
        arrival = Arrival(
            job.request_id,
            job.model,
            num_prompt,
            job.sampling.max_tokens,
            self._prefix_hashes(job.model, job.prompt_token_ids),
        )
        decision = self._with_group(job, arrival) or self.policy.place(self.state.view, arrival)
        if isinstance(decision, Rejection):
            raise NoCapacity(decision.reason)
        worker = self.state.view.worker_rows[decision.worker_id]
        stream = RequestStream(
            job.request_id,
            job.model,
            worker.worker_id,
            num_prompt,
            job.sampling.max_tokens,
            job.arrival,
        )
        self.streams[job.request_id] = stream
        self.jobs[job.request_id] = job
        if job.group is not None:
            worker_id, count = self._groups.get(job.group, (worker.worker_id, 0))
            self._groups[job.group] = (worker_id, count + 1)
        self.state.record(
            RequestPlaced(
                request_id=job.request_id,
                model=job.model,
                worker_id=worker.worker_id,
                num_prompt_tokens=num_prompt,
                max_tokens=job.sampling.max_tokens,
                num_blocks=blocks_for_tokens(num_prompt + 1, worker.block_size),
            )
        )
        log.info(
            "request_placed",
            request_id=job.request_id,
            model=job.model,
            worker_id=worker.worker_id,
            prompt_tokens=num_prompt,
            max_tokens=job.sampling.max_tokens,
        )
        self.metrics.model(job.model).prompt_tokens.inc(num_prompt)
        if not self._send(
            worker.worker_id,
            AddRequest(job.request_id, job.prompt_token_ids, job.sampling, slo=job.slo),
        ):
            stream.fail(WorkerLostError(f"worker {worker.worker_id} is unreachable"))
        return stream

    def _with_group(self, job: Job, arrival: Arrival) -> Placement | None:
        """The worker of the job's group, when it is active and has room for the job."""
        if job.group is None or job.group not in self._groups:
            return None
        worker_id = self._groups[job.group][0]
        for worker in active_workers(self.state.view, job.model):
            if worker.worker_id == worker_id:
                fits = free_blocks(worker) >= arrival_blocks(arrival, worker.block_size)
                return Placement(worker_id) if fits else None
        return None

    def _leave_group(self, group: str) -> None:
        worker_id, count = self._groups.pop(group)
        if count > 1:
            self._groups[group] = (worker_id, count - 1)

    def release(
        self, stream: RequestStream, finish_reason: str | None, reason: str, num_generated: int
    ) -> None:
        """End a request: abort it on its worker if still running, record how it ended."""
        if self.streams.pop(stream.request_id, None) is None:
            return
        job = self.jobs.pop(stream.request_id, None)
        if job is not None and job.group is not None:
            self._leave_group(job.group)
        if not stream.done:
            self._send(stream.worker_id, AbortRequest([stream.request_id]))
        elapsed = time.monotonic() - stream.arrival
        if finish_reason is not None:
            self.metrics.model(stream.model).e2e.observe(elapsed)
            if stream.next_index > 1 and stream.first_token_at:
                per_token = (stream.last_token_at - stream.first_token_at) / (stream.next_index - 1)
                self.metrics.model(stream.model).tpot.observe(per_token)
            self.metrics.model(stream.model).success(finish_reason)
            self.state.record(
                RequestFinished(
                    request_id=stream.request_id,
                    worker_id=stream.worker_id,
                    finish_reason=finish_reason,
                    num_prompt_tokens=stream.num_prompt_tokens,
                    num_generated_tokens=num_generated,
                )
            )
            ttft = stream.first_token_at - stream.arrival if stream.first_token_at else None
            log.info(
                "request_finished",
                request_id=stream.request_id,
                worker_id=stream.worker_id,
                finish_reason=finish_reason,
                prompt_tokens=stream.num_prompt_tokens,
                completion_tokens=num_generated,
                ttft_s=round(ttft, 4) if ttft is not None else None,
                e2e_s=round(elapsed, 4),
            )
        else:
            self.state.record(
                RequestAborted(
                    request_id=stream.request_id, worker_id=stream.worker_id, reason=reason
                )
            )
            log.info(
                "request_aborted",
                request_id=stream.request_id,
                worker_id=stream.worker_id,
                reason=reason,
                completion_tokens=num_generated,
                e2e_s=round(elapsed, 4),
            )

    # ------------------------------------------------------------ from workers

    def on_token_batch(self, worker_id: str, batch: TokenBatch) -> None:
        """Fan one step's outputs out to their streams (one pass, no per-token work)."""
        now = time.monotonic()
        unknown: list[str] = []
        streams = self.streams
        for out in batch.outputs:
            stream = streams.get(out.request_id)
            if stream is not None and stream.prev_worker_id == worker_id:
                stream.push(out)  # sent before it migrated away: index dedupe keeps it once
                continue
            if stream is None or stream.worker_id != worker_id:
                # Nobody waits for it, or it lives elsewhere now (placed again after this
                # worker was declared lost): stop it here.
                if out.finish_reason is None:
                    unknown.append(out.request_id)
                continue
            first = stream.next_index == 0
            if not stream.push(out):
                continue
            m = self.metrics.model(stream.model)
            m.generation_tokens.inc(len(out.token_ids))
            if first:
                stream.first_token_at = now
                m.ttft.observe(now - stream.arrival)
                self.state.record(RequestAdmitted(request_id=out.request_id, worker_id=worker_id))
            else:
                m.itl.observe(now - stream.last_token_at)
            stream.last_token_at = now
        if unknown:  # outputs of requests nobody waits for any more: stop them
            self._send(worker_id, AbortRequest(unknown))

    def migrated(self, request_id: str, src: str, dst: str) -> None:
        """The request now runs on `dst`: its stream follows it."""
        stream = self.streams.get(request_id)
        if stream is not None and stream.worker_id == src:
            stream.prev_worker_id, stream.worker_id = src, dst

    def fill(self, request_id: str, output_token_ids: list[int], num_prompt_tokens: int) -> None:
        """Every token the request produced before it migrated (the destination's word, in
        case some of the source's last outputs are still on their way): the stream takes
        only the indices it has not delivered yet."""
        stream = self.streams.get(request_id)
        if stream is not None and output_token_ids:
            stream.push(TokenOutput(request_id, 0, output_token_ids, None, None, num_prompt_tokens))

    def worker_of(self, request_id: str) -> str | None:
        """The worker the request's stream reads from; None when no stream reads it."""
        stream = self.streams.get(request_id)
        return stream.worker_id if stream is not None else None

    def on_request_failed(self, worker_id: str, msg: RequestFailed) -> None:
        stream = self.streams.get(msg.request_id)
        if stream is not None and stream.worker_id == worker_id:
            stream.fail(_ERRORS.get(msg.code, WorkerLostError)(msg.message))

    def on_worker_lost(self, worker_id: str, reason: str) -> None:
        """Every unfinished request of a lost worker (already recorded lost in the view)
        resumes on another worker of its model; those that none can take end with an error
        (their clients see an error event)."""
        for stream in list(self.streams.values()):
            if stream.worker_id != worker_id or stream.done:
                continue
            why = self._resume(stream)
            if why is not None:
                stream.fail(WorkerLostError(f"worker {worker_id} was lost: {reason}; {why}"))

    def _resume(self, stream: RequestStream) -> str | None:
        """Place the request again with the tokens its stream holds; None when it runs on,
        else why it cannot."""
        job = self.jobs.get(stream.request_id)
        if job is None:
            return "nothing to resume it from"
        outputs = list(stream.token_ids)
        remaining = job.sampling.max_tokens - len(outputs)
        arrival = Arrival(
            job.request_id,
            job.model,
            stream.num_prompt_tokens + len(outputs),
            remaining,
            self._prefix_hashes(job.model, job.prompt_token_ids),
        )
        decision = self.policy.place(self.state.view, arrival)
        if isinstance(decision, Rejection):
            return f"no worker can resume it: {decision.reason}"
        worker = self.state.view.worker_rows[decision.worker_id]
        lost, stream.worker_id, stream.prev_worker_id = stream.worker_id, worker.worker_id, ""
        self.state.record(
            RequestResumed(
                request_id=job.request_id,
                model=job.model,
                lost_worker_id=lost,
                worker_id=worker.worker_id,
                num_prompt_tokens=stream.num_prompt_tokens,
                num_output_tokens=len(outputs),
                max_tokens=job.sampling.max_tokens,
                num_blocks=blocks_for_tokens(arrival.num_prompt_tokens + 1, worker.block_size),
            )
        )
        log.info(
            "request_resumed",
            request_id=job.request_id,
            lost_worker_id=lost,
            worker_id=worker.worker_id,
            num_output_tokens=len(outputs),
        )
        self.metrics.model(job.model).resumed.inc()
        message = AddRequest(job.request_id, job.prompt_token_ids, job.sampling, outputs, job.slo)
        if not self._send(worker.worker_id, message):
            return f"worker {worker.worker_id} is unreachable too"
        return None

    def _prefix_hashes(self, model: str, prompt_token_ids: list[int]) -> tuple[int, ...]:
        """The chained hashes a worker's prefix cache would know the prompt by, for a
        cache-aware policy: full blocks of the model's (common) block size, short of the last
        token (a worker always computes that one). Empty otherwise."""
        if not getattr(self.policy, "prefix_aware", False):
            return ()
        sizes = {w.block_size for w in self.state.view.workers(model)}
        if len(sizes) != 1:
            return ()  # (workers that page differently share no hashes)
        return tuple(block_hashes(prompt_token_ids[:-1], sizes.pop()))

    def abort_all(self, reason: str) -> None:
        for stream in list(self.streams.values()):
            stream.fail(RequestAbortedError(reason))
