"""AutoencoderKL (Stable Diffusion VAE, diffusers layout) in Flax linen, NHWC.

`encode(x)` returns the posterior's (mean, logvar) with logvar clipped to [-30, 20] as diffusers'
DiagonalGaussianDistribution does; `decode(z)` takes *unscaled* latents (divide the diffusion latents
by `VAEConfig.scaling_factor` first). A parent module can call `encode` and `decode` separately
(`setup`-style submodules); `__call__` runs both, for `init`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dreamjax.models import layers
from dreamjax.models.diffusion_blocks import (
    Downsample2D,
    ResnetBlock2D,
    SpatialSelfAttention,
    Upsample2D,
    check_fixed_options,
    first_size,
)

Dtype = Any

_VAE_EPS = 1e-6  # every norm in the diffusers VAE uses eps 1e-6

# diffusers AutoencoderKL options that dreamjax implements only at these values.
_VAE_FIXED: dict[str, Any] = {
    "act_fn": "silu",
    "down_block_types": "DownEncoderBlock2D",  # per block
    "up_block_types": "UpDecoderBlock2D",  # per block
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL hyper-parameters. Defaults are the Stable Diffusion 1.x/2.x VAE."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    force_upcast: bool = True  # diffusers' hint to run the VAE in fp32 (kept for export only)
    # JAX-only settings
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], **overrides) -> VAEConfig:
        """From a diffusers AutoencoderKL config (its config.json as a dict, or `model.config`)."""
        config = dict(config)
        check_fixed_options(config, _VAE_FIXED, "AutoencoderKL")
        kwargs = dict(
            in_channels=config.get("in_channels", 3),
            out_channels=config.get("out_channels", 3),
            latent_channels=config.get("latent_channels", 4),
            block_out_channels=tuple(config.get("block_out_channels", (64,))),
            layers_per_block=config.get("layers_per_block", 1),
            norm_num_groups=config.get("norm_num_groups", 32),
            sample_size=first_size(config.get("sample_size", 32)),
            scaling_factor=float(config.get("scaling_factor", 0.18215)),
            use_quant_conv=bool(config.get("use_quant_conv", True)),
            use_post_quant_conv=bool(config.get("use_post_quant_conv", True)),
            mid_block_add_attention=bool(config.get("mid_block_add_attention", True)),
            force_upcast=bool(config.get("force_upcast", True)),
        )
        n = len(kwargs["block_out_channels"])
        for key in ("down_block_types", "up_block_types"):
            if key in config and len(config[key]) != n:
                raise ValueError(f"AutoencoderKL: {key} has {len(config[key])} entries for {n} blocks")
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_diffusers_dict(self) -> dict[str, Any]:
        """A config dict `AutoencoderKL.from_config` accepts (and config.json content)."""
        n = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "latent_channels": self.latent_channels,
            "block_out_channels": list(self.block_out_channels),
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "layers_per_block": self.layers_per_block,
            "norm_num_groups": self.norm_num_groups,
            "act_fn": "silu",
            "sample_size": self.sample_size,
            "scaling_factor": self.scaling_factor,
            "use_quant_conv": self.use_quant_conv,
            "use_post_quant_conv": self.use_post_quant_conv,
            "mid_block_add_attention": self.mid_block_add_attention,
            "force_upcast": self.force_upcast,
        }


class MidBlock(nn.Module):
    """UNetMidBlock2D without time embedding: resnet -> (self-attention) -> resnet."""

    cfg: VAEConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        c = cfg.block_out_channels[-1]
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        x = ResnetBlock2D(c, cfg.norm_num_groups, _VAE_EPS, use_temb=False, name="resnets_0", **kw)(x)
        if cfg.mid_block_add_attention:
            x = SpatialSelfAttention(cfg.norm_num_groups, _VAE_EPS, name="attentions_0", **kw)(x)
        return ResnetBlock2D(c, cfg.norm_num_groups, _VAE_EPS, use_temb=False, name="resnets_1", **kw)(x)


class DownEncoderBlock(nn.Module):
    """DownEncoderBlock2D: resnets, then (except in the last block) the padded stride-2 conv."""

    out_channels: int
    num_layers: int
    add_downsample: bool
    cfg: VAEConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, cfg.norm_num_groups, _VAE_EPS, use_temb=False,
                              name=f"resnets_{j}", **kw)(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, padding=0, name="downsamplers_0", **kw)(x)
        return x


class UpDecoderBlock(nn.Module):
    """UpDecoderBlock2D: resnets, then (except in the last block) nearest x2 + conv."""

    out_channels: int
    num_layers: int
    add_upsample: bool
    cfg: VAEConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, cfg.norm_num_groups, _VAE_EPS, use_temb=False,
                              name=f"resnets_{j}", **kw)(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x)
        return x


class Encoder(nn.Module):
    """[B, H, W, 3] -> [B, H/f, W/f, 2 * latent] (mean and logvar, before quant_conv)."""

    cfg: VAEConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        n = len(cfg.block_out_channels)
        x = layers.conv(cfg.block_out_channels[0], 3, padding=1, name="conv_in", **kw)(x)
        for i, c in enumerate(cfg.block_out_channels):
            x = DownEncoderBlock(c, cfg.layers_per_block, i < n - 1, cfg, name=f"down_blocks_{i}")(x)
        x = MidBlock(cfg, name="mid_block")(x)
        x = layers.group_norm(cfg.norm_num_groups, _VAE_EPS, name="conv_norm_out", **kw)(x)
        x = nn.silu(x)
        return layers.conv(2 * cfg.latent_channels, 3, padding=1, name="conv_out", **kw)(x)


class Decoder(nn.Module):
    """[B, h, w, latent] -> [B, h*f, w*f, 3]."""

    cfg: VAEConfig

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        n = len(cfg.block_out_channels)
        x = layers.conv(cfg.block_out_channels[-1], 3, padding=1, name="conv_in", **kw)(z)
        x = MidBlock(cfg, name="mid_block")(x)
        for i, c in enumerate(reversed(cfg.block_out_channels)):
            x = UpDecoderBlock(c, cfg.layers_per_block + 1, i < n - 1, cfg, name=f"up_blocks_{i}")(x)
        x = layers.group_norm(cfg.norm_num_groups, _VAE_EPS, name="conv_norm_out", **kw)(x)
        x = nn.silu(x)
        return layers.conv(cfg.out_channels, 3, padding=1, name="conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
    cfg: VAEConfig

    def setup(self):
        cfg = self.cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = (layers.conv(2 * cfg.latent_channels, 1, padding=0, **kw)
                           if cfg.use_quant_conv else None)
        self.post_quant_conv = (layers.conv(cfg.latent_channels, 1, padding=0, **kw)
                                if cfg.use_post_quant_conv else None)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, H, W, 3] in [-1, 1] -> (mean, logvar), each [B, H/f, W/f, latent]."""
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        """z [B, h, w, latent] (unscaled) -> image [B, h*f, w*f, 3], roughly in [-1, 1] (not clipped)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array) -> jax.Array:
        mean, _ = self.encode(x)
        return self.decode(mean)


def sample_latent(rng: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """A draw from the posterior N(mean, exp(logvar)) (diffusers `latent_dist.sample()`), in mean's dtype."""
    noise = jax.random.normal(rng, mean.shape, jnp.float32)
    return (mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * noise).astype(mean.dtype)


def init_inputs(cfg: VAEConfig, batch: int = 1) -> jax.Array:
    """Smallest valid image for `init` / `jax.eval_shape`."""
    size = cfg.downsample_factor
    return jnp.zeros((batch, size, size, cfg.in_channels), cfg.dtype)


def param_shapes(cfg: VAEConfig) -> dict:
    """The parameter tree as unboxed ShapeDtypeStructs (no computation, no memory)."""
    model = AutoencoderKL(cfg)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), init_inputs(cfg)))
    return nn.meta.unbox(boxed)["params"]
