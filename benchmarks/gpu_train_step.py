"""GPU train step at a 1.1B-Llama scale: dreamjax (jit, bf16 compute, fp32 master weights, optax AdamW) vs PyTorch
(transformers `LlamaForCausalLM`, SDPA attention, bf16 autocast, `torch.optim.AdamW(fused=True)`), eager and
`torch.compile`; step time, tokens/s and MFU of each.

    .venv/bin/python benchmarks/gpu_train_step.py                     # on a GPU: the 1.1B config, 8 x 2048 tokens
    .venv/bin/python benchmarks/gpu_train_step.py --dreamllm          # + the full DreamLLM stage-2 step, 1B class
    .venv/bin/python benchmarks/gpu_train_step.py --tiny --no-torch-compile   # smoke run (CPU is fine)

Model (TinyLlama-1.1B's shape): vocab 32000, hidden 2048, 22 layers, 32 heads / 4 KV heads, MLP 5632, untied head;
batch 8 x 2048 tokens, loss = next-token cross-entropy over every position (no padding).

Each side runs in its own process, one after the other (no contention for GPU memory, no two frameworks' CUDA
libraries in one process): first PyTorch, which saves its initial random weights (safetensors, `save_pretrained`)
before training, then dreamjax, which loads them with `convert.hf.load_hf_llama`; both print the loss of their
first step on the same weights and batch (bf16: agreement to ~1e-2 is expected). Each side runs `--warmup` steps,
then `--steps` timed steps (synchronised after every step); step time = median (best in brackets).

FLOPs per token (the "model FLOPs" of MFU, no rematerialisation counted): 6 N + 6 L S d, where N is the number of
parameters without the input embedding (a lookup; the untied output head counts) and 6 L S d is causal attention
(QK^T and PV are 4 S d FLOPs per token and layer forward, times 3 for forward + backward, halved by the causal
mask); for the 1.1B config that is 6.21 + 0.55 = 6.76 GFLOP/token. MFU = tokens/s x FLOPs per token / peak, with
peak = `--peak-tflops` (default 989: H100 SXM / H200 dense bf16). XLA's cost analysis of dreamjax's compiled step is
printed beside it (it counts what XLA runs, e.g. full S x S attention when the kernel does not skip the masked
half). The goal printed: dreamjax tokens/s / torch.compile tokens/s >= 1.25.

`--dreamllm`: dreamjax's real `make_train_step` for stage II on a 1B-class DreamLLM: the same LLM, a ViT-L/14 CLIP
at 224 px (256 image tokens), 64 dream queries, the Stable Diffusion 2.1-base UNet and VAE at 512 px (frozen, bf16),
one input and one output image per sample, 8 x 2048 tokens; random weights. Its MFU uses
`dreamjax.train.aot.analytic_flops` (LLM 6 N T + full-S attention, CLIP forward, UNet forward + backward and the VAE
encoder from XLA's count of their forwards) and XLA's cost analysis of the compiled step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SIZES = {
    "1b": dict(vocab=32000, hidden=2048, inter=5632, layers=22, heads=32, kv=4, batch=8, seq=2048),
    "tiny": dict(vocab=512, hidden=64, inter=128, layers=2, heads=4, kv=2, batch=2, seq=64),
}
LR, BETAS, EPS, WEIGHT_DECAY = 1e-4, (0.9, 0.95), 1e-8, 0.1


def flops_per_token(s: dict) -> tuple[float, float, int]:
    """(6 N, causal attention 6 L S d, N) per token; N without the input embedding."""
    d, f, h, kv = s["hidden"], s["inter"], s["heads"], s["kv"]
    head_dim = d // h
    attn = d * h * head_dim + 2 * d * kv * head_dim + h * head_dim * d  # q, k, v, o
    per_layer = attn + 3 * d * f + 2 * d  # + SwiGLU + two RMSNorm scales
    n = s["layers"] * per_layer + d + d * s["vocab"]  # + final norm + untied head
    return 6.0 * n, 6.0 * s["layers"] * s["seq"] * d, n


def tokens_batch(s: dict, seed: int = 0):
    import numpy as np

    return np.random.default_rng(seed).integers(0, s["vocab"], (s["batch"], s["seq"])).astype(np.int32)


def summarise(times_ms: list[float]) -> dict:
    return dict(median_ms=statistics.median(times_ms), best_ms=min(times_ms), times_ms=[round(t, 3) for t in times_ms])


# ----------------------------------------------------------------------------- PyTorch


def run_torch(args, s: dict, workdir: str) -> dict:
    import torch
    import transformers

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        from benchmarks.run_all import torch_uses_every_core

        torch_uses_every_core()
        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["kv"], max_position_embeddings=max(2048, s["seq"]),
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.02,
        attn_implementation="sdpa")
    with torch.device(dev):
        model = transformers.LlamaForCausalLM(cfg)  # fp32 master weights
    model.save_pretrained(os.path.join(workdir, "weights"))  # the initial weights, for the JAX side
    model.train()
    tokens = torch.from_numpy(tokens_batch(s)).long().to(dev)
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, fused=True)
        opt_kind = "fused"
    except (RuntimeError, TypeError, ValueError):  # a torch without the fused kernel for this device
        opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                                foreach=True)
        opt_kind = "foreach"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def step(m):
        with torch.autocast(device_type=dev, dtype=torch.bfloat16):
            loss = m(input_ids=tokens, labels=tokens, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def timed_steps(m) -> list[float]:
        out = []
        for _ in range(args.steps):
            sync()
            t0 = time.perf_counter()
            step(m)
            sync()
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    result = dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", optimizer=opt_kind,
                  torch=torch.__version__)
    first_loss = float(step(model).detach())  # the initial weights: the loss check
    for _ in range(args.warmup - 1):
        step(model)
    sync()
    result["eager"] = dict(summarise(timed_steps(model)), first_loss=first_loss)
    print(f"[torch] {result['device']}, AdamW {opt_kind}: first loss {first_loss:.5f}; eager step "
          f"{result['eager']['median_ms']:.1f} ms", flush=True)
    if args.torch_compile:
        try:
            cmodel = torch.compile(model)
            t0 = time.perf_counter()
            step(cmodel)
            sync()
            compile_s = time.perf_counter() - t0
            for _ in range(args.warmup - 1):
                step(cmodel)
            result["compile"] = dict(summarise(timed_steps(cmodel)), compile_s=compile_s)
            print(f"[torch] torch.compile: first step {compile_s:.1f}s, step {result['compile']['median_ms']:.1f} ms",
                  flush=True)
        except Exception as e:  # noqa: BLE001 - optional: report and continue
            print(f"[torch] torch.compile skipped: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
    return result


# ----------------------------------------------------------------------------- dreamjax


def _jax_env() -> None:
    # One process per side: let XLA take most of the GPU (the default 75% is short for 8 x 2048 tokens unrematted).
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")


def _compiler_options(args) -> dict | None:
    # --fast-compile (smoke tests): no LLVM backend optimisation; compiles ~2x faster on CPU, runs slower
    return {"xla_backend_optimization_level": 0} if args.fast_compile else None


def _attention_impl(args, backend: str) -> str | None:
    if args.attention_impl == "auto":
        return "cudnn" if backend == "gpu" else None
    return None if args.attention_impl == "none" else args.attention_impl


def run_jax(args, s: dict, workdir: str) -> dict:
    _jax_env()
    from functools import partial

    import jax
    import jax.numpy as jnp
    import optax

    from dreamjax.convert.hf import load_hf_llama
    from dreamjax.models.llama import Llama
    from dreamjax.train import losses
    from dreamjax.train.metrics import compiled_flops

    backend = jax.default_backend()
    params, cfg = load_hf_llama(os.path.join(workdir, "weights"), dtype=jnp.bfloat16, param_dtype=jnp.float32,
                                scan_layers=args.scan_layers, remat_policy=args.remat,
                                attention_impl=_attention_impl(args, backend))
    params = jax.device_put(params)
    tx = optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY)
    opt_state = tx.init(params)
    tokens = jnp.asarray(tokens_batch(s))
    model = Llama(cfg)

    def loss_fn(p, tok):
        logits = model.apply({"params": p}, tok, method=Llama.forward)  # bf16 compute, fp32 params
        total, count = losses.lm_loss_sum(logits, tok)  # CE in fp32 over every next-token target
        return total / count

    @partial(jax.jit, donate_argnums=(0, 1))
    def train_step(p, o, tok):
        loss, grads = jax.value_and_grad(loss_fn)(p, tok)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    t0 = time.perf_counter()
    compiled = train_step.lower(params, opt_state, tokens).compile(_compiler_options(args))
    compile_s = time.perf_counter() - t0
    xla_flops = compiled_flops(compiled)

    params, opt_state, loss = compiled(params, opt_state, tokens)
    first_loss = float(loss)
    for _ in range(args.warmup - 1):
        params, opt_state, loss = compiled(params, opt_state, tokens)
    jax.block_until_ready(loss)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        params, opt_state, loss = compiled(params, opt_state, tokens)
        jax.block_until_ready((params, opt_state, loss))
        times.append((time.perf_counter() - t0) * 1e3)
    dev = jax.devices()[0]
    result = dict(device=f"{dev.platform} {dev.device_kind}", jax=jax.__version__, compile_s=compile_s,
                  xla_flops=xla_flops, attention_impl=cfg.attention_impl, first_loss=first_loss, **summarise(times))
    print(f"[dreamjax] {result['device']}: compiled in {compile_s:.1f}s (attention {cfg.attention_impl or 'auto'}, "
          f"scan_layers={cfg.scan_layers}, remat {cfg.remat_policy}); first loss {first_loss:.5f}; step "
          f"{result['median_ms']:.1f} ms", flush=True)
    return result


DREAMLLM_SIZES = {
    # the 1.1B LLM, CLIP ViT-L/14 at 224 px, SD 2.1-base UNet + VAE at 512 px
    "1b": dict(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, image_size=224,
                    patch_size=14),
        queries=64, res_out=512,
        unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=[320, 640, 1280, 1280],
                  down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                  up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, attention_head_dim=[5, 10, 20, 20],
                  cross_attention_dim=1024, use_linear_projection=True, norm_num_groups=32),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
                 down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                 layers_per_block=2, norm_num_groups=32, sample_size=512)),
    "tiny": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, image_size=16, patch_size=8),
        queries=4, res_out=16,
        unet=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[16, 32],
                  down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=[2, 4],
                  cross_attention_dim=32, use_linear_projection=True, norm_num_groups=8),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16],
                 down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                 layers_per_block=1, norm_num_groups=4, sample_size=16)),
}


def run_dreamllm(args, s: dict) -> dict:
    """dreamjax's real stage-II train step (make_train_step) on a 1B-class DreamLLM; random weights."""
    _jax_env()
    import types

    import jax
    import jax.numpy as jnp

    from benchmarks.batches import make_batch, special_tokens
    from dreamjax.diffusion.schedule import SD21_BASE, Schedule
    from dreamjax.models.dreamllm import DreamLLM, build_config, init_params
    from dreamjax.parallel.mesh import make_mesh
    from dreamjax.parallel.sharding import DEFAULT_RULES
    from dreamjax.train.aot import analytic_flops
    from dreamjax.train.metrics import compiled_flops
    from dreamjax.train.optimizer import make_optimizer
    from dreamjax.train.stages import STAGES
    from dreamjax.train.state import create_state
    from dreamjax.train.step import StepConfig, make_train_step, shard_batch

    d = DREAMLLM_SIZES["tiny" if args.tiny else "1b"]
    backend = jax.default_backend()
    llm = dict(hidden_size=s["hidden"], intermediate_size=s["inter"], num_layers=s["layers"], num_heads=s["heads"],
               num_kv_heads=s["kv"], rms_norm_eps=1e-5, max_position_embeddings=max(2048, s["seq"]),
               tie_word_embeddings=False, scan_layers=args.scan_layers, remat_policy=args.remat,
               attention_impl=_attention_impl(args, backend))
    model_dict = dict(llm=llm, vision=dict(d["vision"], scan_layers=args.scan_layers), unet=d["unet"], vae=d["vae"],
                      num_dream_queries=d["queries"], select_layer=-2)
    cfg = build_config(model_dict, vocab_size=s["vocab"], tokens=special_tokens(s["vocab"]), dtype=jnp.bfloat16,
                       param_dtype=jnp.float32)
    model = DreamLLM(cfg)
    stage = STAGES["stage2"]
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    tx, _ = make_optimizer(learning_rate=LR, total_steps=10**9, warmup_steps=0, weight_decay=WEIGHT_DECAY, b2=BETAS[1])
    state, shardings = create_state(lambda k: init_params(model, k), tx, stage.trainable, mesh, DEFAULT_RULES,
                                    jax.random.PRNGKey(0), frozen_dtype=jnp.bfloat16)
    step_cfg = StepConfig(loss_weight_lm=stage.loss_weight_lm, loss_weight_vm=stage.loss_weight_vm)
    step = make_train_step(model, tx, Schedule.create(SD21_BASE), step_cfg, mesh, DEFAULT_RULES, shardings)
    size = dict(batch=s["batch"], seq=s["seq"], vocab=s["vocab"], res_out=d["res_out"])
    batch = shard_batch(make_batch(cfg, size), mesh, DEFAULT_RULES)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile(_compiler_options(args))
    compile_s = time.perf_counter() - t0
    xla_flops = compiled_flops(compiled)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.params)
    config = types.SimpleNamespace(
        train=types.SimpleNamespace(global_batch_size=s["batch"]),
        data=types.SimpleNamespace(max_length=s["seq"], max_images_in=1, max_images_out=1, resolution_out=d["res_out"]))
    analytic = analytic_flops(model, abstract, config, stage.trainable, step_cfg.noise_draws)

    state, metrics = compiled(state, batch)
    first_loss = float(metrics["loss"])
    for _ in range(args.warmup - 1):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append((time.perf_counter() - t0) * 1e3)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    result = dict(compile_s=compile_s, xla_flops=xla_flops, analytic=analytic, first_loss=first_loss,
                  params=int(n_params), **summarise(times))
    print(f"[dreamllm] {n_params / 1e9:.2f}B params (stage2: LLM + projectors + queries train), compiled in "
          f"{compile_s:.1f}s; first loss {first_loss:.4f}; step {result['median_ms']:.1f} ms", flush=True)
    return result


