"""dreamjax/runtime.py: with the freed memory kept, a large temporary reuses heap pages instead of having the
kernel fault in fresh ones on every call (what XLA:CPU's per-call buffers otherwise pay)."""

import ctypes.util
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
