"""JAX (jit) vs PyTorch (eager) on the same weights: forward and forward+backward of LLaMA, CLIP vision, UNet.

    .venv/bin/python benchmarks/run_all.py                  # everything, default sizes (~2.5 min on 2 idle cores)
    .venv/bin/python benchmarks/run_all.py --only llama     # one model (comma-separated list allowed)
    .venv/bin/python benchmarks/run_all.py --quick --tiny   # smoke run: few reps, tiny models

For every model the PyTorch reference (transformers / diffusers, random weights) is converted with the
dreamjax converter, so both sides run the same computation; the table's "max rel err" proves it (forward:
the outputs; fwd+bwd: the loss and every parameter gradient, max over tensors of max|a-b| / max|b|).

Timing: JAX functions are jitted and compiled ahead of time (compile time reported separately, not in the
step time), every call ends in block_until_ready; PyTorch runs eager fp32 (forward under inference_mode)
with torch.set_num_threads = the cores this process may use. JAX and PyTorch repetitions are interleaved
(alternating which goes first, a 20 ms untimed pause before each call) so both see the same machine noise;
the table shows medians, plus the ratio of the fastest reps (steadier when the machine is shared).
fwd+bwd: loss = mean(output**2), gradients w.r.t. all parameters (torch: zero_grad + backward).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the comparison is against PyTorch on the same CPU
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root: `benchmarks`
from dreamjax import runtime  # noqa: E402

if __name__ == "__main__":  # as the dreamjax command, for both sides; before the heavy imports
    runtime.rerun_with_huge_pages()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import models  # noqa: E402
from dreamjax.convert import core  # noqa: E402

# Timed repetitions: at most MAX_REPS, fewer when a round (one call of each framework) is slow, so that a
# (model, mode) takes about --budget seconds; never fewer than MIN_REPS. --reps N fixes the count.
# (No separate warmup: the agreement check runs every function once before the timing.)
MAX_REPS, MIN_REPS = 15, 5
QUICK_REPS = 3
DEFAULT_BUDGET_S = 10.0
SETTLE_S = 0.02  # untimed pause before every timed call


# ----------------------------------------------------------------------------- helpers


def max_rel_err(actual, expected) -> float:
    """max |a - e| / max |e| (relative to the reference's scale, robust near zeros)."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if a.shape != e.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {e.shape}")
    return float(np.max(np.abs(a - e)) / max(float(np.max(np.abs(e))), 1e-30))


def grads_max_rel_err(actual, expected, floor: float = 1e-3) -> float:
    """max over gradient tensors of max|a - e| / max(max|e|, floor * largest |e| of any tensor).

    The floor keeps gradients that are zero in exact arithmetic (attention key biases: softmax ignores a
    per-query constant; parameters the loss does not reach) from dividing rounding noise by rounding noise.
    """
    if jax.tree.structure(actual) != jax.tree.structure(expected):
        raise ValueError("gradient trees differ in structure")
    pairs = list(zip(jax.tree.leaves(actual), jax.tree.leaves(expected)))
    scale = max(float(np.max(np.abs(np.asarray(e, np.float64)))) for _, e in pairs)
    worst = 0.0
    for a, e in pairs:
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        denom = max(float(np.max(np.abs(e))), floor * scale, 1e-30)
        worst = max(worst, float(np.max(np.abs(a - e))) / denom)
    return worst


def torch_uses_every_core() -> int:
    """Give PyTorch as many threads as this process may use cores (XLA's pool takes them all too); returns it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(cores)
    return cores


def interleaved(fns: dict[str, Callable[[], object]], reps: int | None, budget_s: float,
                round_s: float) -> dict[str, list[float]]:
    """Rounds of one call of each fn (order alternating every round); returns wall times in ms.

    The caller has already run every fn once (the agreement check is the warmup) and measured `round_s`, the
    time of one round. reps None: as many rounds as fit in `budget_s`, within MIN_REPS..MAX_REPS.
    The garbage collector is off while timing (as in timeit)."""
    if reps is None:
        reps = max(MIN_REPS, min(MAX_REPS, int(budget_s / max(round_s, 1e-6))))
    times: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    gc.collect()
    gc.disable()
    try:
        for r in range(reps):
            for k in keys if r % 2 == 0 else keys[::-1]:
                time.sleep(SETTLE_S)  # let the other framework's idle worker threads stop spinning
                t0 = time.perf_counter()
                fns[k]()
                times[k].append((time.perf_counter() - t0) * 1e3)
    finally:
        gc.enable()
    return times


def timed(fn: Callable[[], object]):
    """(fn(), seconds)."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def compile_jax(fn, *args):
    """jit + ahead-of-time compile; returns (compiled, seconds for trace + lower + compile)."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def torch_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{name: grad}; a parameter the loss does not reach (CLIP's post_layernorm) has grad None in torch and
    zeros in JAX."""
    return {name: torch.zeros_like(p) if p.grad is None else p.grad for name, p in model.named_parameters()}


# ----------------------------------------------------------------------------- one model


def row_functions(case: models.Case) -> tuple[Callable, Callable, Callable]:
    """What a row measures: (the JAX loss, mean(out^2), of params and inputs; the torch forward under
    inference_mode; the torch loss + backward), the torch ones on `case.torch_model` or the module passed."""
    def loss_fn(p, *xs):
        return jnp.mean(jnp.square(case.jax_apply(p, *xs).astype(jnp.float32)))

    def torch_fwd(m=case.torch_model):
        with torch.inference_mode():
            return case.torch_forward(m)

    def torch_fwd_bwd(m=case.torch_model):
        case.torch_model.zero_grad(set_to_none=True)
        loss = case.torch_forward(m).float().square().mean()
        loss.backward()
        return loss

    return loss_fn, torch_fwd, torch_fwd_bwd


def bench_case(case: models.Case, reps: int | None, budget_s: float, use_torch_compile: bool) -> list[dict]:
    params, inputs, tmodel = case.jax_params, case.jax_inputs, case.torch_model
    loss_fn, torch_fwd, torch_fwd_bwd = row_functions(case)

    fwd, fwd_compile_s = compile_jax(case.jax_apply, params, *inputs)
    vg, vg_compile_s = compile_jax(jax.value_and_grad(loss_fn), params, *inputs)

    def jax_fwd():
        return jax.block_until_ready(fwd(params, *inputs))

    def jax_fwd_bwd():
        return jax.block_until_ready(vg(params, *inputs))

    # --- agreement; these first calls are also the warmup and tell how long a round takes
    (out_j, tj), (out_t, tt) = timed(jax_fwd), timed(torch_fwd)
    out_err = max_rel_err(out_j, case.to_jax_layout(core.to_numpy(out_t)))
    fwd_round_s = tj + tt
    ((loss_j, grads_j), tj), (loss_t, tt) = timed(jax_fwd_bwd), timed(torch_fwd_bwd)
    bwd_round_s = tj + tt
    grads_t = case.grads_to_flax(torch_grads(tmodel))
    grad_err = max(max_rel_err(loss_j, loss_t.item()), grads_max_rel_err(grads_j, grads_t))
    del out_j, out_t, grads_j, grads_t

    fns = {"jax_fwd": jax_fwd, "torch_fwd": torch_fwd}
    fns_bwd = {"jax_fwd_bwd": jax_fwd_bwd, "torch_fwd_bwd": torch_fwd_bwd}
    compiled_note = {}
    if use_torch_compile:
        # Opt-in: inductor needs a C++ compiler and takes a while; any failure just drops the column.
        try:
            cmodel = torch.compile(tmodel)
            (_, compiled_note["fwd"]), (_, compiled_note["fwd_bwd"]) = (
                timed(lambda: torch_fwd(cmodel)), timed(lambda: torch_fwd_bwd(cmodel)))
            _, t_fwd_c = timed(lambda: torch_fwd(cmodel))  # a warm call, for the round-time estimate
            _, t_bwd_c = timed(lambda: torch_fwd_bwd(cmodel))
            fns["torchc_fwd"] = lambda: torch_fwd(cmodel)
            fns_bwd["torchc_fwd_bwd"] = lambda: torch_fwd_bwd(cmodel)
            fwd_round_s, bwd_round_s = fwd_round_s + t_fwd_c, bwd_round_s + t_bwd_c
        except Exception as e:  # noqa: BLE001 - optional, report and continue
            print(f"  [{case.name}] torch.compile skipped: {type(e).__name__}: {str(e).splitlines()[0][:120]}",
                  flush=True)

    t_fwd = interleaved(fns, reps, budget_s, fwd_round_s)
    t_bwd = interleaved(fns_bwd, reps, budget_s, bwd_round_s)

    rows = []
    for mode, times, err, compile_s in (("fwd", t_fwd, out_err, fwd_compile_s),
                                        ("fwd+bwd", t_bwd, grad_err, vg_compile_s)):
        key = mode.replace("+", "_")
        jax_ms = statistics.median(times[f"jax_{key}"])
        torch_ms = statistics.median(times[f"torch_{key}"])
        row = dict(name=f"{case.name}/{mode}", jax_ms=jax_ms, torch_ms=torch_ms, ratio=torch_ms / jax_ms,
                   max_rel_err=err, compile_s=compile_s, reps=len(times[f"jax_{key}"]),
                   jax_ms_min=min(times[f"jax_{key}"]), torch_ms_min=min(times[f"torch_{key}"]),
                   times_ms={k: [round(t, 2) for t in v] for k, v in times.items()})
        if f"torchc_{key}" in times:
            row["torch_compile_ms"] = statistics.median(times[f"torchc_{key}"])
            row["torch_compile_ratio"] = row["torch_compile_ms"] / jax_ms
            row["torch_compile_s"] = compiled_note[key]
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- table


def format_table(rows: list[dict]) -> str:
    with_tc = any("torch_compile_ms" in r for r in rows)
    header = (f"{'name':<16}{'jax ms':>10}{'torch ms':>10}{'ratio':>8}{'max rel err':>13}{'jax compile s':>15}"
              f"{'ratio(min)':>12}")
    if with_tc:
        header += f"{'t.compile ms':>14}{'ratio':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        line = (f"{r['name']:<16}{r['jax_ms']:>10.1f}{r['torch_ms']:>10.1f}{r['ratio']:>8.2f}"
                f"{r['max_rel_err']:>13.1e}{r['compile_s']:>15.2f}{r['torch_ms_min'] / r['jax_ms_min']:>12.2f}")
        if with_tc:
            line += (f"{r['torch_compile_ms']:>14.1f}{r['torch_compile_ratio']:>8.2f}"
                     if "torch_compile_ms" in r else f"{'-':>14}{'-':>8}")
        lines.append(line)
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few repetitions (smoke runs)")
    ap.add_argument("--tiny", action="store_true", help="tiny models (smoke test)")
    ap.add_argument("--only", default=None,
                    help=f"comma-separated subset of {','.join(models.BUILDERS)} (default: all)")
    ap.add_argument("--reps", type=int, default=None,
                    help=f"timed repetitions per function (default: {MIN_REPS}..{MAX_REPS} to fit --budget; "
                         f"quick: {QUICK_REPS})")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                    help="seconds of timed repetitions per model and mode (default %(default)s)")
    ap.add_argument("--torch-compile", action=argparse.BooleanOptionalAction, default=True,
                    help="also time torch.compile (inductor; slow to compile, skipped if it fails; on by default, "
                         "--no-torch-compile skips it)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    args.names = model_names(ap, args.only)
    return args


def model_names(ap: argparse.ArgumentParser, only: str | None) -> list[str]:
    """The models an `--only` value names (None: all of models.BUILDERS); an unknown one is a usage error."""
    names = list(models.BUILDERS) if only is None else [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in models.BUILDERS]
    if unknown or not names:
        ap.error(f"--only: unknown model(s) {unknown}; choose from {', '.join(models.BUILDERS)}")
    return names


def main(argv=None) -> int:
    args = parse_args(argv)
    runtime.keep_freed_memory()  # as the dreamjax command does; both sides of the comparison share it
    cores = torch_uses_every_core()
    reps = args.reps or (QUICK_REPS if args.quick else None)
    size = "tiny" if args.tiny else "default"
    print(f"dreamjax benchmarks: jax {jax.__version__} ({jax.default_backend()}, {jax.devices()[0].device_kind}), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), {cores} cores, "
          f"{platform.processor() or platform.machine()}; sizes={size}", flush=True)

    load_before = os.getloadavg()[0]
    print(f"load average (1 min) before: {load_before:.2f}", flush=True)
    t_start = time.perf_counter()
    rows, notes = [], []
    for name in args.names:
        t0 = time.perf_counter()
        case = models.BUILDERS[name](size)
        build_s = time.perf_counter() - t0
        case_rows = bench_case(case, reps, args.budget, args.torch_compile)
        rows += case_rows
        notes.append(f"  {name}: {case.description}")
        print(f"  {name}: built + converted in {build_s:.1f}s, benchmarked in "
              f"{time.perf_counter() - t0 - build_s:.1f}s ({'/'.join(str(r['reps']) for r in case_rows)} reps)",
              flush=True)
        del case

    print()
    print(format_table(rows))
    print("ratio = torch ms / jax ms (>1: JAX faster), medians; ratio(min) = the same from the fastest reps "
          "(less sensitive to load); max rel err: fwd = outputs, fwd+bwd = loss and every gradient tensor")
    for r in rows:
        if "torch_compile_s" in r:
            notes.append(f"  {r['name']}: torch.compile first call (compile) {r['torch_compile_s']:.1f}s")
    print("\n".join(notes))
    print(f"total {time.perf_counter() - t_start:.0f}s")
    load_after = os.getloadavg()[0]
    print(f"load average (1 min) before: {load_before:.2f}, after: {load_after:.2f}")
    # This process keeps about one core's worth of load itself; more than that means something else ran.
    if max(load_before, load_after - 1.0) > 0.5 or abs(load_after - load_before) > 1.5:
        print(f"WARNING: the machine was not quiet (load {load_before:.2f} -> {load_after:.2f} on {cores} cores): "
              "PyTorch's threads suffer more from load than XLA's, so these ratios flatter JAX; rerun on a quiet "
              "machine before quoting them")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
