"""Cache-aware placement: the longest cached prefix wins when its worker has room."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pytest
from policy_fakes import FakeView

from mell.gateway.policy.base import (
    Arrival,
    Placement,
    PrefixHit,
    PrefixView,
    make_policy,
    prefix_hits,
)

HASHES = (11, 12, 13)


@dataclass
class CachedView(FakeView):
    """A FakeView whose workers hold cached prefixes (the same answer for any prompt)."""

    hits: dict[str, PrefixHit] = field(default_factory=dict)
    asked: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)

    def prefix_hits(self, model: str, prefix_hashes: Sequence[int]) -> Mapping[str, PrefixHit]:
        self.asked.append((model, tuple(prefix_hashes)))
        return dict(self.hits)


def arrival(blocks: int, hashes: tuple[int, ...] = HASHES) -> Arrival:
    return Arrival("new", "m", blocks * 16 - 1, 8, hashes)


def view(a_used: int, b_used: int, **hits: PrefixHit) -> CachedView:
    # "a" is the fuller worker (best fit's choice), "b" holds the longer prefix
    return CachedView(load={"a": {"x": a_used}, "b": {"y": b_used}, "idle": {}}, hits=dict(hits))


AWARE = [
    ("best-fit", {}),
    ("mell", {"headroom_tokens": 0}),
]


@pytest.mark.parametrize(("name", "opts"), AWARE)
def test_longest_prefix_wins_when_it_has_room(name: str, opts: dict) -> None:
    v = view(70, 40, a=PrefixHit(512, 0), b=PrefixHit(1024, 0))
    assert make_policy(name, prefix_aware=True, **opts).place(v, arrival(20)) == Placement("b")
    assert v.asked == [("m", HASHES)]
    # cache-blind: best fit, and the view is not asked
    blind = view(70, 40, a=PrefixHit(512, 0), b=PrefixHit(1024, 0))
    assert make_policy(name, **opts).place(blind, arrival(20)) == Placement("a")
    assert blind.asked == []


@pytest.mark.parametrize(("name", "opts"), AWARE)
def test_not_when_it_has_no_room(name: str, opts: dict) -> None:
    # b holds the longest prefix but only 15 blocks are free there; a shorter one on a fits
    v = view(50, 85, a=PrefixHit(512, 0), b=PrefixHit(1024, 0))
    assert make_policy(name, prefix_aware=True, **opts).place(v, arrival(20)) == Placement("a")
    v = view(50, 85, b=PrefixHit(1024, 0))  # no other hit: plain best fit (a)
    assert make_policy(name, prefix_aware=True, **opts).place(v, arrival(20)) == Placement("a")


@pytest.mark.parametrize(("name", "opts"), AWARE)
def test_blocks_shared_there_need_no_room(name: str, opts: dict) -> None:
    # 20 blocks, 10 of them held by b's running request: the 15 free blocks there suffice
    v = view(50, 85, b=PrefixHit(160, 10))
    assert make_policy(name, prefix_aware=True, **opts).place(v, arrival(20)) == Placement("b")


@pytest.mark.parametrize(("name", "opts"), AWARE)
def test_an_idle_worker_opened_is_the_one_holding_the_prefix(name: str, opts: dict) -> None:
    v = CachedView(
        load={"a": {"x": 95}, "idle1": {}, "idle2": {}}, hits={"idle2": PrefixHit(512, 0)}
    )
    assert make_policy(name, prefix_aware=True, **opts).place(v, arrival(20)) == Placement("idle2")


def test_views_without_caches_and_arrivals_without_hashes() -> None:
    plain = FakeView(load={"a": {"x": 10}})
    assert not isinstance(plain, PrefixView)
    assert prefix_hits(plain, arrival(2)) == {}
    cached = view(10, 10, a=PrefixHit(512, 0))
    assert isinstance(cached, PrefixView)
    assert prefix_hits(cached, arrival(2, hashes=())) == {} and cached.asked == []
    # a cache-aware policy on a view without caches places like the blind one
    for name, opts in AWARE:
        v = FakeView(load={"a": {"x": 70}, "b": {"y": 40}, "idle": {}})
        got = make_policy(name, prefix_aware=True, **opts).place(v, arrival(20))
        assert got == make_policy(name, **opts).place(v, arrival(20)) == Placement("a")
