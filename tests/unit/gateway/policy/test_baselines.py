from __future__ import annotations

from policy_fakes import FakeView

from mell.gateway.policy.base import Arrival, Move, Placement, Rejection, make_policy


def arrival(blocks: int, rid: str = "new") -> Arrival:
    return Arrival(rid, "m", blocks * 16 - 1, 8)  # exactly `blocks` blocks with the first token


def test_best_fit_picks_fullest_busy_worker_that_fits() -> None:
    view = FakeView(load={"a": {"x": 50}, "b": {"y": 80}, "c": {"z": 95}, "idle": {}})
    assert make_policy("best-fit").place(view, arrival(10)) == Placement("b")


def test_worst_fit_picks_emptiest_busy_worker_not_an_idle_one() -> None:
    view = FakeView(load={"a": {"x": 50}, "b": {"y": 80}, "idle": {}})
    assert make_policy("worst-fit").place(view, arrival(10)) == Placement("a")


def test_fit_policies_open_an_idle_worker_only_when_nothing_fits() -> None:
    view = FakeView(load={"a": {"x": 95}, "idle": {}})
    for name in ("best-fit", "worst-fit", "round-robin", "lb"):
        assert make_policy(name).place(view, arrival(10)) == Placement("idle"), name


def test_request_larger_than_a_worker_is_rejected() -> None:
    view = FakeView(load={"idle": {}})
    assert isinstance(make_policy("best-fit").place(view, arrival(101)), Rejection)


def test_growth_reserve_keeps_room_for_every_request() -> None:
    view = FakeView(load={"a": {f"r{i}": 10 for i in range(8)}, "idle": {}})  # 20 blocks free
    # 8 requests + the new one, 16 tokens (1 block) per epoch for 2 epochs: 18 blocks reserved
    policy = make_policy("best-fit", headroom_tokens=16)
    assert policy.place(view, arrival(2)) == Placement("a")
    assert policy.place(view, arrival(3)) == Placement("idle")


def test_round_robin_cycles_over_busy_workers() -> None:
    view = FakeView(load={"a": {"x": 10}, "b": {"y": 10}, "idle": {}})
    policy = make_policy("round-robin")
    got = [policy.place(view, arrival(1, f"r{i}")).worker_id for i in range(4)]
    assert got == ["a", "b", "a", "b"]


def test_lb_moves_shortest_request_from_least_free_to_most_free() -> None:
    view = FakeView(load={"a": {"big": 60, "small": 30}, "b": {"x": 10}, "idle": {}})
    moves = make_policy("lb").plan_epoch(view, 0.0)
    assert moves == [Move("small", "a", "b", "kv")]


def test_lb_does_not_move_when_it_would_not_shrink_the_gap() -> None:
    view = FakeView(load={"a": {"x": 40, "y": 40}, "b": {"z": 45}})
    assert make_policy("lb").plan_epoch(view, 0.0) == []


def test_baselines_other_than_lb_never_migrate() -> None:
    view = FakeView(load={"a": {"big": 60, "small": 30}, "b": {"x": 10}})
    for name in ("least-loaded", "round-robin", "best-fit", "worst-fit"):
        assert make_policy(name).plan_epoch(view, 0.0) == []
