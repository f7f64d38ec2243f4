"""The worker's C heap: keep large buffers in it, so KV frames do not fault their pages in.

ZeroMQ allocates every received message with malloc. glibc serves an allocation above its mmap
threshold (128 KiB at start, raised on the fly up to 32 MiB) with a fresh mmap and unmaps it on
free, so every KV frame a migration receives touches all its pages for the first time: a page
fault and the kernel zeroing each page, as much as a third of a KV copy's time on the CPU
(`bench/migration.py`). `keep_large_buffers` fixes the threshold at glibc's maximum and lets
the heap keep freed memory up to `retain_bytes`, so the next frames reuse the same pages. The
cost: a worker holds on to up to `retain_bytes` it no longer uses. Elsewhere than glibc it
changes nothing.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses more on 64-bit (HEAP_MAX_SIZE / 2)


def keep_large_buffers(retain_bytes: int = 256 << 20) -> bool:
    """Serve allocations up to 32 MiB from the heap and keep `retain_bytes` of freed memory;
    True when the C library took both settings (glibc), False when it has no `mallopt`."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(
        mallopt(M_TRIM_THRESHOLD, retain_bytes)
    )


def give_back_free_memory() -> bool:
    """Return the C heap's free pages to the OS now (glibc `malloc_trim(0)`: every whole free
    page of every arena, not only the top of the heap, whatever the trim threshold above);
    True when it released some. Call it after freeing large buffers that must leave the
    process's resident set (a sleeping worker's KV cache): `keep_large_buffers` makes the heap,
    not mmap, serve allocations up to 32 MiB, and keep up to its retain bytes once freed.
    Elsewhere than glibc it does nothing (False)."""
    malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if malloc_trim is None:
        return False
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim.restype = ctypes.c_int
    return bool(malloc_trim(0))
