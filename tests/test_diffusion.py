"""Parity of dreamjax.diffusion with diffusers' DDPMScheduler / DDIMScheduler (spec 1.4, 1.5).

Schedulers are built from the SD 2.1-base scheduler config, written out below (no download).
DDPM's variance noise comes from torch's RNG inside diffusers, so the tests patch diffusers'
`randn_tensor` to return the same noise array that is handed to `ddpm_step(..., noise=...)`.
"""

from __future__ import annotations

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import diffusers.schedulers.scheduling_ddpm as diffusers_ddpm  # noqa: E402
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg  # noqa: E402

from dreamjax.diffusion.samplers import (  # noqa: E402
    classifier_free_guidance,
    ddim_step,
    ddpm_step,
    sample,
    timesteps,
)
from dreamjax.diffusion.schedule import (  # noqa: E402
    SD21_BASE,
    Schedule,
    ScheduleConfig,
    add_noise,
    training_target,
    velocity,
)
from tests.helpers import assert_close, max_rel_err  # noqa: E402

# stabilityai/stable-diffusion-2-1-base, scheduler/scheduler_config.json
SD21_BASE_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
TOL = 1e-5
SHAPE = (2, 4, 8, 8)  # NCHW, as diffusers; the steps are elementwise so the layout does not matter

ddpm_jit = jax.jit(ddpm_step, static_argnames=("num_inference_steps",))
ddim_jit = jax.jit(ddim_step, static_argnames=("num_inference_steps", "eta", "use_clipped_model_output"))


def both(overrides=None):
    """(our Schedule, diffusers DDPMScheduler, diffusers DDIMScheduler) for SD 2.1-base + overrides."""
    cfg = {**SD21_BASE_CONFIG, **(overrides or {})}
    quiet = {k: v for k, v in cfg.items() if k not in ("skip_prk_steps", "set_alpha_to_one")}
    ddpm = DDPMScheduler.from_config(quiet)
    ddim = DDIMScheduler.from_config({k: v for k, v in cfg.items() if k != "skip_prk_steps"})
    return Schedule.create(ScheduleConfig.from_diffusers(cfg)), ddpm, ddim


def fake_model(x, t, xp=np):
    """A fixed, smooth, deterministic stand-in for the UNet: x [..] -> ε-like output."""
    return 0.9 * xp.tanh(x) + 0.3 * xp.sin(0.01 * t + 2.0 * x)


def fake_variance(x, xp=np):
    """A positive 'predicted variance' channel block for the learned variance types."""
    return 0.02 * (1.0 + xp.tanh(x))


def torch_ddpm_step(sched, model_output, t, x, noise):
    with mock.patch.object(diffusers_ddpm, "randn_tensor", lambda *a, **k: torch.from_numpy(noise)):
        return sched.step(torch.from_numpy(model_output), t, x).prev_sample


def rng_normal(rng, shape=SHAPE):
    return rng.standard_normal(shape).astype(np.float32)


# ----------------------------------------------------------------------------- config & arrays


def test_sd21_config_and_diffusers_defaults():
    assert ScheduleConfig.from_diffusers(SD21_BASE_CONFIG) == SD21_BASE == ScheduleConfig()
    # A missing key takes diffusers' default, not ours (DDPMScheduler() clips, linear 1e-4..0.02).
    empty = ScheduleConfig.from_diffusers({})
    ref = DDPMScheduler().config
    for name in ("beta_start", "beta_end", "beta_schedule", "clip_sample", "steps_offset", "variance_type"):
        assert getattr(empty, name) == ref[name], name
    assert empty.set_alpha_to_one == DDIMScheduler().config.set_alpha_to_one
    with pytest.raises(ValueError, match="thresholding"):
        ScheduleConfig.from_diffusers({"thresholding": True})
    with pytest.raises(ValueError, match="beta_schedule"):
        ScheduleConfig(beta_schedule="sigmoid")


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"num_train_timesteps": 37, "beta_start": 0.001, "beta_end": 0.3},
    ],
)
def test_schedule_arrays_bitwise(overrides):
    ours, ddpm, ddim = both(overrides)
    np.testing.assert_array_equal(np.asarray(ours.betas), ddpm.betas.numpy())
    np.testing.assert_array_equal(np.asarray(ours.alphas), ddpm.alphas.numpy())
    np.testing.assert_array_equal(np.asarray(ours.alphas_cumprod), ddpm.alphas_cumprod.numpy())
    np.testing.assert_array_equal(np.asarray(ours.alphas_cumprod), ddim.alphas_cumprod.numpy())
    assert float(ours.final_alpha_cumprod) == float(ddim.final_alpha_cumprod)


