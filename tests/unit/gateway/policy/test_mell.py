from __future__ import annotations

from packing_world import World

from mell.gateway.policy.base import (
    Arrival,
    Move,
    Placement,
    Rejection,
    WorkerStatus,
    make_policy,
)
from mell.gateway.policy.mell import TINY, L, M, S, T, size_class


def arrival(blocks: int, rid: str) -> Arrival:
    return Arrival(rid, "m", blocks * 16 - 1, 8)


def test_size_classes_follow_the_paper() -> None:
    c = 120
    assert [size_class(b, c) for b in (61, 60, 41, 40, 31, 30, 16, 15)] == [
        L,
        M,
        M,
        S,
        S,
        T,
        T,
        TINY,
    ]


def test_large_arrival_pulls_a_companion_at_the_next_epoch() -> None:
    world = World(capacity=120, num_workers=4)
    policy = make_policy("mell", headroom_tokens=0)
    world.load["w000"] = {"m1": 45, "m2": 45}  # two M-GPUs, full enough that no L fits
    world.load["w001"] = {"m3": 45, "m4": 44}
    policy.plan_epoch(world, 0.0)
    got = policy.place(world, arrival(70, "big"))
    assert isinstance(got, Placement)
    world.place(got, "big", 70)
    moves = policy.plan_epoch(world, 1.0)
    world.apply(moves)
    assert any(m.dst == got.worker_id for m in moves)  # an M joined the L
    assert all(world.used(w) <= 120 for w in world.load)
    assert len(world.busy()) == 3  # L+M on a new worker; the other three M stay on two


def test_departure_refills_from_the_most_recently_activated_worker() -> None:
    world = World(capacity=100, num_workers=3)
    policy = make_policy("mell", headroom_tokens=0)
    world.load["w000"] = {f"a{i}": 10 for i in range(9)}
    policy.plan_epoch(world, 0.0)
    world.load["w001"] = {"b0": 10, "b1": 10}  # activated later: the newest T-GPU
    policy.plan_epoch(world, 1.0)
    for i in range(3):
        del world.load["w000"][f"a{i}"]  # w000 falls to 60%
    moves = policy.plan_epoch(world, 2.0)
    assert {(m.src, m.dst) for m in moves} == {("w001", "w000")}
    world.apply(moves)
    assert world.busy() == ["w000"]


def test_view_is_the_truth_lost_workers_and_vanished_requests() -> None:
    world = World(capacity=100, num_workers=3)
    policy = make_policy("mell", headroom_tokens=0)
    for i in range(3):
        got = policy.place(world, arrival(30, f"r{i}"))
        world.place(got, f"r{i}", 30)
    policy.plan_epoch(world, 0.0)
    lost = world.where("r0")
    world.status[lost] = WorkerStatus.LOST
    world.load[lost] = {}
    moves = policy.plan_epoch(world, 1.0)
    assert all(lost not in (m.src, m.dst) for m in moves)
    got = policy.place(world, arrival(10, "x"))
    assert isinstance(got, Placement) and got.worker_id != lost


def test_draining_worker_is_evacuated_and_gets_no_placements() -> None:
    world = World(capacity=100, num_workers=3)
    policy = make_policy("mell", headroom_tokens=0)
    world.load["w000"] = {"a": 30, "b": 20}
    world.status["w000"] = WorkerStatus.DRAINING
    moves = policy.plan_epoch(world, 0.0)
    assert sorted(m.request_id for m in moves) == ["a", "b"]
    assert all(m.src == "w000" and m.dst != "w000" for m in moves)
    got = policy.place(world, arrival(10, "c"))
    assert isinstance(got, Placement) and got.worker_id != "w000"


def test_overload_from_growth_evicts_the_smallest_fitting_item() -> None:
    world = World(capacity=100, num_workers=3)
    policy = make_policy("mell", headroom_tokens=16)  # 1 block per request per epoch
    world.load["w000"] = {"big": 80, "mid": 12, "small": 5}
    moves = policy.plan_epoch(world, 0.0)
    assert [m.request_id for m in moves] == ["small"]


def test_no_active_worker_is_a_rejection_and_view_is_not_mutated() -> None:
    world = World(capacity=100, num_workers=1)
    world.status["w000"] = WorkerStatus.DRAINING
    before = repr(world.load)
    assert isinstance(make_policy("mell").place(world, arrival(10, "r")), Rejection)
    make_policy("mell").plan_epoch(world, 0.0)
    assert repr(world.load) == before


def test_redundant_moves_are_pruned_within_an_epoch() -> None:
    # whatever the operations did, a request appears in at most one move, never src == dst
    world = World(capacity=100, num_workers=8)
    policy = make_policy("mell", headroom_tokens=16)
    sizes = [55, 40, 35, 30, 20, 12, 8, 5, 5, 3]
    for i, b in enumerate(sizes):
        got = policy.place(world, arrival(b, f"r{i}"))
        world.place(got, f"r{i}", b)
    for rid in ("r1", "r4", "r6"):
        del world.load[world.where(rid)][rid]
    moves = policy.plan_epoch(world, 0.0)
    ids = [m.request_id for m in moves]
    assert len(ids) == len(set(ids))
    assert all(m.src != m.dst and world.where(m.request_id) == m.src for m in moves)


def test_large_departure_releases_its_worker_only_when_the_rest_fits_elsewhere() -> None:
    world = World(capacity=100, num_workers=4)
    policy = make_policy("mell", headroom_tokens=0)
    world.load["w000"] = {"big": 60, "t1": 10, "t2": 8}
    world.load["w001"] = {"x": 70}
    policy.plan_epoch(world, 0.0)
    policy.plan_epoch(world, 1.0)  # everyone settled
    del world.load["w000"]["big"]
    moves = policy.plan_epoch(world, 2.0)
    assert sorted((m.request_id, m.dst) for m in moves) == [("t1", "w001"), ("t2", "w001")]
    world.apply(moves)
    assert world.busy() == ["w001"]


