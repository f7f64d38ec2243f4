"""The worker's heap setting: large buffers are served from, and returned to, the heap."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Allocate, touch and free a 16 MiB buffer `rounds` times; print the page faults of the rounds
# after the first (the first one may grow the heap).
PROBE = """
import ctypes, resource, sys
from mell.workerd.heap import keep_large_buffers
tuned = keep_large_buffers() if sys.argv[1] == "tuned" else None
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 16 << 20
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(tuned, sum(faults[1:]))
"""


def probe(mode: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_buffers_reuse_their_pages() -> None:
    tuned, faults = probe("tuned")
    assert tuned == "True"
    # 16 MiB is 4096 pages: reused pages fault at most a handful of times per round
    assert faults < 100, faults
