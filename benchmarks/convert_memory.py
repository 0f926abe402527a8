"""Peak host memory of `dreamjax import hf-llama` and `dreamjax export hf` on a 1B-parameter random Llama.

    .venv/bin/python benchmarks/convert_memory.py [--dtype bfloat16|float32] [--workdir DIR] [--keep]

1. A random Llama of TinyLlama-1.1B's shape (hidden 2048, 22 layers, MLP 5632, GQA 32/4 heads, vocabulary
   32000 with DreamLLM's tokens) is written to disk as transformers safetensors shards, one layer at a time
   (the writer never holds the model either).
2. `dreamjax import hf-llama` runs in a fresh process, then `dreamjax export hf` in another; each reports its
   peak resident set size (VmHWM from /proc/self/status: anonymous memory and mapped file pages, the whole
   process, Python, JAX and torch included) and the resident size just before the command (its baseline).
3. Every exported tensor is compared bit for bit with the source (in this process, not measured).

The ratio printed is peak RSS / model bytes; the acceptance bound is 1.5. The machine needs ~3x the model on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
                rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu", model_type="llama",
                architectures=["LlamaForCausalLM"], initializer_range=0.02)


def rss_mb() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


# ------------------------------------------------------------------------------------------------ the source


class _RandomLeaves:
    """`convert.export.Leaves` that makes each (unstacked) leaf from its own seed on demand."""

    def __init__(self, specs, dtype):
        self._specs, self._dtype = specs, dtype

    def specs(self):
        return {p: (s, self._dtype) for p, (s, _) in self._specs.items()}

    def fetch(self, paths):
        import numpy as np

        for i, path in enumerate(paths):
            shape = self._specs[path][0]
            rng = np.random.default_rng(abs(hash(path)) % (1 << 31) + i)
            x = rng.standard_normal(shape, dtype=np.float32) * (1.0 if path.endswith("scale") else 0.02)
            yield path, x.astype(self._dtype)


def write_source(path: str, dtype_name: str) -> tuple[int, int]:
    """The random 1B Llama as a transformers directory; returns (parameter bytes, parameters)."""
    import flax.linen as nn
    import jax
    import ml_dtypes
    import numpy as np

    from dreamjax.convert.core import flatten
    from dreamjax.convert.export import plan_export, write_safetensors
    from dreamjax.convert.hf import llama_rules
    from dreamjax.data.tokenizer import build_word_tokenizer
    from dreamjax.models import llama

    dtype = np.dtype(ml_dtypes.bfloat16) if dtype_name == "bfloat16" else np.dtype(np.float32)
    cfg = llama.LlamaConfig.from_hf(LLAMA_1B, scan_layers=False)  # one leaf per layer: small pieces to write
    abstract = nn.meta.unbox(jax.eval_shape(lambda: llama.init_params(cfg, jax.random.key(0))))
    specs = {p: (tuple(x.shape), x.dtype) for p, x in flatten(abstract).items()}
    leaves = _RandomLeaves(specs, dtype)
    plan = plan_export(leaves.specs(), llama_rules(cfg))
    os.makedirs(path)
    write_safetensors(plan, leaves, path, name="model", max_shard_bytes=1 << 30)
    # 31992 words + DreamLLM's 8 tokens = the 32000 rows of the embedding, so nothing grows
    build_word_tokenizer([f"w{i}" for i in range(15990)], path, include_template_words=False,
                         base_vocab_size=31992)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**LLAMA_1B, "torch_dtype": dtype_name}, f, indent=2)
    return sum(leaf.nbytes for leaf in plan), sum(leaf.nbytes // leaf.dtype.itemsize for leaf in plan)


# ------------------------------------------------------------------------------------------------ measured


def measure(argv: list[str]) -> None:
    """Child process: run one `dreamjax` command and print its memory as JSON on the last line."""
    import jax  # noqa: F401  (JAX started: part of the baseline; the command imports the rest itself)

    from dreamjax import cli

    jax.devices()
    before = rss_mb()["VmRSS"]
    t0 = time.time()
    rc = cli.main(argv)
    seconds = time.time() - t0
    print(json.dumps({"rc": rc, "baseline_mb": before, "peak_mb": rss_mb()["VmHWM"], "seconds": seconds}))


def run_child(argv: list[str]) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True, env=env,
                          cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"child failed: {' '.join(argv)}\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        sys.exit(f"dreamjax {' '.join(argv)} exited {result['rc']}\n{proc.stderr[-4000:]}")
    return result


def compare(src: str, exported: str) -> int:
    import numpy as np

    from dreamjax.convert.stream import TensorFiles

    a, b = TensorFiles(src), TensorFiles(exported)
    if sorted(a.keys()) != sorted(b.keys()):
        sys.exit("exported keys differ from the source's")
    for key in a.keys():
        x, y = a.get(key), b.get(key)
        if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(x.view(np.uint8), y.view(np.uint8)):
            sys.exit(f"{key} differs after import -> export")
    return len(a.keys())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a new temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--child", nargs=argparse.REMAINDER)
    args = p.parse_args()
    if args.child is not None:
        measure(args.child)
        return
    scratch = args.workdir or tempfile.mkdtemp(prefix="convert_memory_")
    os.makedirs(scratch, exist_ok=True)
    src, wd, out = (os.path.join(scratch, n) for n in ("llama_1b", "workdir", "exported"))
    try:
        t0 = time.time()
        model_bytes, n_params = write_source(src, args.dtype)
        model_mb = model_bytes / 2**20
        print(f"source: {model_bytes / 2**30:.2f} GiB of {args.dtype} tensors ({n_params:,} parameters), written "
              f"in {time.time() - t0:.0f} s")
        rows = {"import hf-llama": run_child(["import", "hf-llama", "--src", src, "--out", wd]),
                "export hf": run_child(["export", "hf", "--checkpoint", wd, "--out", out])}
        n = compare(src, os.path.join(out, "llm"))
        print(f"{'command':18s} {'baseline MB':>12s} {'peak MB':>10s} {'peak/model':>11s} "
              f"{'(peak-base)/model':>18s} {'seconds':>8s}")
        for name, r in rows.items():
            print(f"{name:18s} {r['baseline_mb']:12.0f} {r['peak_mb']:10.0f} {r['peak_mb'] / model_mb:11.2f} "
                  f"{(r['peak_mb'] - r['baseline_mb']) / model_mb:18.2f} {r['seconds']:8.1f}")
        worst = max(r["peak_mb"] for r in rows.values()) / model_mb
        print(f"model {model_mb:.0f} MB; {n} tensors bit-identical after import -> export; worst peak/model "
              f"{worst:.2f} ({'within' if worst < 1.5 else 'OVER'} the 1.5 bound)")
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