# ----------------------------------------------------------------------------- driver


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny Llama (2 layers, d=64, seq 64): a CPU smoke run")
    p.add_argument("--steps", type=int, default=10, help="timed steps per side (default %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first, the compile included (default 3)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="peak dense bf16 TFLOP/s of the device for MFU (default 989: H100 SXM / H200)")
    p.add_argument("--torch-compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time torch.compile (on by default; --no-torch-compile skips it)")
    p.add_argument("--dreamllm", action="store_true", help="also time the full DreamLLM stage-2 step (dreamjax)")
    p.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=False,
                   help="dreamjax: nn.scan over the layers (faster compile) instead of unrolled layers (default)")
    p.add_argument("--remat", default="none", help="dreamjax remat policy (default none: activations fit in 141 GB)")
    p.add_argument("--attention-impl", choices=("auto", "none", "xla", "cudnn"), default="auto",
                   help="dreamjax attention: auto = cudnn on GPU, XLA's choice elsewhere")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="PyTorch CPU threads (default: every core this process may use, as XLA's pool)")
    p.add_argument("--fast-compile", action="store_true",
                   help="XLA backend optimisation level 0 (faster compile, slower steps: smoke tests only)")
    p.add_argument("--only", choices=("torch", "jax", "dreamllm"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.warmup = max(1, args.warmup)
    return args


def child(args, s: dict) -> int:
    run = {"torch": lambda: run_torch(args, s, args.workdir), "jax": lambda: run_jax(args, s, args.workdir),
           "dreamllm": lambda: run_dreamllm(args, s)}[args.only]
    result = run()
    with open(os.path.join(args.workdir, f"{args.only}.json"), "w") as f:
        json.dump(result, f)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    s = SIZES["tiny" if args.tiny else "1b"]
    if args.only:
        return child(args, s)

    six_n, attn, n = flops_per_token(s)
    per_token = six_n + attn
    tokens = s["batch"] * s["seq"]
    peak = args.peak_tflops * 1e12
    print(f"Llama {s['layers']} layers, d={s['hidden']}, MLP {s['inter']}, {s['heads']} heads / {s['kv']} KV, vocab "
          f"{s['vocab']}, untied; N = {n / 1e9:.3f}B without the input embedding; batch {s['batch']} x {s['seq']}")
    print(f"FLOPs per token: 6N = {six_n / 1e9:.3f} G + causal attention 6*L*S*d = {attn / 1e9:.3f} G = "
          f"{per_token / 1e9:.3f} GFLOP/token (model FLOPs, no remat); peak {args.peak_tflops:.0f} TFLOP/s "
          f"(--peak-tflops)", flush=True)
    workdir = args.workdir or tempfile.mkdtemp(prefix="gpu_train_step_")
    results, failed = {}, []
    try:
        sides = ["torch", "jax"] + (["dreamllm"] if args.dreamllm else [])
        for side in sides:
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--only", side,
                                   "--workdir", workdir], cwd=ROOT)
            out = os.path.join(workdir, f"{side}.json")
            if proc.returncode != 0 or not os.path.exists(out):
                print(f"{side}: FAILED (exit {proc.returncode})", flush=True)
                failed.append(side)
                continue
            with open(out) as f:
                results[side] = json.load(f)
            print(f"  ({side} process: {time.perf_counter() - t0:.0f}s)", flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    rows = []
    if "torch" in results:
        rows.append(("torch eager", results["torch"]["eager"]))
        if "compile" in results["torch"]:
            rows.append(("torch.compile", results["torch"]["compile"]))
    if "jax" in results:
        rows.append(("dreamjax", results["jax"]))
    print(f"\n{'side':<15}{'step ms':>10}{'(best)':>10}{'tokens/s':>12}{'MFU':>8}")
    tps = {}
    for name, r in rows:
        tps[name] = tokens / (r["median_ms"] / 1e3)
        print(f"{name:<15}{r['median_ms']:>10.1f}{r['best_ms']:>10.1f}{tps[name]:>12.0f}"
              f"{tps[name] * per_token / peak:>8.1%}")
    if "jax" in results and "torch" in results:
        j, t = results["jax"]["first_loss"], results["torch"]["eager"]["first_loss"]
        print(f"first-step loss on the same weights and batch: dreamjax {j:.5f}, torch {t:.5f} (rel err "
              f"{abs(j - t) / abs(t):.1e}; bf16)")
        ref = "torch.compile" if "torch.compile" in tps else "torch eager"
        print(f"dreamjax / {ref} tokens/s: {tps['dreamjax'] / tps[ref]:.2f}x (goal >= 1.25)"
              + ("" if ref == "torch.compile" else " [torch.compile not timed]"))
        if "torch.compile" in tps:
            print(f"dreamjax / torch eager tokens/s: {tps['dreamjax'] / tps['torch eager']:.2f}x")
    if "jax" in results and results["jax"].get("xla_flops"):
        xf = results["jax"]["xla_flops"]
        print(f"dreamjax step: XLA cost analysis {xf / tokens / 1e9:.3f} GFLOP/token (model count "
              f"{per_token / 1e9:.3f}); MFU by XLA's count {xf / (results['jax']['median_ms'] / 1e3) / peak:.1%}")
    if "dreamllm" in results:
        r = results["dreamllm"]
        analytic = sum(r["analytic"].values())
        step_s = r["median_ms"] / 1e3
        print(f"DreamLLM stage-2 step ({r['params'] / 1e9:.2f}B params): {r['median_ms']:.1f} ms (best "
              f"{r['best_ms']:.1f}), {tokens / step_s:.0f} tokens/s; analytic {analytic / 1e12:.2f} TFLOP/step ("
              + ", ".join(f"{k} {v / 1e12:.2f}" for k, v in r["analytic"].items())
              + f") -> MFU {analytic / step_s / peak:.1%}"
              + (f"; XLA cost analysis {r['xla_flops'] / 1e12:.2f} TFLOP -> {r['xla_flops'] / step_s / peak:.1%}"
                 if r.get("xla_flops") else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
