"""Samplers (spec 1.4, 1.5): diffusers' DDPM (ancestral) and DDIM steps, classifier-free guidance,
and a `lax.scan` sampling loop. Everything here is a pure function and can be jitted.

DreamLLM samples with `DDPMScheduler` itself (leading spacing, `steps_offset=1`, "fixed_small"):
with N steps the grid is t_i = (N-1-i)·⌊T/N⌋ + 1, and each step goes to the next grid point below,
with ᾱ_prev = 1 below t = 0. DDIM is here for the plain-SD evaluation path.

Conventions:
- `num_inference_steps` is a static Python int (it fixes the grid), as are the config fields.
- `t` is an int scalar or an int [B] vector (per-example coefficients broadcast over the trailing axes).
- Arithmetic is fp32 whatever the input dtype; the new sample comes back in `sample.dtype`.
- Randomness: pass a `key`, or an explicit standard-normal `noise` array shaped like `sample`
  (that is how the parity tests inject the noise diffusers draws with torch's RNG).
- Learned variances ("learned", "learned_range") read the variance from the second half of the
  model output's **last** axis (channels-last, as Flax convs), where diffusers splits axis 1 (NCHW).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dreamjax.diffusion.schedule import Schedule, ScheduleConfig, expand_to

F32 = jnp.float32


class StepOutput(NamedTuple):
    prev_sample: jax.Array  # x_{t_prev}, in sample.dtype
    pred_original_sample: jax.Array  # the model's x0 estimate (after clipping), in sample.dtype


# ----------------------------------------------------------------------------- timestep grids


def timesteps(schedule: Schedule | ScheduleConfig, num_inference_steps: int) -> np.ndarray:
    """diffusers' `set_timesteps(N)` for DDPM/DDIM: descending int32 timesteps, as a host array.

    leading:  arange(N) · ⌊T/N⌋ + steps_offset, reversed    (SD 2.1-base: 895, 889, …, 1 for N=150)
    trailing: round(arange(T, 0, -T/N)) - 1                   (may hold N+1 entries, as in diffusers)
    linspace: round(linspace(0, T-1, N)), reversed
    It depends only on static values, so it is a constant under `jax.jit`.
    """
    config = schedule.config if isinstance(schedule, Schedule) else schedule
    T, N = config.num_train_timesteps, int(num_inference_steps)
    if not 1 <= N <= T:
        raise ValueError(f"num_inference_steps must be in [1, {T}], got {N}")
    if config.timestep_spacing == "leading":
        grid = (np.arange(0, N) * (T // N)).round()[::-1].astype(np.int64) + config.steps_offset
    elif config.timestep_spacing == "trailing":
        grid = np.round(np.arange(T, 0, -T / N)).astype(np.int64) - 1
    else:  # linspace
        grid = np.linspace(0, T - 1, N).round()[::-1].astype(np.int64)
    if grid.max() >= T or grid.min() < 0:
        # e.g. leading spacing with steps_offset=1 and N=T reaches t=T, past the table (diffusers
        # would fail with an index error in `step`; under jit the gather would silently clamp).
        raise ValueError(f"timestep grid {grid.min()}..{grid.max()} leaves [0, {T - 1}] for N={N}")
    return grid.astype(np.int32)


def ddpm_previous_timestep(schedule: Schedule, t: jax.Array, num_inference_steps: int) -> jax.Array:
    """DDPM's previous timestep: the largest grid point below t, or -1 after the last one.

    On the grid this is diffusers' `previous_timestep` (the next entry of `scheduler.timesteps`);
    with leading spacing it equals t - ⌊T/N⌋.
    """
    grid = jnp.asarray(timesteps(schedule, num_inference_steps))
    t = jnp.asarray(t, jnp.int32)
    return jnp.max(jnp.where(grid < t[..., None], grid, -1), axis=-1)


# ----------------------------------------------------------------------------- shared pieces


def _alpha_prod(schedule: Schedule, t: jax.Array, prev_t: jax.Array, below_zero: jax.Array):
    """(ᾱ_t, ᾱ_prev) as fp32; ᾱ_prev = `below_zero` when prev_t < 0."""
    ac = schedule.alphas_cumprod
    alpha_prod_t = ac[t]
    alpha_prod_prev = jnp.where(prev_t >= 0, ac[jnp.maximum(prev_t, 0)], below_zero)
    return alpha_prod_t, alpha_prod_prev


def _x0_and_eps(config: ScheduleConfig, model_output, sample, alpha_prod_t, beta_prod_t):
    """The model output read as (x0, ε) according to `prediction_type` (diffusers' formulas)."""
    sqrt_a, sqrt_b = jnp.sqrt(alpha_prod_t), jnp.sqrt(beta_prod_t)
    if config.prediction_type == "epsilon":
        x0 = (sample - sqrt_b * model_output) / sqrt_a
        eps = model_output
    elif config.prediction_type == "sample":
        x0 = model_output
        eps = (sample - sqrt_a * x0) / sqrt_b
    else:  # v_prediction
        x0 = sqrt_a * sample - sqrt_b * model_output
        eps = sqrt_a * model_output + sqrt_b * sample
    if config.clip_sample:
        x0 = jnp.clip(x0, -config.clip_sample_range, config.clip_sample_range)
    return x0, eps


def _standard_normal(key, noise, like: jax.Array, who: str) -> jax.Array:
    if noise is not None:
        return jnp.asarray(noise, F32)
    if key is None:
        raise ValueError(f"{who}: pass a PRNG `key` or an explicit `noise` array")
    return jax.random.normal(key, like.shape, F32)


# ----------------------------------------------------------------------------- DDPM


def ddpm_step(
    schedule: Schedule,
    model_output: jax.Array,
    t: jax.Array,
    sample: jax.Array,
    key: jax.Array | None,
    num_inference_steps: int,
    *,
    noise: jax.Array | None = None,
) -> StepOutput:
    """One ancestral step x_t -> x_{prev_t}, as `DDPMScheduler.step` after `set_timesteps(N)`.

    model_output: like `sample`, or twice its channels (last axis) for learned variances.
    noise: optional standard-normal array shaped like `sample`, used instead of drawing from `key`.
    """
    config = schedule.config
    t = jnp.asarray(t, jnp.int32)
    prev_t = ddpm_previous_timestep(schedule, t, num_inference_steps)
    x = sample.astype(F32)
    model_output = model_output.astype(F32)

    predicted_variance = None
    if config.variance_type in ("learned", "learned_range"):
        channels = sample.shape[-1]
        if model_output.shape[-1] != 2 * channels:
            raise ValueError(
                f"variance_type={config.variance_type!r} needs {2 * channels} output channels "
                f"(mean, variance) on the last axis, got shape {model_output.shape}"
            )
        model_output, predicted_variance = model_output[..., :channels], model_output[..., channels:]

    # 1. alphas, betas (scalars, or [B] then expanded)
    alpha_prod_t, alpha_prod_prev = _alpha_prod(schedule, t, prev_t, jnp.float32(1.0))
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_prev = 1 - alpha_prod_prev
    current_alpha_t = alpha_prod_t / alpha_prod_prev
    current_beta_t = 1 - current_alpha_t
    e = lambda c: expand_to(c, x.ndim)

    # 2-3. predicted x0 (clipped when configured)
    x0, _ = _x0_and_eps(config, model_output, x, e(alpha_prod_t), e(beta_prod_t))

    # 4-5. posterior mean μ̃_t(x_t, x0), formula (7) of Ho et al.
    x0_coeff = jnp.sqrt(alpha_prod_prev) * current_beta_t / beta_prod_t
    xt_coeff = jnp.sqrt(current_alpha_t) * beta_prod_prev / beta_prod_t
    mean = e(x0_coeff) * x0 + e(xt_coeff) * x

    # 6. noise, only for t > 0. β̃_t = (1-ᾱ_prev)/(1-ᾱ_t)·β_t, clamped (its log is taken below).
    z = _standard_normal(key, noise, x, "ddpm_step")
    var = jnp.maximum((1 - alpha_prod_prev) / (1 - alpha_prod_t) * current_beta_t, 1e-20)
    kind = config.variance_type
    if kind == "fixed_small":
        noise_term = e(jnp.sqrt(var)) * z
    elif kind == "fixed_small_log":
        noise_term = e(jnp.exp(0.5 * jnp.log(var))) * z
    elif kind == "fixed_large":
        noise_term = e(jnp.sqrt(current_beta_t)) * z
    elif kind == "learned":  # the model predicts the variance itself
        noise_term = jnp.sqrt(predicted_variance) * z
    else:  # learned_range: interpolate log β̃_t .. log β_t by (v + 1) / 2
        frac = (predicted_variance + 1) / 2
        log_var = frac * e(jnp.log(current_beta_t)) + (1 - frac) * e(jnp.log(var))
        noise_term = jnp.exp(0.5 * log_var) * z
    prev = mean + jnp.where(e(t > 0), noise_term, 0.0)
    return StepOutput(prev.astype(sample.dtype), x0.astype(sample.dtype))


# ----------------------------------------------------------------------------- DDIM


def ddim_step(
    schedule: Schedule,
    model_output: jax.Array,
    t: jax.Array,
    sample: jax.Array,
    num_inference_steps: int,
    eta: float | jax.Array = 0.0,
    key: jax.Array | None = None,
    *,
    noise: jax.Array | None = None,
    use_clipped_model_output: bool = False,
) -> StepOutput:
    """One DDIM step, as `DDIMScheduler.step` after `set_timesteps(N)`.

    prev_t = t - ⌊T/N⌋ for every spacing (diffusers' DDIM does this even for trailing/linspace);
    below 0, ᾱ_prev is `schedule.final_alpha_cumprod` (1 with set_alpha_to_one, else ᾱ[0]).
    eta > 0 adds σ_t·z and needs `key` or `noise`; with a Python eta = 0 and neither, the step is
    deterministic (under jit, keep eta static for that, or pass a key: 0·z adds exactly nothing).
    """
    config = schedule.config
    t = jnp.asarray(t, jnp.int32)
    prev_t = t - config.num_train_timesteps // int(num_inference_steps)
    x = sample.astype(F32)
    model_output = model_output.astype(F32)

    alpha_prod_t, alpha_prod_prev = _alpha_prod(schedule, t, prev_t, schedule.final_alpha_cumprod)
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_prev = 1 - alpha_prod_prev
    e = lambda c: expand_to(c, x.ndim)

    x0, eps = _x0_and_eps(config, model_output, x, e(alpha_prod_t), e(beta_prod_t))

    # σ_t(η) = η · √((1-ᾱ_prev)/(1-ᾱ_t) · (1 - ᾱ_t/ᾱ_prev)), formula (16) of Song et al.
    variance = (beta_prod_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_prev)
    std = eta * jnp.sqrt(variance)
    if use_clipped_model_output:  # re-derive ε from the clipped x0 (Glide)
        eps = (x - e(jnp.sqrt(alpha_prod_t)) * x0) / e(jnp.sqrt(beta_prod_t))

    # x_prev = √ᾱ_prev · x0 + √(1-ᾱ_prev-σ²) · ε  (+ σ z), formula (12)
    direction = e(jnp.sqrt(1 - alpha_prod_prev - std**2)) * eps
    prev = e(jnp.sqrt(alpha_prod_prev)) * x0 + direction
    if noise is not None or key is not None:
        prev = prev + e(std) * _standard_normal(key, noise, x, "ddim_step")
    elif not (isinstance(eta, int | float) and eta == 0):
        raise ValueError(
            "ddim_step: eta is not a Python 0 (a traced eta counts as > 0), so pass a PRNG `key` or an "
            "explicit `noise` array, or make eta static"
        )
    return StepOutput(prev.astype(sample.dtype), x0.astype(sample.dtype))


# ----------------------------------------------------------------------------- guidance


def classifier_free_guidance(
    eps_uncond: jax.Array, eps_cond: jax.Array, scale: float | jax.Array, rescale: float | jax.Array = 0.0
) -> jax.Array:
    """ε_u + s·(ε_c − ε_u), then optionally Lin et al.'s guidance rescale (diffusers' `rescale_noise_cfg`).

    With rescale r: ε ← r·ε·std(ε_c)/std(ε) + (1−r)·ε, stds per example over all non-batch axes.
    """
    guided = eps_uncond + scale * (eps_cond - eps_uncond)
    if isinstance(rescale, int | float) and rescale == 0:
        return guided
    axes = tuple(range(1, guided.ndim))
    # torch's .std is the unbiased one; the ratio does not depend on it, but keep the numbers equal.
    std_cond = jnp.std(eps_cond, axis=axes, ddof=1, keepdims=True)
    std_guided = jnp.std(guided, axis=axes, ddof=1, keepdims=True)
    rescaled = guided * (std_cond / std_guided)
    return rescale * rescaled + (1 - rescale) * guided


# ----------------------------------------------------------------------------- the loop


def sample(
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    schedule: Schedule,
    shape: tuple[int, ...],
    key: jax.Array,
    num_steps: int,
    sampler: str = "ddpm",
    *,
    eta: float = 0.0,
    x_init: jax.Array | None = None,
    noise: jax.Array | None = None,
    trajectory: bool = False,
    on_step: Callable[[jax.Array], None] | None = None,
    dtype=jnp.float32,
) -> jax.Array:
    """Run the reverse process over `timesteps(schedule, num_steps)` with one `lax.scan`.

    model_fn(x, t) -> model output, with x [B, ...] and t int32 [B] (the current timestep for every
    example). Put CFG inside it, e.g. `classifier_free_guidance(*jnp.split(unet(x2, t2), 2), s)`.
    x_init: the starting x_T (default: N(0, I) from `key`, diffusers' init_noise_sigma is 1).
    Randomness: x_T from split(key)[0]; the noise of step i from fold_in(split(key)[1], i). `key` may also be
    one key per example ([B, 2] raw keys): then each example's noise comes from its own key alone, so an
    image does not depend on the batch it is drawn in (generation and evaluation give the same image).
    noise: explicit per-step standard normals [num_steps, *shape] instead of drawing them (parity tests
    inject the noise diffusers draws with torch's RNG).
    trajectory: return x after every step, [num_steps, *shape], instead of the final x.
    on_step: a host function called with the step index after each step (a progress bar); it runs through
    `jax.debug.callback`, so leave it None where the loop must stay free of host calls.
    Wrap in `jax.jit` with model_fn/shape/num_steps/sampler static (e.g. via functools.partial).
    """
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
    grid = timesteps(schedule, num_steps)
    per_example = key.ndim == 2
    if per_example and key.shape[0] != shape[0]:
        raise ValueError(f"sample: {key.shape[0]} per-example keys for a batch of {shape[0]}")
    split = jax.vmap(jax.random.split) if per_example else jax.random.split
    keys = split(key)
    key_init, key_steps = (keys[:, 0], keys[:, 1]) if per_example else (keys[0], keys[1])

    def normal(k, i=None):
        if per_example:
            ks = k if i is None else jax.vmap(lambda kk: jax.random.fold_in(kk, i))(k)
            return jax.vmap(lambda kk: jax.random.normal(kk, shape[1:], dtype))(ks)
        return jax.random.normal(k if i is None else jax.random.fold_in(k, i), shape, dtype)

    x = normal(key_init) if x_init is None else jnp.asarray(x_init, dtype)
    stochastic_ddim = not (isinstance(eta, int | float) and eta == 0)

    if noise is not None and tuple(noise.shape) != (len(grid),) + tuple(shape):
        raise ValueError(f"sample: noise has shape {tuple(noise.shape)}, want {(len(grid),) + tuple(shape)}")

    def step_noise(i):
        return normal(key_steps, i) if noise is None else jnp.asarray(noise, dtype)[i]

    def body(x, inputs):
        i, t = inputs
        out = model_fn(x, jnp.full((shape[0],), t, jnp.int32))
        if sampler == "ddpm":
            x = ddpm_step(schedule, out, t, x, None, num_steps, noise=step_noise(i)).prev_sample
        elif stochastic_ddim:
            x = ddim_step(schedule, out, t, x, num_steps, eta, None, noise=step_noise(i)).prev_sample
        else:
            x = ddim_step(schedule, out, t, x, num_steps, eta, None).prev_sample
        if on_step is not None:
            jax.debug.callback(on_step, i)
        return x, (x if trajectory else None)

    x, xs = jax.lax.scan(body, x, (jnp.arange(len(grid)), jnp.asarray(grid)))
    return xs if trajectory else x
