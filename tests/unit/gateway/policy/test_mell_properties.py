"""Property tests of the MELL policy: random arrivals, growth and departures.

- no worker is ever over capacity (placements, moves, and one epoch of growth within the
  policy's growth estimate);
- no single operation causes more than 10 migrations (Theorem 3);
- Theorem 1's class invariants (relaxed as the policy documents: a worker at least 3/4 full
  passes) hold up to a constant number of exceptions, whatever the number of workers.
"""

from __future__ import annotations

import random

from hypothesis import example, given, settings
from hypothesis import strategies as st
from packing_world import World, violations

from mell.gateway.policy.base import Arrival, Placement, make_policy

EXCEPTIONS = 8  # allowed workers breaking the relaxed invariants at any epoch end. Max seen: 6
# in 400 random 40-epoch runs (C up to 1000 blocks, up to 10 arrivals per epoch, growth up to
# ~1.5% of C per request per epoch). With growth of 5% of C per request per epoch (C = 64,
# 3 blocks) one run in 400 reached 10: growth then outpaces 4 repairs per epoch.


def run_world(
    seed: int,
    capacity: int,
    growth_blocks: int,
    departure_p: float,
    max_arrivals: int,
    size_mix: str,
    epochs: int,
) -> tuple[int, int]:
    rng = random.Random(seed)
    growth_blocks = min(growth_blocks, max(1, capacity // 64))  # <= ~1.5% of C per epoch
    world = World(capacity=capacity, block_size=16, num_workers=256)  # never exhausted
    policy = make_policy("mell", headroom_tokens=growth_blocks * 16)
    live: list[str] = []
    recent: list[list[str]] = []  # arrivals of the last `settle_epochs` epochs
    final: dict[str, int] = {}  # a request never outgrows what one worker holds
    born: dict[str, int] = {}  # blocks at placement
    next_id = 0
    worst_ops = worst_exceptions = 0
    for epoch in range(epochs):
        for rid in list(live):
            if rng.random() < departure_p:
                wid = world.where(rid)
                del world.load[wid][rid]
                live.remove(rid)
        for rid in live:
            wid = world.where(rid)
            world.load[wid][rid] = min(
                final[rid], world.load[wid][rid] + rng.randint(0, growth_blocks)
            )
        for wid in world.load:
            assert world.used(wid) <= capacity, f"epoch {epoch}: {wid} over capacity after growth"
        arrived = []
        for _ in range(rng.randint(0, max_arrivals)):
            if size_mix == "small":
                blocks = rng.randint(1, capacity // 6)
            elif size_mix == "large":
                blocks = rng.randint(capacity // 5, capacity * 3 // 4)
            else:
                blocks = rng.choice(
                    [rng.randint(1, capacity // 8), rng.randint(capacity // 8, capacity * 3 // 4)]
                )
            rid = f"r{next_id}"
            next_id += 1
            decision = policy.place(world, Arrival(rid, "m", blocks * 16 - 1, 64))
            if isinstance(decision, Placement):
                world.place(decision, rid, blocks)
                arrived.append(rid)
                final[rid] = rng.randint(blocks, max(blocks, capacity * 9 // 10))
                born[rid] = blocks
                live.append(rid)
                assert world.used(decision.worker_id) <= capacity, "placement over capacity"
        moves = policy.plan_epoch(world, float(epoch))
        ops = policy._pools["m"].op_moves
        worst_ops = max([worst_ops, *ops])
        assert all(n <= 10 for n in ops), f"an operation made {max(ops)} migrations"
        world.apply(moves)
        for wid in world.load:
            assert world.used(wid) <= capacity, f"epoch {epoch}: {wid} over capacity after moves"
        # Young requests are not refill material (MELL's docstring): those placed within the
        # policy's settle_epochs, and those that have not grown by settle_blocks since their
        # placement (still prefilling, in the simulator and the live gateway).
        recent = [*recent, arrived][-policy.settle_epochs :]
        young = frozenset(rid for batch in recent for rid in batch) | {
            rid
            for rid in live
            if world.load[world.where(rid)][rid] - born[rid] < policy.settle_blocks
        }
        bad = violations(world, growth_blocks, young=young)
        count = len({w for ws in bad.values() for w in ws})
        worst_exceptions = max(worst_exceptions, count)
        assert count <= EXCEPTIONS, f"epoch {epoch}: invariants broken on {bad}"
    return worst_ops, worst_exceptions


@settings(max_examples=40, deadline=None, derandomize=True)
# Without growth no request ever grows by settle_blocks: every one stays young, so MELL pulls
# no companion for a lone L (an M/S worker's items stay put). The checker once counted them as
# refill material and found nine lone-L workers "repairable" by the two items of one M worker.
@example(seed=4, capacity=64, growth_blocks=0, departure_p=0.001, max_arrivals=4, size_mix="large")
@given(
    seed=st.integers(0, 2**32 - 1),
    capacity=st.sampled_from([64, 120, 256]),
    growth_blocks=st.integers(0, 3),
    departure_p=st.floats(0.0, 0.4),
    max_arrivals=st.integers(0, 8),
    size_mix=st.sampled_from(["small", "large", "mixed"]),
)
def test_mell_invariants_under_random_load(
    seed: int,
    capacity: int,
    growth_blocks: int,
    departure_p: float,
    max_arrivals: int,
    size_mix: str,
) -> None:
    run_world(seed, capacity, growth_blocks, departure_p, max_arrivals, size_mix, epochs=30)
