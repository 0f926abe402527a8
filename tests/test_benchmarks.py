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