def test_fresh_requests_are_not_refill_material() -> None:
    world = World(capacity=100, num_workers=3)
    policy = make_policy("mell", headroom_tokens=0)
    world.load["w000"] = {f"a{i}": 10 for i in range(9)}
    policy.plan_epoch(world, 0.0)
    got = policy.place(world, arrival(10, "fresh"))  # w000 has room: best fit
    world.place(got, "fresh", 10)
    world.load["w001"] = {"b0": 10}
    for i in range(4):
        del world.load["w000"][f"a{i}"]
    moves = policy.plan_epoch(world, 1.0)
    assert all(m.request_id != "fresh" for m in moves)


def test_arrivals_avoid_stacking_prefills_on_one_worker() -> None:
    # Within one epoch a 70% prompt opens a worker; the next, 20% arrival fits best there, but
    # that worker is busy prefilling 70% of C: with prefill_share=0.5 it goes to the half-full
    # worker instead, by default (prefill_share=0) to the best fit. No worker is opened.
    for share in (0.5, 0.0):
        world = World(capacity=100, num_workers=4)
        options = {"prefill_share": share} if share else {}
        policy = make_policy("mell", headroom_tokens=0, **options)
        world.load["w000"] = {"old": 50}
        policy.plan_epoch(world, 0.0)
        first = policy.place(world, arrival(70, "fresh"))
        assert isinstance(first, Placement) and first.worker_id != "w000"
        world.place(first, "fresh", 70)
        got = policy.place(world, arrival(20, "next"))
        assert isinstance(got, Placement)
        assert got.worker_id == ("w000" if share else first.worker_id), share


def test_consolidation_empties_the_emptiest_worker_into_the_others_gaps() -> None:
    # An older T-GPU holds one item, the newest three: with the paper's operations alone (no
    # repair) nothing moves; consolidation moves the lone item and frees its worker.
    for consolidate, busy in ((0, 2), (4, 1)):
        world = World(capacity=100, num_workers=4)
        policy = make_policy(
            "mell", headroom_tokens=0, repairs_per_epoch=0, consolidate=consolidate
        )
        world.load["w000"] = {"t1": 20}
        policy.plan_epoch(world, 0.0)
        world.load["w001"] = {"u1": 20, "u2": 20, "u3": 20}
        moves = policy.plan_epoch(world, 1.0)
        world.apply(moves)
        assert len(world.busy()) == busy
        if consolidate:  # one all-or-none group: part of it would free nothing
            assert moves == [Move("t1", "w000", "w001", group="empty:w000")]


def test_consolidation_moves_all_or_nothing() -> None:
    # The emptiest worker's two items fit the others' gaps only one at a time: nothing moves.
    world = World(capacity=100, num_workers=4)
    policy = make_policy("mell", headroom_tokens=0, repairs_per_epoch=0)
    world.load["w000"] = {"a": 70, "b": 14}
    world.load["w001"] = {"c": 20, "d": 20}  # emptiest: 40 blocks, but only 16 free elsewhere
    world.load["w002"] = {"e": 70, "f": 14}
    assert policy.plan_epoch(world, 0.0) == []


def test_a_request_is_refill_material_only_once_it_has_grown_since_its_placement() -> None:
    # Its prompt may still be prefilling (or it is a short request about to leave): moving it
    # would be wasted. Time alone (settle_epochs) is not enough with settle_blocks.
    for settle_blocks, moved_at in ((2, 3), (0, 2)):
        world = World(capacity=100, num_workers=4)
        policy = make_policy(
            "mell",
            headroom_tokens=0,
            repairs_per_epoch=0,
            settle_epochs=1,
            settle_blocks=settle_blocks,
            consolidate_tries=1,  # only the emptiest worker, r's
        )
        world.load["w000"] = {"a": 44, "b": 20}
        policy.plan_epoch(world, 0.0)
        got = policy.place(world, arrival(40, "r"))
        assert isinstance(got, Placement) and got.worker_id != "w000"
        world.place(got, "r", 40)
        del world.load["w000"]["b"]  # room for r on w000 from now on
        moved = None
        for epoch in range(1, 5):
            if epoch == 3:
                world.load[got.worker_id]["r"] = 42  # r decoded two blocks
            moves = policy.plan_epoch(world, float(epoch))
            world.apply(moves)
            if any(m.request_id == "r" for m in moves):
                moved = epoch
                break
        assert moved == moved_at and world.where("r") == "w000"


def test_a_full_fixed_pool_still_admits_where_blocks_are_free() -> None:
    # Two workers, both busy; neither keeps its growth headroom after one more request, but
    # both have the blocks: the last resort places on the one with the most free blocks.
    world = World(capacity=100, num_workers=2)
    world.load["w000"] = {f"a{i}": 8 for i in range(10)}  # 80 used, 20 free
    world.load["w001"] = {f"b{i}": 17 for i in range(5)}  # 85 used, 15 free
    policy = make_policy("mell", headroom_tokens=16)  # 2 blocks per request kept free
    decision = policy.place(world, arrival(12, "r"))
    assert decision == Placement("w000")
    world.place(decision, "r", 12)
    assert isinstance(policy.place(world, arrival(9, "r2")), Placement)  # w001: 15 free
    rejected = policy.place(world, arrival(16, "r3"))
    assert isinstance(rejected, Rejection) and "16 KV blocks" in rejected.reason
