"""An offline packing of one instant's requests: the reference a policy's peak is read against.

The fluid bound (`bound.py`) divides KV freely among workers; real requests are indivisible.
`first_fit_decreasing` packs the exact KV sizes of an instant, all known at once, the way an
offline planner with free migrations would: it needs at most 11/9 · OPT + 6/9 workers (Dósa
2007); at MELL's peak on the six bench/fig11.py runs it needed ⌈Σ KV / C⌉ workers or one more.
A policy's peak over it measures how far the online packing is from what the same requests
allow; the fluid bound's gap also counts how long requests live.
"""

from __future__ import annotations

from collections.abc import Iterable


def first_fit_decreasing(sizes: Iterable[int], capacity: int) -> int:
    """Workers of `capacity` blocks that first-fit decreasing needs for requests of `sizes`
    blocks (a request larger than `capacity` gets a worker of its own)."""
    free: list[int] = []  # room left in each open worker, in opening order
    for size in sorted(sizes, reverse=True):
        for k, room in enumerate(free):
            if size <= room:
                free[k] = room - size
                break
        else:
            free.append(max(0, capacity - size))
    return len(free)
