"""A tiny mutable cluster for property tests: the truth a policy's view reads."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mell.gateway.policy.base import Move, Placement, WorkerInfo, WorkerStatus
from mell.gateway.policy.mell import FULL, PER_LABEL, L, M, S, T, size_class


@dataclass
class World:
    capacity: int = 120
    block_size: int = 16
    num_workers: int = 60
    model: str = "m"
    load: dict[str, dict[str, int]] = field(default_factory=dict)
    status: dict[str, WorkerStatus] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for i in range(self.num_workers):
            self.load[f"w{i:03d}"] = {}

    # PolicyView
    def models(self) -> list[str]:
        return [self.model]

    def workers(self, model: str) -> list[WorkerInfo]:
        out = []
        for wid, reqs in self.load.items():
            st = self.status.get(wid, WorkerStatus.ACTIVE)
            if st == WorkerStatus.LOST:
                continue
            out.append(
                WorkerInfo(
                    wid,
                    model,
                    st,
                    self.capacity,
                    self.block_size,
                    dict(reqs),
                    self.capacity - sum(reqs.values()),
                )
            )
        return out

    # truth changes
    def where(self, rid: str) -> str | None:
        return next((w for w, reqs in self.load.items() if rid in reqs), None)

    def used(self, wid: str) -> int:
        return sum(self.load[wid].values())

    def place(self, decision: Placement, rid: str, blocks: int) -> None:
        self.load[decision.worker_id][rid] = blocks

    def apply(self, moves: list[Move]) -> None:
        """Run moves atomically (as the simulator does): take them all out, then put them in."""
        taken = []
        for m in moves:
            assert m.src != m.dst
            assert m.request_id in self.load[m.src], m
            taken.append((m, self.load[m.src].pop(m.request_id)))
        for m, blocks in taken:
            self.load[m.dst][m.request_id] = blocks

    def busy(self) -> list[str]:
        return [w for w, reqs in self.load.items() if reqs]


def violations(
    world: World, growth_blocks: float, place_epochs: float = 2.0, young: frozenset = frozenset()
) -> dict:
    """Workers breaking Theorem 1's invariants in a way the policy could repair.

    Relaxed as MELL's docstring states: a worker at least 3/4 full passes whatever its
    structure, and an under-full worker only counts when an item of the class it lacks, held by
    another under-full worker, would fit on it with the policy's growth reserve (two M items
    that cannot share a worker once growth headroom is kept are not a violation). Requests in
    `young` (placed within the policy's settle_epochs) are not refill material."""
    cap = world.capacity

    def label(wid: str) -> int:
        return max(T, max(size_class(b, cap) for b in world.load[wid].values()))

    def room(wid: str) -> int:
        n = len(world.load[wid]) + 1
        return cap - world.used(wid) - math.ceil(growth_blocks * place_epochs * n)

    busy = world.busy()
    labels = {w: label(w) for w in busy}
    under = [w for w in busy if world.used(w) / cap < FULL]

    def items(wid: str, classes: tuple[int, ...]) -> list[int]:
        return [b for b in world.load[wid].values() if max(T, size_class(b, cap)) in classes]

    def movable(wid: str, classes: tuple[int, ...]) -> list[int]:
        return [
            b
            for r, b in world.load[wid].items()
            if max(T, size_class(b, cap)) in classes and r not in young
        ]

    out: dict[str, list[str]] = {"M": [], "S": [], "T": [], "L": [], "TwithLM": []}
    has_t = any(lab == T for lab in labels.values())
    for wid in under:
        lab = labels[wid]
        donors = [w for w in under if w != wid]
        if lab in (M, S):
            if len(items(wid, (lab,))) < PER_LABEL[lab] and any(
                labels[d] == lab and any(b <= room(wid) for b in movable(d, (lab,))) for d in donors
            ):
                out["M" if lab == M else "S"].append(wid)
        elif lab == T:
            if any(
                labels[d] == T and any(b <= room(wid) for b in movable(d, (T,))) for d in donors
            ):
                out["T"].append(wid)
        elif (
            lab == L
            and not items(wid, (M, S))
            and any(
                labels[d] in (M, S) and any(b <= room(wid) for b in movable(d, (M, S)))
                for d in donors
            )
        ):
            out["L"].append(wid)
        if (
            has_t
            and lab in (L, M)
            and any(
                labels[d] == T and any(b <= room(wid) for b in movable(d, (T,))) for d in donors
            )
        ):
            out["TwithLM"].append(wid)
    return out