def test_add_noise_velocity_target():
    ours, ddpm, _ = both()
    rng = np.random.default_rng(0)
    x0, noise = rng_normal(rng, (5, 4, 6, 6)), rng_normal(rng, (5, 4, 6, 6))
    t = np.array([0, 1, 250, 777, 999])
    ref = ddpm.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
    got = add_noise(ours, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    assert_close(got, ref.numpy(), 1e-6, "add_noise")
    ref_v = ddpm.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
    assert_close(velocity(ours, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)), ref_v.numpy(), 1e-6)
    # ε target for SD 2.1-base; v for a v-prediction config
    np.testing.assert_array_equal(training_target(ours, x0, noise, t), noise)
    v_sched = Schedule.create(ScheduleConfig(prediction_type="v_prediction"))
    assert_close(training_target(v_sched, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)), ref_v.numpy())
    # bf16 follows diffusers: ᾱ is cast to the sample dtype first, result stays bf16
    xb, nb = torch.from_numpy(x0).bfloat16(), torch.from_numpy(noise).bfloat16()
    ref_b = ddpm.add_noise(xb, nb, torch.from_numpy(t)).float().numpy()
    got_b = add_noise(ours, jnp.asarray(x0, jnp.bfloat16), jnp.asarray(noise, jnp.bfloat16), jnp.asarray(t))
    assert got_b.dtype == jnp.bfloat16
    assert_close(got_b.astype(jnp.float32), ref_b, 1e-2, "add_noise bf16")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_training_target_by_prediction_type(prediction_type):
    """The denoiser's regression target, as diffusers defines it: ε (its training scripts' `target = noise`),
    v (`get_velocity`), or the clean sample x0 ("sample": the pixel-space demo's x0-prediction). And a model
    that predicts its target exactly gives back x0 as `pred_original_sample` in diffusers' DDPM step."""
    ours, ddpm, _ = both({"prediction_type": prediction_type})
    rng = np.random.default_rng(1)
    x0, noise = rng_normal(rng, (4, 4, 6, 6)), rng_normal(rng, (4, 4, 6, 6))
    t = np.array([0, 10, 500, 999])
    got = np.array(training_target(ours, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)))  # writable
    if prediction_type == "v_prediction":
        expected = ddpm.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    else:
        expected = {"epsilon": noise, "sample": x0}[prediction_type]
    assert_close(got, expected, 1e-6, prediction_type)
    x_t = np.array(add_noise(ours, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)))
    for i, ti in enumerate(t):
        out = ddpm.step(torch.from_numpy(got[i : i + 1]), int(ti), torch.from_numpy(x_t[i : i + 1]))
        assert_close(out.pred_original_sample.numpy(), x0[i : i + 1], 1e-4, f"x0 at t={ti}")


# ----------------------------------------------------------------------------- timestep grids


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [10, 50, 150])
def test_timestep_grids(spacing, n):
    ours, ddpm, ddim = both({"timestep_spacing": spacing})
    ddpm.set_timesteps(n)
    ddim.set_timesteps(n)
    grid = timesteps(ours, n)
    np.testing.assert_array_equal(grid, ddpm.timesteps.numpy())
    np.testing.assert_array_equal(grid, ddim.timesteps.numpy())


def test_leading_grid_values():
    g = timesteps(Schedule.create(), 150)
    assert list(g[:3]) == [895, 889, 883] and g[-1] == 1 and len(g) == 150
    np.testing.assert_array_equal(g, (149 - np.arange(150)) * 6 + 1)  # spec 1.5
    with pytest.raises(ValueError, match="leaves"):
        timesteps(Schedule.create(), 1000)  # 999 * 1 + steps_offset = 1000 is past the table


# ----------------------------------------------------------------------------- DDPM


