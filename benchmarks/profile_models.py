"""Where each `run_all.py` row spends its time: dreamjax's op time by category against PyTorch eager's.

    .venv/bin/python benchmarks/profile_models.py                 # llama, clip, unet at the benchmark sizes (~1 min)
    .venv/bin/python benchmarks/profile_models.py --only unet --top 20
    .venv/bin/python benchmarks/profile_models.py --tiny --reps 1  # smoke run

Same models, weights and inputs as `run_all.py` (benchmarks/models.py). dreamjax: `jax.profiler` traces
`--reps` calls of the jitted forward / value_and_grad, and every XLA op of the trace is put in a category by
the op name JAX wrote into the compiled HLO (the Flax module path, e.g. `.../attn1/reduce_max`). PyTorch:
`torch.profiler`, each aten op's self CPU time. Times are per call, in ms; the two totals are op time
(summed over XLA's / PyTorch's worker threads where ops overlap), not wall time, so compare shares and
categories, and take the row's wall-clock ratio from `run_all.py`. benchmarks/README.md quotes the result.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root: `benchmarks`
from dreamjax import runtime  # noqa: E402

if __name__ == "__main__":  # as the dreamjax command, for both sides; before the heavy imports
    runtime.rerun_with_huge_pages()

import jax  # noqa: E402
import torch  # noqa: E402

from benchmarks import models  # noqa: E402
from benchmarks.run_all import model_names, row_functions, torch_uses_every_core  # noqa: E402

MATMUL, ATTENTION, CONV, NORM = "dense matmuls", "attention core (QK^T, softmax, PV)", "convolution", "normalisation"
SCAN = "layer-scan residuals (zero-fill, write, read)"
COPIES, OTHER = "transposes / copies", "other elementwise"
# projections inside an attention module are dense matmuls, not the attention core
_PROJECTION = re.compile(r"(q_proj|k_proj|v_proj|o_proj|out_proj|to_q|to_k|to_v|to_out|proj_in|proj_out)/")
_HLO_OP = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = \S+ .*?op_name=\"([^\"]*)\"")


def jax_category(op_name: str, hlo_name: str) -> str:
    """Category of one XLA op from its HLO instruction name and the JAX op name in its metadata."""
    low = op_name.lower()
    in_attention = ("attn" in low or "attention" in low) and not _PROJECTION.search(op_name)
    # nn.scan's autodiff stacks each layer's saved activations: a zero-filled [layers, ...] buffer
    # (wrapped_broadcast), a dynamic-update-slice per layer, a dynamic-slice per layer in the backward
    if re.search(r"dynamic_(update_)?(slice|index)", low) or (hlo_name.startswith("wrapped_broadcast")
                                                              and not in_attention):
        return SCAN
    if "conv_general_dilated" in low:
        return CONV
    if in_attention:
        return ATTENTION
    if "dot_general" in low:
        return MATMUL
    if "norm" in low:
        return NORM
    if hlo_name.startswith(("transpose", "copy")):
        return COPIES
    return OTHER


def torch_category(aten: str) -> str:
    k = aten.lower()
    if "scaled_dot_product" in k or "flash_attention" in k:
        return ATTENTION
    if any(s in k for s in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")):
        return MATMUL
    if "conv" in k:
        return CONV
    if "norm" in k:
        return NORM
    if any(s in k for s in ("copy_", "contiguous", "transpose", "permute", "clone")):
        return COPIES
    return OTHER


def profile_jax(fn, args, reps: int, top: int) -> tuple[collections.Counter, list[tuple[float, str, str]]]:
    """(ms per call by category, the `top` slowest ops as (ms, category, op name))."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    op_names = {}
    for line in fn.lower(*args).compile().as_text().splitlines():
        m = _HLO_OP.match(line)
        if m:
            op_names[m.group(1)] = m.group(2)
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(reps):
            jax.block_until_ready(fn(*args))
        jax.profiler.stop_trace()
        trace = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)[-1]
        events = json.load(gzip.open(trace))["traceEvents"]
    per_op = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e and e["name"] in op_names:
            per_op[e["name"]] += e["dur"] / reps / 1e3
    by_cat = collections.Counter()
    for name, ms in per_op.items():
        by_cat[jax_category(op_names[name], name)] += ms
    slowest = [(ms, jax_category(op_names[n], n), op_names[n]) for n, ms in per_op.most_common(top)]
    return by_cat, slowest


def profile_torch(fn, reps: int) -> collections.Counter:
    for _ in range(2):
        fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fn()
    by_cat = collections.Counter()
    for ev in prof.key_averages():
        by_cat[torch_category(ev.key)] += ev.self_cpu_time_total / reps / 1e3
    return by_cat


def breakdown(case: models.Case, reps: int, top: int) -> list[str]:
    params, inputs = case.jax_params, case.jax_inputs
    loss_fn, torch_fwd, torch_fwd_bwd = row_functions(case)  # the rows run_all.py times
    lines = []
    for mode, jax_fn, torch_fn in (("fwd", jax.jit(case.jax_apply), torch_fwd),
                                   ("fwd+bwd", jax.jit(jax.value_and_grad(loss_fn)), torch_fwd_bwd)):
        ours, slowest = profile_jax(jax_fn, (params, *inputs), reps, top)
        theirs = profile_torch(torch_fn, reps)
        total_j, total_t = sum(ours.values()), sum(theirs.values())
        lines += ["", f"{case.name}/{mode}: dreamjax op time {total_j:.1f} ms, torch eager self CPU {total_t:.1f} ms",
                  "", "| category | dreamjax ms (share) | torch eager ms (share) |", "|---|---|---|"]
        for cat in sorted(set(ours) | set(theirs), key=lambda c: (-ours[c], -theirs[c])):
            lines.append(f"| {cat} | {ours[cat]:.1f} ({100 * ours[cat] / total_j:.0f} %) "
                         f"| {theirs[cat]:.1f} ({100 * theirs[cat] / max(total_t, 1e-9):.0f} %) |")
        if slowest:
            lines.append(f"slowest dreamjax ops ({case.name}/{mode}):")
            lines += [f"  {ms:7.2f} ms  {cat[:24]:24s}  {name[-100:]}" for ms, cat, name in slowest]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None,
                    help=f"comma-separated subset of {','.join(models.BUILDERS)} (default: all)")
    ap.add_argument("--tiny", action="store_true", help="smoke-test sizes")
    ap.add_argument("--reps", type=int, default=5, help="profiled calls per side (default 5)")
    ap.add_argument("--top", type=int, default=0, help="also list the N slowest dreamjax ops of each row")
    args = ap.parse_args(argv)
    names = model_names(ap, args.only)
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    runtime.keep_freed_memory()  # as run_all.py: both sides in this process
    torch_uses_every_core()
    print(f"load average (1 min) before: {os.getloadavg()[0]:.2f}", flush=True)
    for name in names:
        case = models.BUILDERS[name]("tiny" if args.tiny else "default")
        print(f"\n## {case.description}")
        print("\n".join(breakdown(case, args.reps, args.top)), flush=True)
    print(f"\nload average (1 min) after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
