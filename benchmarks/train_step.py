"""The whole DreamLLM train step: dreamjax's jitted `make_train_step` vs the PyTorch reference, same weights and batch.

    .venv/bin/python benchmarks/train_step.py                       # default size (~4 min on 2 idle cores)
    .venv/bin/python benchmarks/train_step.py --no-torch-compile    # eager PyTorch only (~1.5 min)
    .venv/bin/python benchmarks/train_step.py --tiny                # smoke run

One step = stage II (spec 1.6): the forward through CLIP (frozen) + visual projector + LLM + dream queries, the
LM cross-entropy, the condition projector, the VAE encoder and the UNet's score-distillation MSE (both frozen,
the UNet differentiated through to reach the condition), the backward pass, global-norm clipping and an AdamW
update of the trainable parts (LLM, projectors, queries).

- dreamjax: the real `dreamjax.train.step.make_train_step` (one jit, donated state, one-device mesh), with
  `make_optimizer` (clip 1.0 + AdamW), compiled ahead of time (the compile time is printed apart).
- PyTorch: `tests/torch_reference/dreamllm_torch.py` (transformers Llama / CLIP with SDPA attention, diffusers
  UNet / VAE) with its per-token Python scans of the ids vectorised (same result), `clip_grad_norm_` and
  `torch.optim.AdamW` (fused on CPU when this torch has it, else foreach); eager, and `torch.compile` (on by
  default; `--no-torch-compile` skips it). fp32 on both sides, torch threads = this process's cores.

Random torch weights are converted into the Flax tree with `convert.dreamllm.dreamllm_from_torch`; the batch
is the batch contract (DESIGN section 3) built here, and the oracle gets the same diffusion draws (noise,
timesteps, posterior noise) that the JAX step makes from its RNG. Both sides run two checked steps and must
give the same loss (the second loss checks the AdamW update). Then repetitions alternate between the sides
(a 20 ms pause before each call), and the table shows medians and the fastest reps; speed-up = torch time /
dreamjax time. The 1-minute load average is printed before and after.

FLOPs of the dreamjax step: XLA's cost analysis of the compiled step (what XLA runs; the layers are unrolled
so no loop body is counted once) and the analytic count of `dreamjax.train.aot.analytic_flops` (6 N T for the
LLM, full-S attention, CLIP forward, the UNet forward + backward and VAE encoder from their forward FLOPs).
Achieved FLOP/s = FLOPs / median step time, divided by this CPU's fp32 matmul rate measured in the same run
(the best of 5 jitted 2048 x 2048 `jnp.dot`s). Goals printed: speed-up >= 2, FLOP/s ratio >= 0.5.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
import types

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
from dreamjax import runtime  # noqa: E402

if __name__ == "__main__":  # as the dreamjax command, for both sides; before the heavy imports
    runtime.rerun_with_huge_pages()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from benchmarks.batches import make_batch, special_tokens  # noqa: E402
from benchmarks.run_all import interleaved, max_rel_err, torch_uses_every_core  # noqa: E402
from dreamjax.convert.dreamllm import dreamllm_from_torch  # noqa: E402
from dreamjax.diffusion.schedule import SD21_BASE, Schedule  # noqa: E402
from dreamjax.models.dreamllm import DreamLLM, build_config, init_params  # noqa: E402
from dreamjax.parallel.mesh import make_mesh  # noqa: E402
from dreamjax.parallel.sharding import DEFAULT_RULES, logical_sharding  # noqa: E402
from dreamjax.train import losses  # noqa: E402
from dreamjax.train.aot import analytic_flops  # noqa: E402
from dreamjax.train.metrics import compiled_flops, measured_cpu_matmul_flops  # noqa: E402
from dreamjax.train.optimizer import make_optimizer  # noqa: E402
from dreamjax.train.stages import STAGES  # noqa: E402
from dreamjax.train.state import state_from_params  # noqa: E402
from dreamjax.train.step import StepConfig, make_train_step, shard_batch  # noqa: E402
from tests.torch_reference.dreamllm_torch import DreamLLMForCausalMLM, OutputImage  # noqa: E402

STAGE = STAGES["stage2"]  # LLM + projectors + queries train; CLIP, UNet, VAE frozen
FROZEN_TORCH = ("model.clip_vision_embedding.clip_vision_model.", "stable_diffusion_head.unet.",
                "stable_diffusion_head.vae.")
LR, WEIGHT_DECAY, EPS, CLIP_NORM = 1e-4, 0.01, 1e-8, 1.0
MAX_REPS, MIN_REPS = 15, 4
LOSS_TOL = 1e-3  # fp32 on both sides; the second step's loss after one AdamW update included

SIZES = {
    # LLaMA proportions at a CPU scale (hidden 512, 4 layers, 1024 tokens), a 3-layer CLIP on 32 px images, an
    # SD-2.x-shaped latent UNet (cross-attention at 16x16 latents) with a small VAE; one input and one output
    # image per sample.
    "default": dict(
        llm=dict(hidden_size=512, intermediate_size=1376, num_layers=4, num_heads=8, num_kv_heads=8),
        vocab=8192, batch=4, seq=256,
        vision=dict(hidden_size=128, intermediate_size=512, num_layers=3, num_heads=4, image_size=32, patch_size=8),
        queries=16,
        unet=dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=[32, 64],
                  down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=1,
                  attention_head_dim=[2, 4], cross_attention_dim=128, use_linear_projection=True,
                  norm_num_groups=16),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 32],
                 down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                 layers_per_block=1, norm_num_groups=8, sample_size=32),
        res_out=32),
    "tiny": dict(
        llm=dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=4),
        vocab=256, batch=2, seq=64,
        vision=dict(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, image_size=16, patch_size=8),
        queries=4,
        unet=dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[16, 32],
                  down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=1,
                  attention_head_dim=[2, 4], cross_attention_dim=32, use_linear_projection=True,
                  norm_num_groups=8),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16],
                 down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                 layers_per_block=1, norm_num_groups=4, sample_size=16),
        res_out=16),
}


# ----------------------------------------------------------------------------- models and batch


class Oracle(DreamLLMForCausalMLM):
    """The reference with its per-position Python scan of the ids (`int(ids[p])` for every token, ~1 ms per
    hundred tokens) replaced by one vectorised search: the same positions, so the same computation."""

    @staticmethod
    def _starts(ids: torch.Tensor, token: int) -> list[int]:
        return torch.nonzero(ids == token).flatten().tolist()


def dreamllm_config(size: dict):
    llm = dict(size["llm"], rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=max(512, size["seq"]),
               tie_word_embeddings=False, scan_layers=False, remat_policy="none")
    vision = dict(size["vision"], layer_norm_eps=1e-5, scan_layers=False)
    model = dict(llm=llm, vision=vision, unet=size["unet"], vae=size["vae"], num_dream_queries=size["queries"],
                 select_layer=-2)
    return build_config(model, vocab_size=size["vocab"], tokens=special_tokens(size["vocab"]))


def make_oracle(cfg, seed: int = 0) -> Oracle:
    """Random reference weights (library init, then noise on every parameter: no zero bias is special)."""
    s = cfg.tokens
    torch.manual_seed(seed)
    oracle = Oracle(
        transformers.LlamaConfig.from_dict(cfg.llm.to_hf_dict(), attn_implementation="sdpa"),
        transformers.CLIPVisionConfig.from_dict(cfg.vision.to_hf_dict(), attn_implementation="sdpa"),
        cfg.unet.to_diffusers_dict(), cfg.vae.to_diffusers_dict(), SD21_BASE.to_diffusers(),
        tokens={"im_start": s.im_start, "dream_start": s.dream_start}, num_dream_queries=cfg.num_dream_queries,
        select_layer=cfg.select_layer, loss_weight_lm=STAGE.loss_weight_lm, loss_weight_vm=STAGE.loss_weight_vm,
    )
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in oracle.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    for name, p in oracle.named_parameters():  # stage II: the towers are frozen, as on the JAX side
        p.requires_grad_(not name.startswith(FROZEN_TORCH))
    return oracle.train()


def jax_draws(step_rng, batch: dict, cfg):
    """The draws the JAX step makes from its step key (`losses.score_distillation_loss`, one noise draw):
    example i splits `example_keys(step_rng, rows)[i]` into (posterior noise, noise, timesteps, dropout) keys.
    Returns NHWC numpy (posterior noise [B, No, h, w, c], noise [B, No, h, w, c], timesteps [B, No])."""
    b, no, r = batch["images_out"].shape[:3]
    h = r // cfg.vae.downsample_factor
    shape = (no, h, h, cfg.vae.latent_channels)

    def example(key):
        k_lat, k_noise, k_t, _ = jax.random.split(key, 4)
        return (jax.random.normal(k_lat, shape, jnp.float32), jax.random.normal(k_noise, (1,) + shape)[0],
                jax.random.randint(k_t, (1, no), 0, SD21_BASE.num_train_timesteps)[0])

    draws = jax.jit(lambda key: jax.vmap(example)(losses.example_keys(key, jnp.arange(b))))(step_rng)
    return tuple(np.asarray(x) for x in draws)


def torch_inputs(batch: dict, draws) -> tuple:
    """The oracle's arguments for `batch` with the given draws (NHWC -> NCHW)."""
    latent_noise, noise, t = draws
    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(2, 0, 1)))
    b, no = batch["images_out_mask"].shape
    images = [[nchw(batch["images_in"][i, k]) for k in range(batch["images_in"].shape[1])] for i in range(b)]
    images_dm = [[OutputImage(nchw(batch["images_out"][i, k]), int(t[i, k]), nchw(noise[i, k]),
                              nchw(latent_noise[i, k])) for k in range(no)] for i in range(b)]
    return (torch.from_numpy(batch["tokens"]).long(), torch.from_numpy(batch["segment_ids"] > 0).long(),
            torch.from_numpy(batch["labels"]).long(), images, images_dm)


