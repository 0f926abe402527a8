"""The CFG sampling loops, sharded over the batch, against diffusers' schedulers driven by the diffusers UNet
with the same weights, conditions, initial noise and per-step noise (latents after each of 10 steps within
1e-4), and the VAE decode against diffusers' (fp32)."""

from unittest import mock

import diffusers
import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from flax import linen as nn

from dreamjax.convert import diffusers as dconv
from dreamjax.diffusion.schedule import Schedule, ScheduleConfig
from dreamjax.infer import text_to_image as t2i
from dreamjax.infer.decode import put_batch
from dreamjax.models.dreamllm import DreamLLM, SpecialTokenIds, build_config, init_params
from dreamjax.parallel.mesh import make_mesh
from dreamjax.parallel.sharding import DEFAULT_RULES, logical_sharding
from tests.helpers import assert_close

STEPS, BATCH, GUIDANCE, Q = 10, 8, 3.0, 4
UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=[4, 4], cross_attention_dim=64, norm_num_groups=8, use_linear_projection=True,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 32], layers_per_block=1,
    down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8,
    sample_size=16,
)
# stable-diffusion-2-1-base's scheduler config (a PNDM config, which upstream reads as DDPM)
SCHEDULER = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
             "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    unet, vae = UNet2DConditionModel(**UNET).eval(), AutoencoderKL(**VAE).eval()
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    cfg = build_config(dict(
        llm=dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, max_position_embeddings=64),
        vision=dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, image_size=16, patch_size=8),
        num_dream_queries=Q, unet=dict(unet.config), vae=dict(vae.config)),
        vocab_size=64, tokens=SpecialTokenIds(bos=1, im_start=60, im_patch=61, dream_start=62, dream_end=63))
    model = DreamLLM(cfg)
    boxed = jax.eval_shape(lambda k: init_params(model, k), jax.random.PRNGKey(0))
    params = dict(nn.meta.unbox(init_params(model, jax.random.PRNGKey(0))))
    params["unet"] = dconv.load_diffusers_unet(str(root))[0]
    params["vae"] = dconv.load_diffusers_vae(str(root))[0]
    mesh = make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    params = jax.device_put(params, logical_sharding(boxed, mesh, DEFAULT_RULES))  # as a run holds them
    schedule = Schedule.create(ScheduleConfig.from_diffusers(SCHEDULER))
    rng = np.random.default_rng(0)
    draws = dict(
        cond=rng.standard_normal((BATCH, Q, 64), np.float32), uncond=rng.standard_normal((BATCH, Q, 64), np.float32),
        x_init=rng.standard_normal((BATCH, 8, 8, 4), np.float32),
        noise=rng.standard_normal((STEPS, BATCH, 8, 8, 4), np.float32),
    )
    return model, params, schedule, mesh, unet, vae, draws


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def _diffusers_loop(unet, scheduler, d):
    """diffusers' pipeline loop (`StableDiffusionPipeline.__call__` denoising part), driven by hand so the
    per-step noise is the test's."""
    scheduler.set_timesteps(STEPS)
    latents = _nchw(d["x_init"]) * scheduler.init_noise_sigma
    hidden = torch.cat([torch.from_numpy(d["uncond"]), torch.from_numpy(d["cond"])])
    out = []
    for i, t in enumerate(scheduler.timesteps):
        with torch.no_grad():
            eps = unet(scheduler.scale_model_input(torch.cat([latents] * 2), t), t, encoder_hidden_states=hidden).sample
        eps_u, eps_c = eps.chunk(2)
        eps = eps_u + GUIDANCE * (eps_c - eps_u)
        with mock.patch.object(diffusers.schedulers.scheduling_ddpm, "randn_tensor",
                               lambda *a, i=i, **k: _nchw(d["noise"][i])):
            latents = scheduler.step(eps, t, latents).prev_sample
        out.append(np.moveaxis(latents.numpy(), 1, -1))
    return np.stack(out), latents


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_loop_matches_diffusers_step_by_step(setup, sampler):
    model, params, schedule, mesh, unet, vae, d = setup
    scheduler = (DDPMScheduler if sampler == "ddpm" else DDIMScheduler).from_config(SCHEDULER)
    want, last = _diffusers_loop(unet, scheduler, d)
    put = lambda x: put_batch(x, mesh, DEFAULT_RULES)
    keys = put(np.asarray(t2i.image_keys(0, 0, BATCH)))
    with mesh:
        got = t2i.sample_images(model, params, schedule, put(d["cond"]), put(d["uncond"]), keys, np.float32(GUIDANCE),
                                put(d["x_init"]), jax.device_put(d["noise"], jax.sharding.NamedSharding(
                                    mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp")))),
                                num_steps=STEPS, sampler=sampler, shape=(8, 8, 4), trajectory=True)
    assert len(got.sharding.device_set) == 8  # the batch ran over the mesh
    for i in range(STEPS):
        assert_close(np.asarray(got[i]), want[i], 1e-4, f"{sampler} latents after step {i}")
    if sampler == "ddpm":  # and the VAE decode of the final latents, as the pipeline's decode
        with mesh:
            images = t2i.sample_images(model, params, schedule, put(d["cond"]), put(d["uncond"]), keys,
                                       np.float32(GUIDANCE), put(d["x_init"]), d["noise"], num_steps=STEPS,
                                       sampler=sampler, shape=(8, 8, 4))
        with torch.no_grad():
            ref = vae.decode(last / vae.config.scaling_factor).sample.clamp(-1, 1)
        assert_close(np.asarray(images), np.moveaxis(ref.numpy(), 1, -1), 1e-4, "decoded images")
