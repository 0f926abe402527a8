"""Smoke test of `benchmarks/run_all.py`: the tiny LLaMA case runs end to end, prints its table rows, and the
JAX and PyTorch sides compute the same thing (forward outputs and gradients agree)."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^(llama/fwd(?:\+bwd)?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.eE+-]+)\s+([\d.]+)", re.M)


def test_run_all_quick_tiny_llama():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # conftest forces 8 host devices; the benchmark wants the plain CPU backend
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--tiny", "--only", "llama",
         "--no-torch-compile"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {m.group(1): m.groups()[1:] for m in ROW.finditer(proc.stdout)}
    assert set(rows) == {"llama/fwd", "llama/fwd+bwd"}, proc.stdout
    for name, (jax_ms, torch_ms, ratio, err, compile_s) in rows.items():
        assert float(jax_ms) > 0 and float(torch_ms) > 0 and float(ratio) > 0, name
        assert float(compile_s) > 0, name
        assert float(err) < 1e-3, f"{name}: max rel err {err}\n{proc.stdout}"
    assert re.search(r"load average \(1 min\) before: [\d.]+, after: [\d.]+", proc.stdout), proc.stdout


def _bench_env() -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # conftest forces 8 host devices; the benchmarks want the plain CPU backend
    env["JAX_PLATFORMS"] = "cpu"
    return env


def test_train_step_tiny():
    """The whole DreamLLM train step, dreamjax vs the PyTorch reference: same loss before and after one update,
    and every ratio line printed."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--tiny", "--no-torch-compile", "--reps", "2",
         "--fast-compile", "--torch-threads", "1"],
        cwd=ROOT, env=_bench_env(), capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    errs = re.search(r"loss rel err: step 1 ([\d.eE+-]+), step 2 ([\d.eE+-]+)", out)
    assert errs and max(float(errs.group(1)), float(errs.group(2))) < 1e-4, out
    assert re.search(r"speed-up \(torch time / dreamjax time\): [\d.]+x median, [\d.]+x best reps", out), out
    assert re.search(r"dreamjax step FLOPs: [\d.]+ GFLOP \(XLA cost analysis of the compiled step\), [\d.]+ GFLOP "
                     r"analytic", out), out
    assert re.search(r"CPU matmul peak .*: jnp.dot [\d.]+ GFLOP/s", out), out
    assert len(re.findall(r"= [\d.]+ of the jnp.dot matmul rate \(goal >= 0.5\)", out)) == 2, out
    assert re.search(r"load average \(1 min\) before: [\d.]+, after: [\d.]+", out), out


def test_gpu_train_step_tiny_on_cpu():
    """The GPU train-step script at its smoke size on the CPU: both sides run (one process each), on the same
    weights the first losses agree (bf16 compute), and the table, FLOPs per token and the ratio are printed."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_train_step.py"), "--tiny", "--no-torch-compile",
         "--steps", "2", "--warmup", "1", "--fast-compile", "--torch-threads", "1"],
        cwd=ROOT, env=_bench_env(), capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert re.search(r"FLOPs per token: 6N = [\d.]+ G \+ causal attention 6\*L\*S\*d = [\d.]+ G", out), out
    for side in ("torch eager", "dreamjax"):
        assert re.search(rf"^{side}\s+[\d.]+\s+[\d.]+\s+\d+\s+[\d.]+%$", out, re.M), out
    err = re.search(r"first-step loss on the same weights and batch: .*\(rel err ([\d.eE+-]+); bf16\)", out)
    assert err and float(err.group(1)) < 2e-2, out
    assert re.search(r"dreamjax / torch eager tokens/s: [\d.]+x \(goal >= 1.25\)", out), out


def test_gpu_train_step_flops_per_token():
    """The 1.1B config's model FLOPs per token: 6 N + causal attention = 6.76 GFLOP."""
    from benchmarks.gpu_train_step import SIZES, flops_per_token

    six_n, attn, n = flops_per_token(SIZES["1b"])
    assert abs(n - 1_034_512_384) < 1  # TinyLlama-1.1B: 1,100,048,384 parameters minus the 32000 x 2048 embedding
    assert abs((six_n + attn) / 1e9 - 6.76) < 0.01


def test_bench_all_lists_every_benchmark():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_all.py"), "--dry-run"], cwd=ROOT,
                          env=_bench_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for script in ("run_all", "train_step", "decode", "text_to_image", "data_pipeline", "convert_memory"):
        assert f"benchmarks/{script}.py" in proc.stdout, proc.stdout


def test_profile_models_tiny_llama():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_models.py"), "--tiny", "--only", "llama",
                           "--reps", "1", "--top", "3"], cwd=ROOT, env=_bench_env(), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for mode in ("fwd", "fwd+bwd"):
        m = re.search(rf"^llama/{re.escape(mode)}: dreamjax op time ([\d.]+) ms, torch eager self CPU ([\d.]+) ms$",
                      proc.stdout, re.M)
        assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0, proc.stdout
    # both sides put time in the matmuls; the shares of each table add up to ~100 %
    rows = re.findall(r"^\| dense matmuls \| ([\d.]+) \((\d+) %\) \| ([\d.]+) \((\d+) %\) \|$", proc.stdout, re.M)
    assert len(rows) == 2 and all(float(r[0]) > 0 and float(r[2]) > 0 for r in rows), proc.stdout
    tables = proc.stdout.split("dreamjax op time")[1:]
    for table in tables:
        shares = [int(s) for s in re.findall(r"^\| [^|]+ \| [\d.]+ \((\d+) %\)", table, re.M)]
        assert 95 <= sum(shares) <= 105, table
    assert "slowest dreamjax ops (llama/fwd+bwd):" in proc.stdout