def torch_adamw(params) -> tuple[torch.optim.Optimizer, str]:
    """torch.optim.AdamW with the fastest implementation this torch has on CPU: fused, else foreach."""
    try:
        return torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=EPS, weight_decay=WEIGHT_DECAY,
                                 fused=True), "fused"
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=EPS, weight_decay=WEIGHT_DECAY,
                                 foreach=True), "foreach"


def torch_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    a = torch.ones((n, n))
    torch.mm(a, a)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, a)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny model (smoke run)")
    p.add_argument("--reps", type=int, default=None,
                   help=f"timed steps per side (default: {MIN_REPS}..{MAX_REPS} to fit --budget)")
    p.add_argument("--budget", type=float, default=30.0, help="seconds of timed repetitions (default %(default)s)")
    p.add_argument("--torch-compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the torch.compile'd reference (on by default; --no-torch-compile skips it)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="PyTorch CPU threads (default: every core this process may use, as XLA's pool)")
    p.add_argument("--fast-compile", action="store_true",
                   help="XLA backend optimisation level 0 (faster compile, slower steps: smoke tests only)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    runtime.keep_freed_memory()  # as the dreamjax command does; both sides of the comparison share it
    size = SIZES["tiny" if args.tiny else "default"]
    cores = torch_uses_every_core()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    load_before = os.getloadavg()[0]
    print(f"train-step benchmark: jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {cores} cores; sizes={'tiny' if args.tiny else 'default'}", flush=True)
    print(f"load average (1 min) before: {load_before:.2f}", flush=True)
    t_start = time.perf_counter()

    # --- the two sides, the same weights
    cfg = dreamllm_config(size)
    oracle = make_oracle(cfg)
    model = DreamLLM(cfg)
    schedule = Schedule.create(SD21_BASE)
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    abstract = jax.eval_shape(lambda k: init_params(model, k), jax.random.PRNGKey(0))
    params = jax.tree.map(jnp.asarray, dreamllm_from_torch(oracle.state_dict(), cfg))
    plain_abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    tx, _ = make_optimizer(learning_rate=LR, total_steps=10**9, warmup_steps=0, weight_decay=WEIGHT_DECAY, eps=EPS,
                           grad_clip_norm=CLIP_NORM)
    state_rng = jax.random.PRNGKey(42)
    state, shardings = state_from_params(params, logical_sharding(abstract, mesh, DEFAULT_RULES), tx,
                                         STAGE.trainable, mesh, state_rng)
    step_cfg = StepConfig(loss_weight_lm=STAGE.loss_weight_lm, loss_weight_vm=STAGE.loss_weight_vm)
    step = make_train_step(model, tx, schedule, step_cfg, mesh, DEFAULT_RULES, shardings)
    host_batch = make_batch(cfg, size)
    batch = shard_batch(host_batch, mesh, DEFAULT_RULES)
    t0 = time.perf_counter()
    # --fast-compile (smoke tests): no LLVM backend optimisation; compiles ~2x faster on CPU, runs slower
    compiled = step.lower(state, batch).compile({"xla_backend_optimization_level": 0} if args.fast_compile else None)
    compile_s = time.perf_counter() - t0
    trainable = [p for p in oracle.parameters() if p.requires_grad]
    opt, opt_kind = torch_adamw(trainable)

    n_llm = sum(x.size for x in jax.tree.leaves(params["llm"]))
    n_train = sum(p.numel() for p in trainable)
    n_all = sum(p.numel() for p in oracle.parameters())
    b, length = host_batch["tokens"].shape
    print(f"model: LLM d={cfg.llm.hidden_size} x {cfg.llm.num_layers} layers, vocab {cfg.llm.vocab_size} "
          f"({n_llm / 1e6:.1f}M); CLIP d={cfg.vision.hidden_size} x {cfg.vision.num_layers} on "
          f"{cfg.vision.image_size} px ({cfg.num_image_tokens} tokens); {cfg.num_dream_queries} dream queries; UNet "
          f"{cfg.unet.block_out_channels} at {cfg.unet.sample_size}x{cfg.unet.sample_size} latents + VAE "
          f"{list(cfg.vae.block_out_channels)} on {size['res_out']} px; {n_all / 1e6:.1f}M params, "
          f"{n_train / 1e6:.1f}M trainable (stage2)", flush=True)
    print(f"batch: {b} x {length} tokens ({int((host_batch['segment_ids'] > 0).sum())} real), 1 input + 1 output "
          f"image per sample; fp32; torch AdamW {opt_kind}; dreamjax step compiled in {compile_s:.1f}s", flush=True)

    # --- the draws of the first two steps (the state's RNG: rng_{k+1}, step_rng_k = split(rng_k))
    rngs, step_rngs = state_rng, []
    for _ in range(2):
        rngs, sr = jax.random.split(rngs)
        step_rngs.append(sr)
    inputs = [torch_inputs(host_batch, jax_draws(sr, host_batch, cfg)) for sr in step_rngs]

    def torch_step(m, args):
        out = m(*args)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(trainable, CLIP_NORM, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out["loss"].detach()

    box = {"state": state}

    def jax_step():
        box["state"], metrics = compiled(box["state"], batch)
        return jax.block_until_ready((box["state"], metrics))[1]

    # --- agreement: two steps on each side (also the warm-up; the second loss checks the update)
    t0 = time.perf_counter()
    jax_losses = [float(jax_step()["loss"]) for _ in range(2)]
    jax_round = (time.perf_counter() - t0) / 2
    t0 = time.perf_counter()
    torch_losses = [float(torch_step(oracle, a)) for a in inputs]
    torch_round = (time.perf_counter() - t0) / 2
    errs = [max_rel_err(j, t) for j, t in zip(jax_losses, torch_losses)]
    print(f"loss step 1: dreamjax {jax_losses[0]:.6f}, torch {torch_losses[0]:.6f} (rel err {errs[0]:.1e}); "
          f"step 2 (after one AdamW update): dreamjax {jax_losses[1]:.6f}, torch {torch_losses[1]:.6f} "
          f"(rel err {errs[1]:.1e})", flush=True)

    fns = {"dreamjax": jax_step, "torch": lambda: torch_step(oracle, inputs[0])}
    round_s = jax_round + torch_round
    if args.torch_compile:
        try:
            # The reference's data-dependent Python (slot search, target count) splits it into several graphs;
            # dynamo warns at every break: keep the output readable.
            logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
            cmodel = torch.compile(oracle)
            t0 = time.perf_counter()
            torch_step(cmodel, inputs[0])
            tc_compile_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            torch_step(cmodel, inputs[0])
            round_s += time.perf_counter() - t0
            fns["torch.compile"] = lambda: torch_step(cmodel, inputs[0])
            print(f"torch.compile first step (compile): {tc_compile_s:.1f}s", flush=True)
        except Exception as e:  # noqa: BLE001 - optional: report and continue
            print(f"torch.compile skipped: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)

    reps = args.reps or max(MIN_REPS, min(MAX_REPS, int(args.budget / max(round_s, 1e-6))))
    times = interleaved(fns, reps, args.budget, round_s)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}

    # --- FLOPs and the matmul peak
    xla_flops = compiled_flops(compiled)
    config = types.SimpleNamespace(
        train=types.SimpleNamespace(global_batch_size=b),
        data=types.SimpleNamespace(max_length=length, max_images_in=1, max_images_out=1,
                                   resolution_out=size["res_out"]))
    analytic = analytic_flops(model, plain_abstract, config, STAGE.trainable, step_cfg.noise_draws)
    analytic_total = sum(analytic.values())
    jax_peak = measured_cpu_matmul_flops(2048, 5)
    torch_peak = torch_matmul_flops(2048, 5)

    print(f"\n{reps} timed steps per side, alternating (ms per step):")
    print(f"  {'side':<15}{'median':>10}{'best':>10}{'speed-up':>10}{'(best)':>8}")
    for k in fns:
        su = f"{med[k] / med['dreamjax']:>10.2f}{best[k] / best['dreamjax']:>8.2f}" if k != "dreamjax" else ""
        print(f"  {k:<15}{med[k]:>10.1f}{best[k]:>10.1f}{su}")
    for k in fns:
        if k != "dreamjax":
            print(f"speed-up ({k} time / dreamjax time): {med[k] / med['dreamjax']:.2f}x median, "
                  f"{best[k] / best['dreamjax']:.2f}x best reps (goal >= 2x)")
    print(f"dreamjax step FLOPs: {xla_flops / 1e9 if xla_flops else float('nan'):.2f} GFLOP (XLA cost analysis of the "
          f"compiled step), {analytic_total / 1e9:.2f} GFLOP analytic ("
          + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in analytic.items()) + ")")
    print(f"CPU matmul peak (measured now, best of 5 fp32 2048x2048): jnp.dot {jax_peak / 1e9:.1f} GFLOP/s, "
          f"torch.mm {torch_peak / 1e9:.1f} GFLOP/s")
    for what, flops in (("XLA cost analysis", xla_flops), ("analytic", analytic_total)):
        if flops:
            rate = flops / (med["dreamjax"] / 1e3)
            print(f"dreamjax achieved FLOP/s ({what} FLOPs / median step): {rate / 1e9:.1f} GFLOP/s = "
                  f"{rate / jax_peak:.2f} of the jnp.dot matmul rate (goal >= 0.5)")
    print(f"loss rel err: step 1 {errs[0]:.1e}, step 2 {errs[1]:.1e} (tolerance {LOSS_TOL:.0e})")
    load_after = os.getloadavg()[0]
    print(f"total {time.perf_counter() - t_start:.0f}s; load average (1 min) before: {load_before:.2f}, "
          f"after: {load_after:.2f}")
    if max(load_before, load_after - 1.0) > 0.5 or abs(load_after - load_before) > 1.5:
        print(f"WARNING: the machine was not quiet (load {load_before:.2f} -> {load_after:.2f} on {cores} cores); "
              "rerun on a quiet machine before quoting these numbers")
    return 0 if max(errs) < LOSS_TOL else 1


if __name__ == "__main__":
    sys.exit(main())
