"""Cluster events: every change of cluster state, named in the past tense.

An event is a frozen msgspec Struct tagged by its class name; `EventEnvelope` wraps it with its
source (who produced the fact: "gateway" or a worker id), a per-source sequence number and a
wall-clock timestamp. `ClusterView.apply` folds envelopes into the view; the journal stores them
as MessagePack (`encode_envelope` / `decode_envelope`).

A worker's identity and load are the shared structs of `mell.common.workers`, embedded as they
came in `Hello` and `LoadReport`. The events encode as maps of their field names: a journal
written before these structs were embedded (flat `WorkerJoined` / `LoadReported` fields) does not
decode (a missing field), and start-up stops naming the record instead of misreading it.
"""

from __future__ import annotations

import msgspec

from mell.common.workers import RequestLoad, WorkerIdentity, WorkerLoad


class _Event(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    pass


class WorkerJoined(_Event, frozen=True):
    identity: WorkerIdentity

    @property
    def worker_id(self) -> str:
        return self.identity.worker_id


class WorkerActivated(_Event, frozen=True):
    """The worker's first load report arrived: it accepts placements."""

    worker_id: str


class LoadReported(_Event, frozen=True):
    """A worker's load for one epoch (coalesced: one per worker per epoch)."""

    worker_id: str
    load: WorkerLoad

    @property
    def requests(self) -> list[RequestLoad]:
        return self.load.requests


class WorkerDrainStarted(_Event, frozen=True):
    worker_id: str


class WorkerUndrained(_Event, frozen=True):
    worker_id: str


class WorkerDrained(_Event, frozen=True):
    """The worker finished draining; `exiting` when it left the cluster for good."""

    worker_id: str
    exiting: bool


class WorkerLost(_Event, frozen=True):
    worker_id: str
    reason: str


class RequestPlaced(_Event, frozen=True):
    request_id: str
    model: str
    worker_id: str
    num_prompt_tokens: int
    max_tokens: int
    num_blocks: int  # estimate until the worker reports


class RequestResumed(_Event, frozen=True):
    """The request's worker was lost; it continues on `worker_id` from its tokens (the prompt
    and the `num_output_tokens` already delivered, prefilled again there)."""

    request_id: str
    model: str
    lost_worker_id: str
    worker_id: str
    num_prompt_tokens: int
    num_output_tokens: int
    max_tokens: int
    num_blocks: int  # estimate until the worker reports


class RequestAdmitted(_Event, frozen=True):
    """The request's first tokens arrived from its worker."""

    request_id: str
    worker_id: str


class RequestFinished(_Event, frozen=True):
    request_id: str
    worker_id: str
    finish_reason: str  # "stop", "length", "abort" or "error"
    num_prompt_tokens: int
    num_generated_tokens: int


class RequestAborted(_Event, frozen=True):
    request_id: str
    worker_id: str
    reason: str  # "client disconnected", "stop string", "worker lost", ...


class MigrationStarted(_Event, frozen=True):
    migration_id: str
    request_id: str
    src: str
    dst: str
    kind: str  # "kv" or "tokens"


class MigrationCommitted(_Event, frozen=True):
    migration_id: str
    request_id: str
    src: str
    dst: str
    kind: str


class MigrationAborted(_Event, frozen=True):
    migration_id: str
    request_id: str
    src: str
    dst: str
    kind: str
    reason: str


Event = (
    WorkerJoined
    | WorkerActivated
    | LoadReported
    | WorkerDrainStarted
    | WorkerUndrained
    | WorkerDrained
    | WorkerLost
    | RequestPlaced
    | RequestResumed
    | RequestAdmitted
    | RequestFinished
    | RequestAborted
    | MigrationStarted
    | MigrationCommitted
    | MigrationAborted
)


class EventEnvelope(msgspec.Struct, frozen=True, array_like=True):
    """An event with where it came from, its per-source sequence number and when (unix s)."""

    source: str
    seq: int
    ts: float
    event: Event


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(EventEnvelope)


def encode_envelope(envelope: EventEnvelope) -> bytes:
    return _encoder.encode(envelope)


def decode_envelope(data: bytes | memoryview) -> EventEnvelope:
    """Raises msgspec.DecodeError / ValidationError on bad bytes."""
    return _decoder.decode(data)
