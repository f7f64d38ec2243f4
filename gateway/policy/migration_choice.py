"""Adaptive migration choice (MELL §V): KV transfer or token transfer, per move.

A pure function. Each move is either a KV transfer (copy the blocks over the src→dst link:
communication heavy) or a token transfer (send the token ids, the destination re-prefills:
compute heavy). Each epoch has a budget of bytes per link and of re-prefill tokens per
destination (the "communication" and "computation boundaries", measured or from a profile).
Greedy two-bin packing: moves largest first; each tries the cheaper kind, then the other, against
the remaining budgets; a move that fits neither waits for the next epoch (the paper is silent on
this case; waiting keeps the source's copy, so nothing is lost and the next epoch has fresh
budgets). Moves whose policy already fixed the kind ("kv"/"tokens") only try that kind.
A KV transfer larger than a whole epoch's budget may still start on a link that nothing else
uses this epoch (otherwise it could never run; it takes longer, and decoding continues while it
copies). A re-prefill is never oversize: it stalls every request on the destination.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypedDict, Unpack

from mell.gateway.policy.base import Move

Transfer = Literal["kv", "tokens"]  # the kinds a move is chosen as


class Fractions(TypedDict, total=False):
    """The optional float settings of `TransferModel`, by name (for `TransferModel.uniform`)."""

    comm_fraction: float
    prefill_fraction: float
    latency_s: float


@dataclass(frozen=True, slots=True)
class TransferModel:
    """What the choice needs to know about the cluster for one epoch.

    link_of(src, dst) names the link a transfer uses (e.g. "intra:m0" or "inter");
    link_bytes_per_s[link] its bandwidth; prefill_tokens_per_s[dst] (or `default_prefill_tps`)
    the re-prefill speed of a destination; the budgets are these rates times `epoch_s` times
    the fractions migrations may use.
    """

    kv_bytes_per_token: int
    link_of: Callable[[str, str], str]
    link_bytes_per_s: Mapping[str, float]
    prefill_tokens_per_s: Mapping[str, float] = field(default_factory=dict)
    default_prefill_tps: float = 5000.0
    epoch_s: float = 0.25
    comm_fraction: float = 0.5
    prefill_fraction: float = 0.25
    latency_s: float = 0.001

    @classmethod
    def uniform(
        cls,
        kv_bytes_per_token: int,
        bytes_per_s: float,
        prefill_tokens_per_s: float,
        epoch_s: float,
        **kwargs: Unpack[Fractions],
    ) -> TransferModel:
        """One bandwidth for every pair of workers and one re-prefill speed for every
        destination (a single machine, or before the workers' boundaries are measured)."""
        return cls(
            kv_bytes_per_token=kv_bytes_per_token,
            link_of=_same_link,
            link_bytes_per_s={"link": bytes_per_s},
            default_prefill_tps=prefill_tokens_per_s,
            epoch_s=epoch_s,
            **kwargs,
        )

    def prefill_tps(self, dst: str) -> float:
        return self.prefill_tokens_per_s.get(dst, self.default_prefill_tps)

    def kv_seconds(self, src: str, dst: str, tokens: int) -> float:
        bw = self.link_bytes_per_s[self.link_of(src, dst)]
        return self.latency_s + tokens * self.kv_bytes_per_token / bw

    def token_seconds(self, dst: str, tokens: int) -> float:
        return self.latency_s + tokens / self.prefill_tps(dst)


@dataclass(slots=True)
class TransferPlan:
    """The split of one epoch's moves (kinds resolved) and the ones that wait."""

    kv: list[Move] = field(default_factory=list)
    tokens: list[Move] = field(default_factory=list)
    deferred: list[Move] = field(default_factory=list)

    @property
    def chosen(self) -> list[Move]:
        return self.kv + self.tokens


def choose_transfers(
    moves: Sequence[Move], context_tokens: Mapping[str, int], model: TransferModel
) -> TransferPlan:
    """Split `moves` into KV and token transfers within the epoch's budgets, largest context
    first; the moves of one `Move.group` go together or all wait (deferred).

    `context_tokens[request_id]` is the request's current context (prompt + generated): the
    KV to copy or the tokens to re-prefill.
    """
    budgets = _Budgets(model)
    plan = TransferPlan()
    order = sorted(moves, key=lambda m: (-context_tokens.get(m.request_id, 0), m.request_id))
    units: dict[tuple[str, str], list[Move]] = {}  # a group, or one move; by its largest move
    for move in order:
        units.setdefault((move.group, move.group or move.request_id), []).append(move)
    for members in units.values():
        saved = budgets.save() if len(members) > 1 else None
        kinds = [budgets.choose(m, context_tokens.get(m.request_id, 0)) for m in members]
        if saved is not None and None in kinds:
            budgets.restore(saved)
            kinds = [None] * len(members)
        for move, kind in zip(members, kinds, strict=True):
            _record(plan, move, kind)
    return plan


class _Budgets:
    """The epoch's per-link byte budgets and per-destination prefill budgets."""

    def __init__(self, model: TransferModel) -> None:
        self.model = model
        self.link_left: dict[str, float] = {}
        self.link_full: dict[str, float] = {}
        self.prefill_left: dict[str, float] = {}

    def save(self) -> tuple[dict[str, float], dict[str, float]]:
        return dict(self.link_left), dict(self.prefill_left)

    def restore(self, saved: tuple[dict[str, float], dict[str, float]]) -> None:
        self.link_left, self.prefill_left = dict(saved[0]), dict(saved[1])

    def choose(self, move: Move, tokens: int) -> Transfer | None:
        """The kind `move` goes as, its budget spent; None when neither fits."""
        model = self.model
        link = model.link_of(move.src, move.dst)
        if link not in self.link_left:
            self.link_left[link] = (
                model.link_bytes_per_s[link] * model.epoch_s * model.comm_fraction
            )
            self.link_full[link] = self.link_left[link]
        if move.dst not in self.prefill_left:
            self.prefill_left[move.dst] = (
                model.prefill_tps(move.dst) * model.epoch_s * model.prefill_fraction
            )
        nbytes = tokens * model.kv_bytes_per_token
        kv_first = model.kv_seconds(move.src, move.dst, tokens) <= model.token_seconds(
            move.dst, tokens
        )
        kinds = {"kv": ["kv"], "tokens": ["tokens"]}.get(
            move.kind, ["kv", "tokens"] if kv_first else ["tokens", "kv"]
        )
        for kind in kinds:
            if kind == "kv" and _take(self.link_left, link, nbytes, self.link_full[link]):
                return "kv"
            if kind == "tokens" and _take(self.prefill_left, move.dst, tokens, -1.0):
                return "tokens"
        return None


def _record(plan: TransferPlan, move: Move, kind: Transfer | None) -> None:
    if kind is None:
        plan.deferred.append(move)
    else:
        chosen = Move(move.request_id, move.src, move.dst, kind, move.group)
        (plan.kv if kind == "kv" else plan.tokens).append(chosen)


def _take(left: dict[str, float], key: str, amount: float, full: float) -> bool:
    """Spend `amount` of `key`'s budget; an untouched budget accepts one oversize move."""
    if left[key] >= amount or (left[key] == full and full > 0):
        left[key] = max(0.0, left[key] - amount) if left[key] >= amount else -1.0
        return True
    return False


def _same_link(src: str, dst: str) -> str:
    return "link"
