"""CPU runtime settings that measurably speed up generation.

glibc's allocator hands the memory of a freed large block back to the kernel (blocks above the mmap threshold are
unmapped; the top of the heap is trimmed past 128 KB), so the next step's tensor of the same size page-faults every
page afresh. A `[64, 8192]` fp32 step of the sampler allocates and frees tens of such megabyte blocks, and the
zero-filling of fresh pages cost about a third of the sampler's time (entropy 3.9 -> 1.1 ms, the exact multinomial
draw 7.5 -> 4.0 ms on the 2-core machine of docs/performance.md). `tune_malloc()` fixes the mmap threshold at 64 MB
(below it blocks come from the heap and are reused) and raises the trim threshold to 1 GB (freed heap memory stays
with the process for the next step). The process keeps up to that much freed memory instead of returning it.

It changes process-wide allocator settings, so it runs once, only on Linux with glibc, only when a model is placed on
the CPU, and not at all with DGEMMA_TUNE_MALLOC=0. An explicit MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ in
the environment wins (the user chose).
"""

from __future__ import annotations

import ctypes
import os
import platform

MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (malloc.h)
_state: bool | None = None  # None: not tried yet; True: applied; False: not applicable / opted out / failed


def tune_malloc() -> bool:
    """Apply the allocator settings once per process; returns whether they are in effect."""
    global _state
    if _state is not None:
        return _state
    _state = False
    if os.environ.get("DGEMMA_TUNE_MALLOC", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = True
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and ok
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        ok = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    _state = ok
    return ok
