"""Messages between the gateway and its workers: one tagged union per direction.

Worker → gateway: `WorkerMessage`; gateway → worker: `GatewayMessage`. Each message is a frozen
msgspec Struct, MessagePack on the wire, tagged by a short name, encoded as an array (small
frames, cheap to decode). Large binary payloads (KV blocks) never sit
inside a message: a `FrameRef` names an extra ZeroMQ frame that travels beside it uncopied.

Messages that expect an answer carry `call_id` (> 0); the answer is a `Reply` with the same id.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec

from mell.common.sampling import SamplingParams, TokenLogprobs
from mell.common.slo import RequestSLO
from mell.common.workers import CachedPrefixes, WorkerIdentity, WorkerLoad

_encoder = msgspec.msgpack.Encoder()


class FrameRef(msgspec.Struct, frozen=True, array_like=True):
    """An extra frame of the same multipart message: index into the frames after the body."""

    index: int
    dtype: str  # numpy dtype string, e.g. "<f2"
    shape: list[int]


# ---------------------------------------------------------------- worker → gateway


class Hello(msgspec.Struct, frozen=True, kw_only=True, array_like=True, tag="hello"):
    """A worker announces itself; sent on start and until the gateway answers `Welcome` (or
    `Refused`). `mac` proves the sender holds the cluster secret: the HMAC of `signed_parts`
    (its connection's route, its identity and `signed_at`, unix s)."""

    identity: WorkerIdentity
    request_ids: list[str] = []  # requests it still holds (after a gateway restart)
    signed_at: float = 0.0
    mac: bytes = b""

    def signed_parts(self, route: str) -> tuple[bytes, bytes, bytes]:
        return route.encode(), _encoder.encode(self.identity), repr(self.signed_at).encode()

    def signed(self, route: str, sign: Callable[..., bytes]) -> Hello:
        """This hello signed now, for the connection `route`, by `sign` (the secret's)."""
        unsigned = msgspec.structs.replace(self, signed_at=time.time(), mac=b"")
        return msgspec.structs.replace(unsigned, mac=sign(*unsigned.signed_parts(route)))


class Heartbeat(msgspec.Struct, frozen=True, array_like=True, tag="hb"):
    """Proof of life from the worker's engine loop."""

    step: int


class TokenOutput(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """New tokens of one request from one engine step; tokens are numbered per request."""

    request_id: str
    first_index: int  # index of token_ids[0] in the request's output
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None  # FinishReason value on the request's last output
    num_prompt_tokens: int
    # With sampling.prompt_logprobs, on the first output: prompt tokens 1.. (token 0 has none).
    prompt_logprobs: list[TokenLogprobs] | None = None
    num_cached_tokens: int = 0  # prompt tokens the worker's prefix cache held


class TokenBatch(msgspec.Struct, frozen=True, array_like=True, tag="tok"):
    """Every request that produced tokens in one engine step: one message per step."""

    step: int
    outputs: list[TokenOutput]


class LoadReport(msgspec.Struct, frozen=True, kw_only=True, array_like=True, tag="load"):
    """A worker's load, once per epoch."""

    load: WorkerLoad
    draining: bool = False
    prefixes: CachedPrefixes | None = None  # None: prefix caching is off on the worker


class RequestFailed(msgspec.Struct, frozen=True, kw_only=True, array_like=True, tag="rfail"):
    """One request could not be served (e.g. its prompt is too long); the worker lives on."""

    request_id: str
    code: str  # an ErrorCode value
    message: str


class WorkerFailed(msgspec.Struct, frozen=True, kw_only=True, array_like=True, tag="wfail"):
    """The worker hit a fatal error and is exiting."""

    code: str
    message: str


class DrainCompleted(msgspec.Struct, frozen=True, array_like=True, tag="drained"):
    """The worker holds no requests after a drain; `exiting` when it is shutting down."""

    exiting: bool


class Reply(msgspec.Struct, frozen=True, kw_only=True, array_like=True, tag="reply"):
    """The answer to a message that carried `call_id`; `error` is None on success."""

    call_id: int
    error: str | None = None


# ---------------------------------------------------------------- gateway → worker


class Welcome(msgspec.Struct, frozen=True, kw_only=True, array_like=True, tag="welcome"):
    """The gateway accepted a worker's hello."""

    gateway_boot_id: str
    epoch_s: float


class Rejoin(msgspec.Struct, frozen=True, array_like=True, tag="rejoin"):
    """The gateway does not know this worker (it restarted): send `Hello` again."""


class Refused(msgspec.Struct, frozen=True, array_like=True, tag="refused"):
    """The gateway will not take this worker (its hello is not signed with the cluster's
    secret, or its worker id belongs to another live worker): it exits."""

    reason: str


class AddRequest(msgspec.Struct, frozen=True, array_like=True, tag="add"):
    """Start generating for a request the gateway placed on this worker. `output_token_ids`:
    what it already produced on a worker that was lost (it resumes here: re-prefilled, its
    next token numbered len(output_token_ids))."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    output_token_ids: list[int] = []
    slo: RequestSLO | None = None  # its own SLOs (the body's extension); None: the worker's


class AbortRequest(msgspec.Struct, frozen=True, array_like=True, tag="abort"):
    """Stop these requests and free their KV blocks; unknown ids are ignored."""

    request_ids: list[str]


class Drain(msgspec.Struct, frozen=True, kw_only=True, array_like=True, tag="drain"):
    """Stop admitting; finish what runs; answer `DrainCompleted` when empty."""

    call_id: int = 0


class Undrain(msgspec.Struct, frozen=True, kw_only=True, array_like=True, tag="undrain"):
    """Admit requests again after a `Drain`."""

    call_id: int = 0


class Ping(msgspec.Struct, frozen=True, kw_only=True, array_like=True, tag="ping"):
    """Answered with `Reply(call_id)` by the worker's engine loop."""

    call_id: int


class Sleep(msgspec.Struct, frozen=True, kw_only=True, array_like=True, tag="sleep"):
    """Give the KV memory back while idle (the worker stays joined). Answered `Reply`, with an
    error and nothing changed while the worker holds a request or a migration; the worker's
    load report says it sleeps, and how many bytes it gave back."""

    call_id: int = 0


class Wake(msgspec.Struct, frozen=True, kw_only=True, array_like=True, tag="wake"):
    """Take the KV memory again. A sleeping worker also wakes by itself when it is given work
    (`AddRequest`, a migration's reservation), before it queues it: no request waits on this."""

    call_id: int = 0


class StartMigration(msgspec.Struct, frozen=True, kw_only=True, array_like=True, tag="migrate"):
    """Move a request from this worker (the source) to `dst`; the worker answers `Reply` at
    once (accepted or why not) and `MigrationEnded` when the protocol is over."""

    call_id: int
    migration_id: str
    request_id: str
    dst_worker_id: str
    dst_address: str  # the destination's data plane
    kind: str  # "kv" or "tokens"


class CancelMigration(msgspec.Struct, frozen=True, array_like=True, tag="unmigrate"):
    """Abort a migration still copying (e.g. its destination was lost); no-op once over."""

    migration_id: str


class PeerAddress(msgspec.Struct, frozen=True, array_like=True):
    worker_id: str
    data_address: str


class MeasurePeers(msgspec.Struct, frozen=True, array_like=True, tag="measure"):
    """Measure the bandwidth to these peers and answer with `BoundariesReport`."""

    peers: list[PeerAddress]


GatewayMessage = (
    Welcome
    | Rejoin
    | Refused
    | AddRequest
    | AbortRequest
    | Drain
    | Undrain
    | Ping
    | Sleep
    | Wake
    | StartMigration
    | CancelMigration
    | MeasurePeers
)


# ---------------------------------------------------------------- migration, worker → gateway


class MigratedIn(msgspec.Struct, frozen=True, kw_only=True, array_like=True, tag="migin"):
    """The destination committed a migrated request; sent before any of its tokens. Carries
    the request's output so far, so the gateway's stream has every index before the next."""

    migration_id: str
    request_id: str
    src_worker_id: str
    output_token_ids: list[int]
    num_prompt_tokens: int


class MigrationEnded(msgspec.Struct, frozen=True, kw_only=True, array_like=True, tag="migend"):
    """The source's last word on a migration: committed (freed here) or aborted (runs here)."""

    migration_id: str
    request_id: str
    committed: bool
    reason: str = ""
    num_blocks: int = 0  # KV blocks copied (kv) or 0 (tokens)
    num_tokens: int = 0  # the request's tokens at the pause
    stall_s: float = 0.0  # how long the request was paused at the source
    copy_s: float = 0.0  # KV stages: first frame sent to the stage's answer, summed
    copy_bytes: int = 0  # KV bytes those stages moved


class BoundariesReport(msgspec.Struct, frozen=True, kw_only=True, array_like=True, tag="bounds"):
    """Migration boundaries measured by a worker: re-prefill speed, bandwidth to each peer."""

    prefill_tokens_per_s: float
    peer_bytes_per_s: dict[str, float] = {}
    kv_bytes_per_token: int = 0  # K and V of every layer


# ---------------------------------------------------------------- migration, worker ↔ worker


class MigratedRequest(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """Everything a destination needs to continue a request exactly where it stopped."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling: SamplingParams
    num_computed: int  # tokens whose K/V travelled (0 for a token transfer: re-prefill)
    generator_state: bytes | None = None  # unused: seeded randomness is f(seed, index)
    slo: RequestSLO | None = None  # its own SLOs, if it came with some


class MigrateReserve(msgspec.Struct, frozen=True, kw_only=True, array_like=True, tag="mres"):
    """Source → destination: hold `num_blocks` blocks in total for this migration."""

    migration_id: str
    stage: int
    num_blocks: int
    reply_to: str  # the source's data address


class MigrateBlocks(msgspec.Struct, frozen=True, kw_only=True, array_like=True, tag="mblk"):
    """Blocks [first, first + n) of one layer of the request, one stage's, in the frames of
    `data`, in order (a frame per run of consecutive blocks at the source; n = Σ shape[0])."""

    migration_id: str
    stage: int
    layer: int
    first: int
    data: list[FrameRef]


class MigrateStageEnd(msgspec.Struct, frozen=True, kw_only=True, array_like=True, tag="mend"):
    migration_id: str
    stage: int
    num_frames: int  # MigrateBlocks sent in this stage


class MigrateCommit(msgspec.Struct, frozen=True, kw_only=True, array_like=True, tag="mcommit"):
    migration_id: str
    src_worker_id: str
    request: MigratedRequest
    reply_to: str


class MigrateAbort(msgspec.Struct, frozen=True, kw_only=True, array_like=True, tag="mabort"):
    migration_id: str
    reason: str


class MigrateAck(msgspec.Struct, frozen=True, kw_only=True, array_like=True, tag="mack"):
    """Destination → source: step `step` ("reserve", "copy", "commit") of `stage` done or not."""

    migration_id: str
    stage: int
    step: str
    ok: bool
    reason: str = ""


class Probe(msgspec.Struct, frozen=True, kw_only=True, array_like=True, tag="probe"):
    """Bandwidth probe: a payload frame; answered by `ProbeAck` to `reply_to`."""

    probe_id: int
    reply_to: str
    data: FrameRef | None = None


class ProbeAck(msgspec.Struct, frozen=True, kw_only=True, array_like=True, tag="probeack"):
    probe_id: int


PeerMessage = (
    MigrateReserve
    | MigrateBlocks
    | MigrateStageEnd
    | MigrateCommit
    | MigrateAbort
    | MigrateAck
    | Probe
    | ProbeAck
)


WorkerMessage = (
    Hello
    | Heartbeat
    | TokenBatch
    | LoadReport
    | RequestFailed
    | WorkerFailed
    | DrainCompleted
    | Reply
    | MigratedIn
    | MigrationEnded
    | BoundariesReport
)
