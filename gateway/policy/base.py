"""Contract C: the cluster policy interface and the policy registry.

A policy decides; it never acts. `place` answers one arrival, `plan_epoch` returns the moves of
one epoch. Policies do no I/O, read no clock and never mutate the view. They may keep private
memory derived from what they have seen (activation order, bundles), but the view is the truth:
requests and workers missing from it are forgotten, new ones are adopted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Literal, Protocol, runtime_checkable

from mell.common.errors import InvalidRequest


class WorkerStatus(IntEnum):
    """Lifecycle of a worker as the view sees it; only ACTIVE accepts placements and moves."""

    JOINING = 0
    ACTIVE = 1
    DRAINING = 2
    LOST = 3


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """One worker as the policy sees it: capacity and the KV blocks each request holds."""

    worker_id: str
    model: str
    status: WorkerStatus
    capacity_blocks: int
    block_size: int
    request_blocks: Mapping[str, int]  # request id -> current KV blocks (placed ones included)
    num_free_blocks: int  # capacity - sum(request_blocks), may be reported
    sleeping: bool = False  # its KV memory is given back; a placement on it wakes it


class PolicyView(Protocol):
    """Read-only cluster state a policy decides on (the gateway's ClusterView, the simulator)."""

    def models(self) -> Sequence[str]: ...

    def workers(self, model: str) -> Sequence[WorkerInfo]:  # every non-LOST worker of the model
        ...


@dataclass(frozen=True, slots=True)
class PrefixHit:
    """What one worker holds of a prompt's prefix: the leading prompt tokens whose KV it has
    cached (their prefill is skipped there), and how many of those tokens' KV blocks running
    requests hold (the new request shares them: they take no new room there). Cached blocks
    no running request holds are free capacity already, so they do not lower the room needed."""

    tokens: int
    shared_blocks: int


@runtime_checkable
class PrefixView(Protocol):
    """A view that knows where prompt prefixes are cached (the simulator's cache model; later
    the gateway's ClusterView from the workers' load reports). Pure: a query changes nothing."""

    def prefix_hits(self, model: str, prefix_hashes: Sequence[int]) -> Mapping[str, PrefixHit]:
        """Per worker of `model` holding at least the first block: its hit for a prompt whose
        full blocks have the chained hashes `prefix_hashes` (`mell.common.hashing`)."""
        ...


@dataclass(frozen=True, slots=True)
class Arrival:
    """A new request to place."""

    request_id: str
    model: str
    num_prompt_tokens: int
    max_tokens: int
    prefix_hashes: tuple[int, ...] = ()  # chained hashes of the prompt's full blocks, if known


@dataclass(frozen=True, slots=True)
class Placement:
    worker_id: str


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: str


MoveKind = Literal["kv", "tokens", "auto"]


@dataclass(frozen=True, slots=True)
class Move:
    """Migrate a running request from worker `src` to worker `dst`.

    `kind` "auto" means the policy leaves KV-vs-token to the migration choice
    (`mell.gateway.policy.migration_choice.choose_transfers`). Moves of one non-empty `group`
    are chosen all or none (the moves that empty a worker: part of them releases nothing).
    """

    request_id: str
    src: str
    dst: str
    kind: MoveKind = "auto"
    group: str = ""


@runtime_checkable
class Policy(Protocol):
    name: str

    def place(self, view: PolicyView, arrival: Arrival) -> Placement | Rejection: ...

    def plan_epoch(self, view: PolicyView, now: float) -> list[Move]: ...


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    """KV blocks holding `num_tokens` tokens."""
    return -(-num_tokens // block_size)


def arrival_blocks(arrival: Arrival, block_size: int) -> int:
    """KV blocks a new request needs at admission: its prompt plus the first generated token."""
    return blocks_for_tokens(arrival.num_prompt_tokens + 1, block_size)


def prefix_hits(view: PolicyView, arrival: Arrival) -> Mapping[str, PrefixHit]:
    """Where the arrival's prefix is cached, per worker (empty when the view does not know or
    the arrival has no hashes). For cache-aware policies; cache-blind ones never call it."""
    if not arrival.prefix_hashes or not isinstance(view, PrefixView):
        return {}
    return view.prefix_hits(arrival.model, arrival.prefix_hashes)


def longest_prefix_first(hits: Mapping[str, PrefixHit]) -> list[tuple[str, PrefixHit]]:
    """The workers holding a cached prefix, the longest first (ties: by worker id)."""
    return sorted(
        ((w, h) for w, h in hits.items() if h.tokens > 0), key=lambda p: (-p[1].tokens, p[0])
    )


_ACTIVE = WorkerStatus.ACTIVE  # a module constant: enum attribute lookups are slow in hot loops


def active_workers(view: PolicyView, model: str) -> list[WorkerInfo]:
    """The workers of `model` that accept placements, in the view's order."""
    active = _ACTIVE
    return [w for w in view.workers(model) if w.status is active or w.status == active]


def free_blocks(worker: WorkerInfo) -> int:
    """Free KV blocks of a worker as the view reports them.

    Policies trust `num_free_blocks` (summing `request_blocks` on every decision is too slow for
    the simulator); a view must keep it at most `capacity_blocks - sum(request_blocks)`.
    """
    return worker.num_free_blocks


_REGISTRY: dict[str, Callable[..., Policy]] = {}


def register_policy(name: str) -> Callable[[Callable[..., Policy]], Callable[..., Policy]]:
    """Class decorator adding a policy factory to the registry under `name`."""

    def add(factory: Callable[..., Policy]) -> Callable[..., Policy]:
        _REGISTRY[name] = factory
        return factory

    return add


PREFIX_AWARE_POLICIES = ("least-loaded", "best-fit", "worst-fit", "mell")  # take `prefix_aware`


def policy_names() -> list[str]:
    _load_builtin_policies()
    return sorted(_REGISTRY)


def make_policy(name: str, **options: Any) -> Policy:
    """A new policy object by registry name: least-loaded, round-robin, best-fit, worst-fit, lb,
    mell. Options are passed to its constructor (e.g. `headroom_epochs` for mell)."""
    _load_builtin_policies()
    try:
        factory = _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise InvalidRequest(f"unknown policy {name!r}; known: {known}", param="policy") from None
    try:
        return factory(**options)
    except TypeError as err:
        raise InvalidRequest(f"bad options for policy {name!r}: {err}", param="policy") from None


def _load_builtin_policies() -> None:
    # Imported here: the policy modules import this one.
    import importlib
    import importlib.util

    for module in ("baselines", "mell"):
        name = f"mell.gateway.policy.{module}"
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