def run_ddpm(overrides, n, start, count, learned=False):
    """`count` consecutive steps from grid index `start`; returns the max per-step relative error."""
    ours, ddpm, _ = both(overrides)
    ddpm.set_timesteps(n)
    grid = timesteps(ours, n)
    rng = np.random.default_rng(n + start)
    x_ref = torch.from_numpy(rng_normal(rng))
    x = jnp.asarray(x_ref.numpy())
    worst = 0.0
    for t in grid[start : start + count]:
        t = int(t)
        noise = rng_normal(rng)
        out_ref = fake_model(x_ref.numpy(), t).astype(np.float32)
        xn = np.asarray(x)
        out = fake_model(xn, t).astype(np.float32)
        if learned:  # diffusers splits channels on axis 1 (NCHW); dreamjax on the last axis (NHWC)
            out_ref = np.concatenate([out_ref, fake_variance(x_ref.numpy()).astype(np.float32)], axis=1)
            out = np.concatenate([out, fake_variance(xn).astype(np.float32)], axis=1)
            to_nhwc = lambda a: jnp.moveaxis(jnp.asarray(a), 1, -1)
            new = ddpm_jit(
                ours, to_nhwc(out), t, to_nhwc(xn), None, num_inference_steps=n, noise=to_nhwc(noise)
            ).prev_sample
            x = jnp.moveaxis(new, -1, 1)
        else:
            x = ddpm_jit(ours, jnp.asarray(out), t, x, None, num_inference_steps=n, noise=noise).prev_sample
        x_ref = torch_ddpm_step(ddpm, out_ref, t, x_ref, noise)
        worst = max(worst, assert_close(x, x_ref.numpy(), TOL, f"ddpm t={t}"))
    return worst


@pytest.mark.parametrize("n,start", [(10, 0), (150, 0), (150, 140)])
def test_ddpm_ten_steps(n, start):
    run_ddpm({}, n, start, 10)


@pytest.mark.parametrize(
    "overrides,learned",
    [
        ({"prediction_type": "v_prediction"}, False),
        ({"prediction_type": "v_prediction", "clip_sample": True}, False),
        ({"prediction_type": "sample", "clip_sample": True, "clip_sample_range": 0.8}, False),
        ({"timestep_spacing": "trailing"}, False),
        ({"timestep_spacing": "linspace"}, False),
        ({"variance_type": "fixed_small_log"}, False),
        ({"variance_type": "fixed_large"}, False),
        ({"variance_type": "learned"}, True),
        ({"variance_type": "learned_range"}, True),
    ],
)
def test_ddpm_variants(overrides, learned):
    # a few steps at the start and the last ones (t -> prev_t = -1, ᾱ_prev = 1)
    run_ddpm(overrides, 7, 0, 2, learned)
    run_ddpm(overrides, 7, 4, 3, learned)


def test_ddpm_per_example_t_matches_scalar():
    ours = Schedule.create()
    rng = np.random.default_rng(1)
    x, out, z = (jnp.asarray(rng_normal(rng)) for _ in range(3))
    a = ddpm_jit(ours, out, 501, x, None, num_inference_steps=10, noise=z)
    b = ddpm_jit(ours, out, jnp.full((SHAPE[0],), 501), x, None, num_inference_steps=10, noise=z)
    np.testing.assert_array_equal(a.prev_sample, b.prev_sample)


# ----------------------------------------------------------------------------- DDIM


def run_ddim(overrides, n, start, count, eta):
    ours, _, ddim = both(overrides)
    ddim.set_timesteps(n)
    grid = timesteps(ours, n)
    rng = np.random.default_rng(7 + n)
    x_ref = torch.from_numpy(rng_normal(rng))
    x = jnp.asarray(x_ref.numpy())
    worst = 0.0
    for t in grid[start : start + count]:
        t = int(t)
        noise = rng_normal(rng) if eta > 0 else None
        out_ref = fake_model(x_ref.numpy(), t).astype(np.float32)
        out = fake_model(np.asarray(x), t).astype(np.float32)
        x = ddim_jit(ours, jnp.asarray(out), t, x, num_inference_steps=n, eta=eta, noise=noise).prev_sample
        x_ref = ddim.step(
            torch.from_numpy(out_ref),
            t,
            x_ref,
            eta=eta,
            variance_noise=None if noise is None else torch.from_numpy(noise),
        ).prev_sample
        worst = max(worst, assert_close(x, x_ref.numpy(), TOL, f"ddim t={t} eta={eta}"))
    return worst


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_ddim_ten_steps(eta, set_alpha_to_one):
    run_ddim({"set_alpha_to_one": set_alpha_to_one}, 10, 0, 10, eta)


