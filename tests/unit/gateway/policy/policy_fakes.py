"""A tiny in-memory PolicyView for policy tests."""

from __future__ import annotations

from dataclasses import dataclass, field

from mell.gateway.policy.base import WorkerInfo, WorkerStatus


@dataclass
class FakeView:
    capacity: int = 100
    block_size: int = 16
    model: str = "m"
    # worker id -> {request id -> blocks}
    load: dict[str, dict[str, int]] = field(default_factory=dict)
    status: dict[str, WorkerStatus] = field(default_factory=dict)

    def models(self) -> list[str]:
        return [self.model]

    def workers(self, model: str) -> list[WorkerInfo]:
        if model != self.model:
            return []
        out = []
        for wid, reqs in self.load.items():
            st = self.status.get(wid, WorkerStatus.ACTIVE)
            if st == WorkerStatus.LOST:
                continue
            used = sum(reqs.values())
            out.append(
                WorkerInfo(
                    wid, model, st, self.capacity, self.block_size, dict(reqs), self.capacity - used
                )
            )
        return out
