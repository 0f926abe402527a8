"""DDPM noise schedule (spec 1.5): betas, ᾱ, the forward process `add_noise`, and training targets.

The arrays match diffusers' `DDPMScheduler` / `DDIMScheduler` bit for bit. They are computed once on
the host in NumPy, following the float32 arithmetic of the PyTorch CPU kernels that diffusers calls:

- `torch.linspace(a, b, n, dtype=float32)` computes `a + step * i` in the first half and
  `b - step * (n - 1 - i)` in the second, in float32, with a fused multiply-add (one rounding).
  We do the same in float64, where both the product and the sum are exact, and round once.
- `torch.cumprod` on CPU accumulates float32 inputs in float64 and rounds each output to float32.
  `np.cumprod` or `jnp.cumprod` in float32 differ from diffusers in the last bit for most entries.

Layout-agnostic: `t` indexes the leading (batch) axis; everything after it broadcasts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# diffusers' DDPM variance types that we support. "fixed_large_log" is left out on purpose:
# diffusers' DDPM step takes the square root of that *log* variance, which is NaN.
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """The scheduler settings dreamjax uses. The defaults are the SD 2.1-base values (`SD21_BASE`).

    Hashable, so it can be static metadata of a jitted `Schedule`.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    steps_offset: int = 1
    timestep_spacing: str = "leading"
    variance_type: str = "fixed_small"  # DDPM only
    set_alpha_to_one: bool = False  # DDIM only: ᾱ used below t=0 is 1 (True) or ᾱ[0] (False)

    def __post_init__(self):
        for name, allowed in (
            ("beta_schedule", BETA_SCHEDULES),
            ("prediction_type", PREDICTION_TYPES),
            ("timestep_spacing", TIMESTEP_SPACINGS),
            ("variance_type", VARIANCE_TYPES),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"ScheduleConfig.{name}={value!r} is not supported; use one of {allowed}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> ScheduleConfig:
        """Build from a diffusers scheduler config (a `scheduler_config.json` dict).

        Keys that dreamjax does not model (`_class_name`, `_diffusers_version`, `skip_prk_steps`, ...)
        are ignored. A key *missing* from `config` takes **diffusers'** default (DDPMScheduler's;
        `set_alpha_to_one` takes DDIMScheduler's), not ours: a hand-written config that omits
        `clip_sample` means `clip_sample=True` to diffusers, and so it does here.
        Settings that would change the numbers but that we do not implement raise ValueError.
        """
        if config.get("trained_betas") is not None:
            raise ValueError("diffusers scheduler option trained_betas is not supported")
        for key in ("thresholding", "rescale_betas_zero_snr"):
            if config.get(key):
                raise ValueError(f"diffusers scheduler option {key}={config[key]!r} is not supported")
        values = {f.name: config.get(f.name, _DIFFUSERS_DEFAULTS[f.name]) for f in dataclasses.fields(cls)}
        return cls(**values)

    def to_diffusers(self) -> dict[str, Any]:
        """The equivalent diffusers config dict (for `DDPMScheduler.from_config` / `DDIMScheduler`)."""
        return dataclasses.asdict(self)


# diffusers' own constructor defaults (DDPMScheduler; `set_alpha_to_one` from DDIMScheduler).
_DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="epsilon",
    clip_sample=True,
    clip_sample_range=1.0,
    steps_offset=0,
    timestep_spacing="leading",
    variance_type="fixed_small",
    set_alpha_to_one=True,
)