@pytest.mark.parametrize(
    "overrides",
    [
        {"prediction_type": "v_prediction"},
        {"prediction_type": "v_prediction", "clip_sample": True},
        {"prediction_type": "sample"},
        {"timestep_spacing": "trailing"},
    ],
)
def test_ddim_variants(overrides):
    run_ddim(overrides, 10, 0, 2, 0.5)
    run_ddim(overrides, 10, 8, 2, 0.0)


# ----------------------------------------------------------------------------- CFG


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_cfg_rescale(rescale):
    rng = np.random.default_rng(3)
    uncond, cond = rng_normal(rng), 1.3 * rng_normal(rng) + 0.2
    scale = 7.5
    ref = torch.from_numpy(uncond) + scale * (torch.from_numpy(cond) - torch.from_numpy(uncond))
    if rescale > 0:
        ref = rescale_noise_cfg(ref, torch.from_numpy(cond), guidance_rescale=rescale)
    got = classifier_free_guidance(jnp.asarray(uncond), jnp.asarray(cond), scale, rescale)
    assert_close(got, ref.numpy(), TOL, "cfg")


# ----------------------------------------------------------------------------- sampling loop


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sample_loop_matches_diffusers_loop(sampler):
    """`sample` (one lax.scan) against diffusers' own loop over the same grid and noise."""
    n = 10
    ours, ddpm, ddim = both()
    sched = ddpm if sampler == "ddpm" else ddim
    sched.set_timesteps(n)
    key = jax.random.key(0, impl="rbg")  # any key type works; rbg compiles much faster on CPU
    x_init = np.array(jax.random.normal(jax.random.key(1), SHAPE))  # a writable copy for torch
    model_fn = lambda x, t: fake_model(x, t[:, None, None, None].astype(jnp.float32), jnp)
    got = jax.jit(lambda k: sample(model_fn, ours, SHAPE, k, n, sampler, x_init=x_init))(key)

    # the documented noise of step i: fold_in(split(key)[1], i)
    key_steps = jax.random.split(key)[1]
    # one jitted draw per step (not vmapped: rbg keys give other bits under vmap)
    step_noise = jax.jit(lambda i: jax.random.normal(jax.random.fold_in(key_steps, i), SHAPE))
    noises = [np.array(step_noise(i)) for i in range(n)]
    x_ref = torch.from_numpy(x_init)
    for i, t in enumerate(sched.timesteps):
        out = torch.from_numpy(fake_model(x_ref.numpy(), int(t)).astype(np.float32))
        if sampler == "ddpm":
            x_ref = torch_ddpm_step(sched, out.numpy(), int(t), x_ref, noises[i])
        else:
            x_ref = sched.step(out, int(t), x_ref).prev_sample
    err = max_rel_err(got, x_ref.numpy())
    assert err <= TOL, f"{sampler} loop: {err:.2e}"


def test_sample_loop_stochastic_ddim_and_errors():
    ours = Schedule.create()
    model_fn = lambda x, t: fake_model(x, t[:, None, None, None].astype(jnp.float32), jnp)
    key = jax.random.key(2, impl="rbg")
    det = sample(model_fn, ours, SHAPE, key, 5, "ddim")
    sto = sample(model_fn, ours, SHAPE, key, 5, "ddim", eta=1.0)
    assert bool(jnp.all(jnp.isfinite(sto))) and float(jnp.max(jnp.abs(sto - det))) > 1e-3
    with pytest.raises(ValueError, match="sampler"):
        sample(model_fn, ours, SHAPE, key, 5, "pndm")
    with pytest.raises(ValueError, match="key"):
        ddim_step(ours, det, 801, det, 5, eta=0.5)
