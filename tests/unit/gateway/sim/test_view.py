"""The simulator's view of its workers: spare idle workers, release, array slots."""

from __future__ import annotations

from mell.gateway.sim.profile import load_profile
from mell.gateway.sim.view import SimView


def test_a_released_worker_frees_its_slot_but_not_its_topology_index() -> None:
    view = SimView(["m"], load_profile("llama2-7b-rtx4090"), spare=1)
    (first,) = view.idle["m"]
    view.add(first, "r1", 3)  # busy: a new spare is opened
    (second,) = view.idle["m"]
    view.add(second, "r2", 3)
    (third,) = view.idle["m"]
    assert [view.slot[w] for w in (first, second, third)] == [0, 1, 2]
    view.remove(first, "r1")
    view.release_if_empty(first)  # enough spares already: released
    assert first not in view.slot and first not in view.info
    view.add(third, "r3", 3)  # the next spare takes the lowest free slot...
    (fourth,) = view.idle["m"]
    assert view.slot[fourth] == 0
    # ... and a new place in the machine topology (migration links read `index`)
    assert view.index[fourth] == 3 and len(set(view.slot.values())) == len(view.slot) == 3
