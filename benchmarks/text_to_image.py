"""Image sampling: dreamjax's compiled CFG loop + VAE decode vs the diffusers `StableDiffusionPipeline` on the
same UNet / VAE weights and the same conditions.

    .venv/bin/python benchmarks/text_to_image.py                # default size (~3 min on 2 idle cores)
    .venv/bin/python benchmarks/text_to_image.py --size small   # 16x16 latents
    .venv/bin/python benchmarks/text_to_image.py --tiny         # smoke run

Both sides get the conditions directly (diffusers: `prompt_embeds` / `negative_prompt_embeds`; dreamjax: the
readouts its LLM would give), so the timed work is the same: `steps` CFG UNet calls on a doubled batch, the
scheduler steps, and the VAE decode. diffusers runs eager fp32 (`output_type="np"`); dreamjax runs
`text_to_image.sample_images` (one jit around a `lax.scan`), compiled before timing. With DDIM (eta 0) and the
same initial latents the two compute the same images (the max relative error is printed); DDPM is timed too.
Repetitions alternate; speed-up = diffusers time / dreamjax time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dreamjax import runtime  # noqa: E402

if __name__ == "__main__":  # as the dreamjax command, for both sides; before the heavy imports
    runtime.rerun_with_huge_pages()

import diffusers  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from flax import linen as nn  # noqa: E402

from benchmarks.run_all import interleaved, max_rel_err, torch_uses_every_core  # noqa: E402
from dreamjax.convert import diffusers as dconv  # noqa: E402
from dreamjax.diffusion.schedule import Schedule, ScheduleConfig  # noqa: E402
from dreamjax.infer.text_to_image import image_keys, sample_images  # noqa: E402
from dreamjax.models.dreamllm import DreamLLM, SpecialTokenIds, build_config, init_params  # noqa: E402

SCHEDULER = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
             "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
             "steps_offset": 1}
SIZES = {
    # an SD-shaped UNet (3 levels, cross-attention, linear proj) at 32x32 latents, batch 2, 20 steps
    "default": dict(unet=dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
                              block_out_channels=[64, 128, 128],
                              down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                              up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                              attention_head_dim=8, cross_attention_dim=256, norm_num_groups=32,
                              use_linear_projection=True),
                    vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[32, 64],
                             layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 2,
                             up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=32, sample_size=64),
                    batch=2, steps=20, queries=64),
    "tiny": dict(unet=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                           block_out_channels=[32, 64],
                           down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                           up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[4, 4],
                           cross_attention_dim=64, norm_num_groups=8, use_linear_projection=True),
                 vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 32],
                          layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 2,
                          up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8, sample_size=16),
                 batch=2, steps=4, queries=4),
}
# the default UNet at 16x16 latents: 256-token self-attention (1024 tokens at 32x32 is where XLA:CPU falls behind)
SIZES["small"] = dict(SIZES["default"], unet={**SIZES["default"]["unet"], "sample_size": 16},
                      vae={**SIZES["default"]["vae"], "sample_size": 32})


def build(size: dict, workdir: str):
    torch.manual_seed(0)
    unet, vae = UNet2DConditionModel(**size["unet"]).eval(), AutoencoderKL(**size["vae"]).eval()
    unet.save_pretrained(os.path.join(workdir, "unet"))
    vae.save_pretrained(os.path.join(workdir, "vae"))
    cfg = build_config(dict(
        llm=dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, max_position_embeddings=128),
        vision=dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, image_size=16, patch_size=8),
        num_dream_queries=size["queries"], unet=dict(unet.config), vae=dict(vae.config)),
        vocab_size=64, tokens=SpecialTokenIds(1, 60, 61, 62, 63))
    model = DreamLLM(cfg)
    params = dict(nn.meta.unbox(init_params(model, jax.random.PRNGKey(0))))
    params["unet"] = dconv.load_diffusers_unet(workdir)[0]
    params["vae"] = dconv.load_diffusers_vae(workdir)[0]
    return unet, vae, model, params


def main(argv=None) -> int:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="default")
    p.add_argument("--tiny", action="store_true", help="= --size tiny (smoke run)")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    size = SIZES["tiny" if args.tiny else args.size]
    cores = torch_uses_every_core()
    runtime.keep_freed_memory()  # as the dreamjax command does; both sides of the comparison share it
    load_before = os.getloadavg()[0]
    print(f"text-to-image benchmark: jax {jax.__version__}, torch {torch.__version__} ({cores} threads), diffusers "
          f"{diffusers.__version__}; load average (1 min) before: {load_before:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        unet, vae, model, params = build(size, tmp)
    b, steps, guidance = size["batch"], size["steps"], 3.0
    side, ch, width = size["unet"]["sample_size"], size["unet"]["in_channels"], size["unet"]["cross_attention_dim"]
    rng = np.random.default_rng(0)
    cond = rng.standard_normal((b, size["queries"], width), np.float32)
    uncond = rng.standard_normal((b, size["queries"], width), np.float32)
    x_init = rng.standard_normal((b, side, side, ch), np.float32)
    pixels = side * 2 ** (len(size["vae"]["block_out_channels"]) - 1)  # the VAE's scale factor
    schedule = Schedule.create(ScheduleConfig.from_diffusers(SCHEDULER))
    keys = image_keys(0, 0, b)
    print(f"UNet {size['unet']['block_out_channels']} at {side}x{side}x{ch} latents, VAE "
          f"{size['vae']['block_out_channels']}, batch {b} (x2 for CFG), {steps} steps, {args.reps} reps")

    rows = []
    for sampler, sched_cls in (("ddim", DDIMScheduler), ("ddpm", DDPMScheduler)):
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                       scheduler=sched_cls.from_config(SCHEDULER), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        latents = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x_init, -1, 1)))

        def run_diffusers(pipe=pipe, latents=latents):
            with torch.inference_mode():
                return pipe(prompt_embeds=torch.from_numpy(cond), negative_prompt_embeds=torch.from_numpy(uncond),
                            num_inference_steps=steps, guidance_scale=guidance, latents=latents.clone(),
                            height=pixels, width=pixels, output_type="np").images

        def run_jax(sampler=sampler):
            out = sample_images(model, params, schedule, cond, uncond, keys, np.float32(guidance), x_init,
                                num_steps=steps, sampler=sampler, shape=(side, side, ch))
            return np.asarray(jax.block_until_ready(out))

        t0 = time.perf_counter()
        got = run_jax()
        compile_s = time.perf_counter() - t0
        want = run_diffusers()
        err = max_rel_err((got + 1) / 2, np.clip(want, 0, 1)) if sampler == "ddim" else float("nan")
        times = interleaved({"diffusers": run_diffusers, "dreamjax": run_jax}, args.reps, 0.0, 0.0)
        med = {k: statistics.median(v) for k, v in times.items()}
        best = {k: min(v) for k, v in times.items()}
        rows.append((sampler, med, best, err, compile_s))

    for sampler, med, best, err, compile_s in rows:
        print(f"{sampler}: diffusers {med['diffusers']:8.1f} ms, dreamjax {med['dreamjax']:8.1f} ms (median; best "
              f"{best['diffusers']:.1f} / {best['dreamjax']:.1f}); speed-up {med['diffusers'] / med['dreamjax']:.2f}x "
              f"median, {best['diffusers'] / best['dreamjax']:.2f}x best reps (goal >= 1.4x); images max rel err "
              f"{'n/a (per-step noise differs)' if np.isnan(err) else f'{err:.1e}'}; dreamjax first call "
              f"{compile_s:.1f}s")
    print(f"load average (1 min) before: {load_before:.2f}, after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
