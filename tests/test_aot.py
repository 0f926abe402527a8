"""`dreamjax aot`: slice names, and the real train step compiled for a TPU slice on this CPU machine.

The compile needs the TPU compiler (libtpu), which `make test` installs beside the project (.tpu/); where it
cannot be installed the compile test is skipped (counted) and the command's one-line error is tested."""

import os
import re
import sys

import pytest

from dreamjax.cli import main
from dreamjax.train import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
LAST_LINE = re.compile(r"^peak_memory_per_chip_gib=(\d+\.\d+) hbm_gib=(\d+) flops_ratio=(\d+\.\d+)$")


def _have_libtpu() -> bool:
    try:
        aot._ensure_libtpu()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("name, chips, slices, shape", [
    ("v5p-128", 64, 1, "4x4x4"),  # v5p counts TensorCores: 64 chips
    ("v4-256", 128, 1, "4x4x8"),
    ("v5e-256", 256, 1, "16x16"),  # v5e counts chips
    ("v6e-8", 8, 1, "2x4"),
    ("2xv5p-128", 128, 2, "4x4x4"),
])
def test_slice_names(name, chips, slices, shape):
    t = aot.parse_topology(name)
    assert (t.chips, t.slices, t.shape) == (chips, slices, shape)


@pytest.mark.parametrize("name", ["h100x8", "v5p-7", "tpu-8"])
def test_unknown_slices_are_one_clear_error(name):
    with pytest.raises(ValueError, match=name):
        aot.parse_topology(name)


def test_without_the_tpu_compiler_the_command_says_so_in_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # `import libtpu` now fails, as on a machine without it
    assert main(["aot", "--config", TINY + ":smoke", "--topology", "v5p-8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "make aot" in err[0], err


@pytest.mark.skipif(not _have_libtpu(), reason="libtpu is not installed (make test installs it into .tpu/)")
def test_tiny_step_compiles_for_a_v5p_slice(capsys):
    assert main(["aot", "--config", TINY + ":smoke", "--topology", "v5p-8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    m = LAST_LINE.match(lines[-1])
    assert m, lines[-1]
    peak, hbm, ratio = float(m.group(1)), int(m.group(2)), float(m.group(3))
    assert hbm == 95 and 0 < peak < 1  # the tiny model: well under a GiB per chip
    # the compiled step does the work the analytic count says (no remat in the tiny config)
    assert 0.8 < ratio < 1.25, ratio
    assert any(line.startswith("memory per chip (GiB): arguments") for line in lines)


@pytest.mark.parametrize("optimal, source", [(100.0, "XLA's TPU cost model"), (1e-3, "compiled FLOPs at peak; XLA"),
                                             (None, "compiled FLOPs at peak)")])
def test_step_time_says_which_bound_it_is(optimal, source):
    """The estimate is the larger of the cost model's roofline and the compiled FLOPs at peak; the label
    names the one printed."""
    topo = aot.parse_topology("v5p-8")
    report = aot.AotReport(topo, "mesh", dict.fromkeys(("arguments", "outputs", "aliased", "temporaries", "code",
                                                         "peak"), 0.0),
                           compiled_flops=1.25e15, analytic={"llm": 1e15}, optimal_seconds=optimal, parameters=1)
    at_peak = 1.25e15 / (topo.chips * topo.peak_flops)
    assert report.step_seconds() == pytest.approx(max(optimal or 0.0, at_peak))
    line = next(x for x in report.lines() if x.startswith("estimated step time"))
    assert source in line, line
