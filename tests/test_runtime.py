"""dreamjax/runtime.py: with the freed memory kept, a large temporary reuses heap pages instead of having the
kernel fault in fresh ones on every call (what XLA:CPU's per-call buffers otherwise pay)."""

import ctypes.util
import os
import platform
import subprocess
import sys

import pytest

from dreamjax import runtime

# A child process, so the parent's malloc settings stay as they are: allocate, touch and free a 128 MB buffer
# five times and count the minor page faults of the last four rounds.
CHILD = """
import resource, sys
import numpy as np
from dreamjax import runtime
applied = runtime.keep_freed_memory() if sys.argv[1] == "keep" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
np.ones(1 << 25, np.float32)  # the first round may fault: the heap grows once
before = faults()
for _ in range(4):
    a = np.ones(1 << 25, np.float32)  # 128 MB, every page written
    del a
print(applied, faults() - before)
"""


def _faults(mode: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(ctypes.util.find_library("c") is None or sys.platform != "linux", reason="glibc only")
def test_kept_memory_stops_the_page_faults_of_large_temporaries():
    _, default_faults = _faults("default")
    applied, kept_faults = _faults("keep")
    assert applied
    # glibc's defaults: a fresh mmap each round, every page faulted in again (numpy asks for huge pages, so
    # a fault may map 2 MiB: at least 64 per 128 MB round)
    assert default_faults >= 4 * 64
    assert kept_faults < default_faults // 20  # the heap's pages are reused


def test_opt_out(monkeypatch):
    monkeypatch.setenv(runtime.OPT_OUT, "0")
    assert runtime.keep_freed_memory() is False


# XLA:CPU's per-call block, as the child of a worker thread: glibc maps requests above a thread arena's 64 MiB
# heap with mmap whatever the threshold, so only huge pages cut its faults. Faults of the last four rounds.
THREAD_CHILD = """
import ctypes, os, resource, sys, threading
from dreamjax import runtime
if sys.argv[1] == "rerun":
    runtime.rerun_with_huge_pages()
runtime.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 200 << 20
def rounds(n):
    for _ in range(n):
        p = libc.malloc(SIZE)
        ctypes.memset(p, 1, SIZE)
        libc.free(p)
def in_thread(n):
    t = threading.Thread(target=rounds, args=(n,)); t.start(); t.join()
in_thread(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
in_thread(4)
print(os.environ.get("GLIBC_TUNABLES", "-"), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _thread_faults(mode: str) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", runtime.RERUN_MARK, runtime.OPT_OUT)}
    out = subprocess.run([sys.executable, "-c", THREAD_CHILD, mode], capture_output=True, text=True, check=True,
                         env=env)
    tunables, faults = out.stdout.split()
    return tunables, int(faults)


@pytest.mark.skipif(runtime.malloc_tunables({}, runtime.thp_mode()) is None,
                    reason="needs glibc on Linux with transparent huge pages available")
def test_rerun_with_huge_pages_cuts_the_faults_of_a_thread_arena_block():
    tunables, default_faults = _thread_faults("keep")
    assert tunables == "-"
    tunables, rerun_faults = _thread_faults("rerun")
    assert tunables == runtime.HUGE_PAGES  # the child re-executed itself with the tunable
    if "[madvise]" in runtime.thp_mode():  # huge pages only on request: the default pays a fault per 4 KiB page
        assert default_faults >= 4 * (200 << 20) // 4096 // 2
        assert rerun_faults < default_faults // 20
    else:  # "always": every large mapping already gets them
        assert rerun_faults <= default_faults * 1.5 + 100


def test_malloc_tunables_decisions():
    thp = "always [madvise] never\n"
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert runtime.malloc_tunables({}, thp) == (runtime.HUGE_PAGES if glibc else None)
    if glibc:
        assert runtime.malloc_tunables({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}, thp) == \
            "glibc.malloc.tcache_count=0:" + runtime.HUGE_PAGES  # the user's tunables are kept
    assert runtime.malloc_tunables({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, thp) is None  # the user's choice
    assert runtime.malloc_tunables({runtime.OPT_OUT: "0"}, thp) is None
    assert runtime.malloc_tunables({runtime.RERUN_MARK: "1"}, thp) is None  # never twice
    assert runtime.malloc_tunables({}, "always madvise [never]\n") is None
    assert runtime.malloc_tunables({}, None) is None
