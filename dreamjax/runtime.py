"""Process-wide settings of the host runtime, applied once by the `dreamjax` command (and the benchmarks).

XLA:CPU allocates every temporary buffer of a compiled computation with `malloc` and frees it after the
call. glibc serves allocations above its mmap threshold (at most 32 MiB by default) with a fresh `mmap`, and
returns freed heap tops to the kernel above its trim threshold, so a large temporary (the [B, N, T, S] scores
of an attention: 134 MB at the text-to-image benchmark's 1024 positions, 8 heads, batch 4) has its pages
faulted in and zeroed by the kernel again on every call. Measured: that attention took 63 ms per call with
glibc's defaults and 29 ms with the freed memory kept (PyTorch's SDPA never allocates the scores).
`keep_freed_memory` raises both thresholds, so such buffers come from the heap and are reused; the cost is a
process that keeps up to `threshold` bytes of freed memory instead of returning it to the kernel at once.

That does not reach the largest buffer: XLA:CPU allocates each call's temporaries as one block on a worker
thread, and glibc serves a thread arena's request above its 64 MiB heap size with `mmap` whatever the
threshold, then unmaps it on free. Every call of a training step faults that block in again page by page:
the demo's step (a 337 MB block) took 82,700 minor faults and 0.16 s of system time per 0.35 s step, and
the benchmarks' forward+backward 50,000 (LLaMA, 193 MB), 41,000 (CLIP) and 234,000 (UNet, 911 MB) per call.
`rerun_with_huge_pages` re-executes the process with glibc's `malloc.hugetlb=1` tunable, which asks for
transparent huge pages on malloc's mappings (2 MiB pages: ~500x fewer faults): the demo's step 344 -> 300
ms timed alone, its training 608 -> 583 s. glibc reads tunables only at process start, hence the
re-execution. (`glibc.malloc.arena_max=1`, one arena for every thread, removes the mappings altogether but
made XLA's threads slower than the faults did.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
DEFAULT_THRESHOLD = 1 << 30
OPT_OUT = "DREAMJAX_KEEP_FREED_MEMORY"  # =0: leave malloc as it is (thresholds and tunables)
HUGE_PAGES = "glibc.malloc.hugetlb=1"
RERUN_MARK = "DREAMJAX_MALLOC_RERUN"  # set in the re-executed process: never re-execute twice
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


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


def thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode line ("always [madvise] never"), None where unreadable."""
    try:
        with open(THP_MODE) as f:
            return f.read()
    except OSError:
        return None


def malloc_tunables(environ: dict[str, str], thp: str | None) -> str | None:
    """The GLIBC_TUNABLES value `rerun_with_huge_pages` runs with, or None to leave the process as it is:
    opted out, already re-executed, a malloc.hugetlb tunable already chosen, not glibc on Linux, or
    transparent huge pages off (`thp`: `thp_mode()`'s line)."""
    if environ.get(OPT_OUT, "1") == "0" or RERUN_MARK in environ:
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current:
        return None
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    if thp is None or "[never]" in thp:
        return None
    return f"{current}:{HUGE_PAGES}" if current else HUGE_PAGES


def rerun_with_huge_pages() -> None:
    """Re-execute this process (same interpreter, same command line) with `malloc_tunables`' GLIBC_TUNABLES;
    returns without doing anything when that is None or the exec fails. Call it first thing in a command's
    entry point: the process is replaced."""
    value = malloc_tunables(dict(os.environ), thp_mode())
    if value is None:
        return
    env = {**os.environ, "GLIBC_TUNABLES": value, RERUN_MARK: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError as e:  # carry on without the tunable
        log.debug("re-executing with %s failed: %s", value, e)