# `stabilityai/stable-diffusion-2-1-base/scheduler/scheduler_config.json` (a PNDM config; DreamLLM
# builds DDPMScheduler from it, spec 1.5). Keys absent from it take diffusers' defaults:
# timestep_spacing="leading", variance_type="fixed_small", clip_sample_range=1.0.
SD21_BASE_SCHEDULER_CONFIG: Mapping[str, Any] = {
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
SD21_BASE = ScheduleConfig.from_diffusers(SD21_BASE_SCHEDULER_CONFIG)


# ----------------------------------------------------------------------------- betas (host, NumPy)


def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """`torch.linspace(start, end, n, dtype=torch.float32)` on CPU, bit for bit (see module doc)."""
    s, e = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([s], np.float32)
    step = (e - s) / np.float32(n - 1)  # float32, as the kernel's `step_t`
    i = np.arange(n)
    lo = np.float64(s) + np.float64(step) * i.astype(np.float32).astype(np.float64)
    hi = np.float64(e) - np.float64(step) * (n - 1 - i).astype(np.float32).astype(np.float64)
    return np.where(i < n // 2, lo, hi).astype(np.float32)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """diffusers' `betas_for_alpha_bar` (Glide cosine): Python floats, then float32."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.asarray(betas, np.float64).astype(np.float32)


def make_betas(config: ScheduleConfig) -> np.ndarray:
    """β_t for t = 0..T-1 as float32 NumPy, identical to diffusers' `scheduler.betas`."""
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        return _torch_linspace_f32(config.beta_start, config.beta_end, n)
    if config.beta_schedule == "scaled_linear":
        root = _torch_linspace_f32(config.beta_start**0.5, config.beta_end**0.5, n)
        return root * root  # torch's `** 2` is an exact float32 square
    return _cosine_betas(n)  # squaredcos_cap_v2


# ----------------------------------------------------------------------------- Schedule (a pytree)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["betas", "alphas", "alphas_cumprod", "final_alpha_cumprod"],
    meta_fields=["config"],
)
@dataclasses.dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous; identity is enough
class Schedule:
    """The fp32 schedule arrays plus their (static) config; a pytree, so it can cross `jax.jit`.

    betas, alphas, alphas_cumprod: [T] float32.  final_alpha_cumprod: [] float32, the ᾱ DDIM uses
    for a previous timestep below 0 (1.0 with `set_alpha_to_one`, else ᾱ[0]).
    """

    config: ScheduleConfig
    betas: jax.Array
    alphas: jax.Array
    alphas_cumprod: jax.Array
    final_alpha_cumprod: jax.Array

    @classmethod
    def create(cls, config: ScheduleConfig = SD21_BASE) -> Schedule:
        betas = make_betas(config)
        alphas = np.float32(1.0) - betas
        # float64 accumulation, float32 outputs: what torch.cumprod does on CPU.
        alphas_cumprod = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
        final = np.float32(1.0) if config.set_alpha_to_one else alphas_cumprod[0]
        return cls(
            config=config,
            betas=jnp.asarray(betas),
            alphas=jnp.asarray(alphas),
            alphas_cumprod=jnp.asarray(alphas_cumprod),
            final_alpha_cumprod=jnp.asarray(final, jnp.float32),
        )

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps


# ----------------------------------------------------------------------------- forward process


def expand_to(coef: jax.Array, ndim: int) -> jax.Array:
    """Per-example coefficients [B] -> [B, 1, ..., 1] (ndim axes); a scalar stays a scalar."""
    coef = jnp.asarray(coef)
    return coef.reshape(coef.shape + (1,) * (ndim - coef.ndim)) if coef.ndim else coef


def _noise_scales(schedule: Schedule, t: jax.Array, dtype, ndim: int) -> tuple[jax.Array, jax.Array]:
    # As diffusers: ᾱ is cast to the sample dtype *before* the square roots (bf16 stays bf16).
    ac = schedule.alphas_cumprod.astype(dtype)[jnp.asarray(t)]
    return expand_to(jnp.sqrt(ac), ndim), expand_to(jnp.sqrt(1 - ac), ndim)


def add_noise(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """q(x_t | x_0): √ᾱ_t · x0 + √(1-ᾱ_t) · noise.  x0, noise [B, ...]; t int [B] (or a scalar)."""
    sqrt_a, sqrt_one_minus_a = _noise_scales(schedule, t, x0.dtype, x0.ndim)
    return sqrt_a * x0 + sqrt_one_minus_a * noise


def velocity(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """The v-prediction target: √ᾱ_t · noise - √(1-ᾱ_t) · x0 (diffusers' `get_velocity`)."""
    sqrt_a, sqrt_one_minus_a = _noise_scales(schedule, t, x0.dtype, x0.ndim)
    return sqrt_a * noise - sqrt_one_minus_a * x0


def training_target(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """What the denoiser regresses on, by `config.prediction_type`: the noise ("epsilon", SD 2.1-base),
    the velocity ("v_prediction"), or the clean sample x0 ("sample", the pixel-space demo). The
    score-distillation loss (`train/losses.py`) calls it."""
    kind = schedule.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return velocity(schedule, x0, noise, t)
    return x0  # "sample"
