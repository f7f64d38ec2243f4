"""The engine contract: all the worker and the migration code may ask of an engine.

`ServingEngine` serves requests: add requests, step, collect outputs, stats, abort. An engine
that holds a KV cache can also move requests to and from another worker: `migratable()` hands
out that side of it, `MigratableEngine` (the KV operations live migration needs), or None for
an engine without KV (`FakeEngine`). `Engine` implements both. Nothing outside `engine/`
sees the block manager, the runner or the KV tensors: only these Protocols.

Sleep and wake: an engine with nothing to do can give its KV memory back (`sleep`) and take it
again (`wake`); a sleeping engine given work (`add_request`, a migration's `reserve` or
`import_request`) wakes first, so no request is lost to sleep.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from mell.common.errors import Conflict
from mell.common.messages import MigratedRequest
from mell.common.sampling import SamplingParams
from mell.common.slo import RequestSLO
from mell.workerd.engine.outputs import EngineStats, RequestOutput

Frame = tuple[int, memoryview]  # some KV blocks of one layer: (number of blocks, their bytes)


class EngineBusy(Conflict):
    """`sleep` refused: the engine holds requests or blocks (the message says what)."""


@dataclass(frozen=True, slots=True)
class KVLayout:
    """How the KV cache is cut into blocks; two workers exchange blocks of equal layouts."""

    num_layers: int
    block_size: int  # tokens per block
    block_bytes: int  # bytes of one block of one layer (keys and values)
    on_host: bool  # the cache is in host memory: `write_kv` may run on any thread

    @property
    def bytes_per_token(self) -> int:
        """K and V bytes of one token over every layer."""
        return self.num_layers * self.block_bytes // self.block_size


@dataclass(frozen=True, slots=True)
class RequestState:
    """A live request as a migration sees it (a snapshot, taken when asked)."""

    num_tokens: int  # prompt and generated
    num_computed: int  # tokens whose K/V are in the cache
    num_preemptions: int  # changes when the request lost its cache or its blocks moved
    is_finished: bool
    is_decoding: bool  # running, everything but the last sampled token in the cache
    kv_on_host: bool  # its KV waits on the host tier (swapped out, parked), not decoding


class ServingEngine(Protocol):
    """Contract A. Called from one thread (the worker's engine loop); no I/O."""

    @property
    def max_model_len(self) -> int:
        """Prompt plus generated tokens a request may reach."""
        ...

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        output_token_ids: Sequence[int] = (),
        slo: RequestSLO | None = None,
    ) -> None:
        """Queue a request; raises InvalidRequest when it cannot run here. `output_token_ids`:
        tokens it already produced elsewhere (a request resumed after its worker died): it
        continues from there, its next output numbered len(output_token_ids). `slo`: its own
        service-level objectives (validated), instead of the engine's defaults."""
        ...

    def abort(self, request_id: str) -> bool:
        """Drop a request and free what it holds; False if it is not here."""
        ...

    def step(self) -> list[RequestOutput]:
        """Run one batch; one output per request that produced tokens."""
        ...

    def has_unfinished(self) -> bool: ...

    def stats(self) -> EngineStats: ...

    def migratable(self) -> MigratableEngine | None:
        """The engine's KV side, for live migration; None when it holds no KV cache."""
        ...

    @property
    def sleeping(self) -> bool:
        """The KV memory is given back (`sleep`), until `wake`."""
        ...

    def sleep(self) -> int:
        """Give the KV memory back to the device (the OS on CPU): the prefix cache is emptied
        first (every cached block evicted, its hash dropped), then the KV storage is dropped.
        The bytes given back (0 when already asleep). Raises EngineBusy, changing nothing,
        while any request is running, queued, swapped or parked, or blocks are held or still
        copied (a migration's reservation, a fenced block)."""
        ...

    def wake(self) -> int:
        """Take the KV memory again (empty); the bytes allocated (0 when awake)."""
        ...


class MigratableEngine(ServingEngine, Protocol):
    """The operations of a live migration (`workerd/migration/`). Blocks are held under a key:
    a request id, or a reservation's key on the destination until it becomes a request. The
    blocks of a key are all in one tier: the device pool, or the host tier of an engine that
    has one (a request swapped out or parked; a reservation the device had no room for). The
    engine knows which; the migration only names the key."""

    @property
    def kv_layout(self) -> KVLayout: ...

    def request_state(self, request_id: str) -> RequestState | None:
        """The live request, or None once finished, aborted or migrated away."""
        ...

    def pause(self, request_id: str) -> bool:
        """Stop scheduling a request, keeping its blocks (in either tier); False if it is
        gone."""
        ...

    def resume(self, request_id: str) -> None:
        """Undo `pause` (a migration aborted): the request decodes on as if nothing happened."""
        ...

    def export_request(self, request_id: str, with_kv: bool) -> MigratedRequest:
        """A paused request as it travels: tokens, sampling state, and how much KV goes along."""
        ...

    def reserve(self, key: str, num_blocks: int) -> bool:
        """Hold `num_blocks` blocks in total under `key`; False (nothing changed) if short.
        Device blocks; host blocks when the device is short at the first stage (the request
        then arrives parked, reloaded when device blocks free up); later stages grow the
        reservation in the tier of its first."""
        ...

    def release(self, key: str) -> int:
        """Free what `key` holds (a reservation, or a migrated-out request's blocks); how many
        blocks it held."""
        ...

    def import_request(self, key: str, request: MigratedRequest) -> None:
        """Commit a migrated-in request: `key`'s reservation (if any) becomes its blocks, and
        it joins the batch (or, its blocks on the host, waits there to be reloaded). Raises
        InvalidRequest when it cannot run here: it is checked as `add_request` checks a new
        request (sampling values, token ids in the vocabulary, lengths), its generated tokens
        as well, and its KV and sampler state."""
        ...

    def block_table(self, key: str, layer: int) -> list[int] | None:
        """The blocks `key` holds in one layer (in its tier), in token order; None when it
        holds none."""
        ...

    def read_kv(self, key: str, layer: int, block_ids: list[int]) -> list[Frame]:
        """Blocks of one layer that `key` holds, as bytes to send; the frames together hold
        `block_ids`, in order. On host memory (a CPU cache, or the host tier, read once the
        layer's copy there has landed) they are views of it: the blocks must not change
        until sent."""
        ...

    def write_kv(
        self, key: str, layer: int, block_ids: list[int], frames: list[memoryview]
    ) -> None:
        """Store blocks of one layer received from a peer into blocks `key` holds, laid out
        as `read_kv` makes them."""
        ...
