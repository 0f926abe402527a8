"""Convolutional building blocks shared by the Stable Diffusion UNet and VAE (diffusers layouts).

Everything is NHWC. Submodule names follow the diffusers state-dict names with "." list indices
turned into "_" (``resnets.0.conv1`` -> ``resnets_0/conv1``), so `dreamjax.convert.diffusers` maps
them with plain name tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dreamjax.models import layers

Dtype = Any


# ----------------------------------------------------------------------------- config helpers


def check_fixed_options(config: Mapping[str, Any], fixed: Mapping[str, Any], what: str) -> None:
    """Raise one ValueError naming every option of `config` set to a value dreamjax does not implement."""
    bad = []
    for key, want in fixed.items():
        if key not in config:
            continue
        got = config[key]
        if isinstance(got, (list, tuple)) and not isinstance(want, (list, tuple)):
            ok = all(g == want for g in got)  # e.g. only_cross_attention=[False, False, ...]
        else:
            ok = got == want
        if not ok:
            bad.append(f"{key}={got!r} (supported: {want!r})")
    if bad:
        raise ValueError(f"{what}: unsupported config options: {', '.join(bad)}")


def first_size(value):
    """diffusers allows sample_size as [H, W]; SD configs use one int."""
    return value[0] if isinstance(value, (list, tuple)) else value


# ----------------------------------------------------------------------------- blocks


class ResnetBlock2D(nn.Module):
    """diffusers ResnetBlock2D ("default" time-embedding norm, no up/down sampling inside).

    norm1 -> silu -> conv1 (+ time_emb_proj(silu(temb))) -> norm2 -> silu -> conv2, plus a 1x1
    conv_shortcut on the residual when the channel count changes.
    """

    out_channels: int
    groups: int
    eps: float
    use_temb: bool = True  # the VAE's resnets have no time embedding (no time_emb_proj parameters)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        # x: [B, H, W, Cin]; temb: [B, T] or None
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.group_norm(self.groups, self.eps, name="norm1", **kw)(x)
        h = nn.silu(h)
        h = layers.conv(self.out_channels, 3, padding=1, name="conv1", **kw)(h)
        if self.use_temb:
            if temb is None:
                raise ValueError("ResnetBlock2D(use_temb=True) needs a time embedding")
            t = layers.torch_dense(self.out_channels, ("embed", "conv_out"), use_bias=True,
                             name="time_emb_proj", **kw)(nn.silu(temb))
            h = h + t[:, None, None, :]  # [B, 1, 1, Cout]
        h = layers.group_norm(self.groups, self.eps, name="norm2", **kw)(h)
        h = nn.silu(h)
        h = layers.conv(self.out_channels, 3, padding=1, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = layers.conv(self.out_channels, 1, padding=0, name="conv_shortcut", **kw)(x)
        return x + h  # [B, H, W, Cout]


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. padding=0 is the VAE encoder's variant: pad one row/column at the
    bottom/right first (diffusers `F.pad(x, (0, 1, 0, 1))`), then an unpadded conv."""

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # [B, H, W, C] -> [B, H/2, W/2, Cout]
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return layers.conv(self.out_channels, 3, stride=2, padding=self.padding, name="conv",
                           dtype=self.dtype, param_dtype=self.param_dtype)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # [B, H, W, C] -> [B, 2H, 2W, Cout]
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return layers.conv(self.out_channels, 3, padding=1, name="conv",
                           dtype=self.dtype, param_dtype=self.param_dtype)(x)


class SpatialSelfAttention(nn.Module):
    """The VAE mid-block attention: diffusers `Attention(residual_connection=True, norm_num_groups=G,
    bias=True)` over the H*W positions, with the current names group_norm, to_q/k/v, to_out.0."""

    groups: int
    eps: float
    num_heads: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape  # [B, H, W, C]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.group_norm(self.groups, self.eps, name="group_norm", **kw)(x)
        h = h.reshape(b, hgt * wid, c)  # [B, T, C], T = H*W in row-major order as in torch

        def proj(name):
            y = layers.torch_dense(c, ("embed", "heads"), use_bias=True, name=name, **kw)(h)
            return y.reshape(b, hgt * wid, self.num_heads, c // self.num_heads)  # [B, T, N, Dh]

        o = layers.attention(proj("to_q"), proj("to_k"), proj("to_v"))  # [B, T, N, Dh]
        o = layers.torch_dense(c, ("heads", "embed"), use_bias=True, name="to_out_0", **kw)(o.reshape(b, -1, c))
        return x + o.reshape(b, hgt, wid, c)
