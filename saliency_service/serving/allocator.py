"""glibc malloc settings for a process that allocates and frees tensors all day.

By default glibc hands every allocation above a moving threshold (128 KiB at first) to
``mmap`` and gives freed memory at the top of a heap back to the kernel, so each pass of a
gradient method maps its activations afresh and the kernel zeroes every page on first touch.
Keeping freed memory for reuse avoids those page faults. The cost is that the process keeps
its high-water mark of freed memory (bounded by ``chunk_memory_bytes`` per executing
request) instead of returning it.

Three settings do it. Raising the mmap threshold keeps activations on the heap; raising the
trim threshold keeps the heap's freed top. The passes run in worker threads, though, and a
worker thread's arena is built of 64 MiB heaps that glibc unmaps whole once they are free,
whatever the trim threshold, unless the top pad asks to keep a heap's worth (ResNet-50's
activations span many such heaps). One arena for all threads would also do, but then the
workers of concurrent requests contend for its lock.

Only glibc has ``mallopt``; elsewhere nothing changes. Explicit ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_`` or ``MALLOC_TOP_PAD_`` environment variables win over these
settings.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

# mallopt parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit): larger
# blocks are always mapped.
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024
# A worker arena's heap (HEAP_MAX_SIZE on 64-bit): padding by as much keeps every heap.
TOP_PAD_BYTES = 64 * 1024 * 1024
ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": M_MMAP_THRESHOLD,
               "MALLOC_TRIM_THRESHOLD_": M_TRIM_THRESHOLD,
               "MALLOC_TOP_PAD_": M_TOP_PAD}


def keep_freed_memory() -> dict[str, int]:
    """Sets glibc's mmap and trim thresholds (unless the environment sets them); returns
    the settings applied, by name (empty when this is not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return {}
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    wanted = {"M_MMAP_THRESHOLD": (M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
              "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
              "M_TOP_PAD": (M_TOP_PAD, TOP_PAD_BYTES)}
    overridden = {number for name, number in ENVIRONMENT.items() if name in os.environ}
    applied = {}
    for name, (number, value) in wanted.items():
        if number in overridden:
            continue
        if mallopt(number, value) == 1:
            applied[name] = value
        else:
            log.warning("mallopt(%s, %d) was refused; freed memory goes back to the kernel",
                        name, value)
    return applied
