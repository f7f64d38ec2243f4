"""Which idle workers a pool can do without: those it may put to sleep (their KV memory given
back until a request wakes them; `cluster/sleeper.py` acts on this, after the worker's own
`sleep_after_s` of idleness).

MELL packs requests onto as few workers as it can, so the workers it leaves empty are the ones
it does not need; "releasable" in the view means only "holds nothing". A releasable worker is
*not needed* when the rest of its pool can take the load without it: at least one other worker
of the model is ACTIVE and awake, and those together have at least `room_fraction` of their
KV blocks free. So a pool never sleeps its last awake worker, and a busy pool keeps a spare.
Pure: reads the policy's view of one model's workers, decides nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence

from mell.gateway.policy.base import WorkerInfo, WorkerStatus

ROOM_FRACTION = 0.25


def not_needed(
    workers: Sequence[WorkerInfo], worker_id: str, room_fraction: float = ROOM_FRACTION
) -> bool:
    """`worker_id` (one of `workers`, a model's pool) is ACTIVE, awake and holds no request,
    and the pool's other ACTIVE awake workers (one at least) have `room_fraction` of their
    blocks free together."""
    me = next((w for w in workers if w.worker_id == worker_id), None)
    if me is None or me.status != WorkerStatus.ACTIVE or me.sleeping or me.request_blocks:
        return False
    others = [
        w
        for w in workers
        if w.worker_id != worker_id and w.status == WorkerStatus.ACTIVE and not w.sleeping
    ]
    capacity = sum(w.capacity_blocks for w in others)
    free = sum(w.num_free_blocks for w in others)
    return capacity > 0 and free >= room_fraction * capacity
