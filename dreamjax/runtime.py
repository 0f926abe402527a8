"""Process-wide settings of the host runtime, applied once by the `dreamjax` command (and the benchmarks).

XLA:CPU allocates every temporary buffer of a compiled computation with `malloc` and frees it after the
call. glibc serves allocations above its mmap threshold (at most 32 MiB by default) with a fresh `mmap`, and
returns freed heap tops to the kernel above its trim threshold, so a large temporary (the [B, N, T, S] scores
of an attention: 134 MB at the text-to-image benchmark's 1024 positions, 8 heads, batch 4) has its pages
faulted in and zeroed by the kernel again on every call. Measured: that attention took 63 ms per call with
glibc's defaults and 29 ms with the freed memory kept (PyTorch's SDPA never allocates the scores).
`keep_freed_memory` raises both thresholds, so such buffers come from the heap and are reused; the cost is a
process that keeps up to `threshold` bytes of freed memory instead of returning it to the kernel at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
DEFAULT_THRESHOLD = 1 << 30
OPT_OUT = "DREAMJAX_KEEP_FREED_MEMORY"  # =0: leave malloc as it is


def keep_freed_memory(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Serve allocations below `threshold` bytes from glibc's heap and keep up to `threshold` freed bytes.

    Returns True when both thresholds were set; False without glibc, when the environment sets
    DREAMJAX_KEEP_FREED_MEMORY=0 (nothing changed then), or when `mallopt` refuses one of them (the mmap
    threshold may already be set when the trim threshold is refused)."""
    if os.environ.get(OPT_OUT, "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, threshold) == 1 and mallopt(_M_TRIM_THRESHOLD, threshold) == 1
    if not ok:
        log.debug("mallopt refused a threshold of %d bytes; malloc left as it was", threshold)
    return ok
