"""Shared building blocks. Every parameter carries logical axis names so sharding is config.

Logical axis vocabulary (mapped to mesh axes by `dreamjax.parallel.sharding` rules):
  LLM / ViT:  "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers" (scan axis), "norm"
  conv nets:  "conv_height", "conv_width", "conv_in", "conv_out", "norm"
  activations: "batch", "length", "act_embed", "act_heads", "act_mlp", "act_vocab"
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

default_kernel_init = nn.initializers.normal(stddev=0.02)


def dense(
    features: int,
    axes: tuple[str, str],
    *,
    use_bias: bool = False,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    kernel_init=default_kernel_init,
    name: str | None = None,
) -> nn.Dense:
    """nn.Dense whose kernel ([in, out]) and bias ([out]) carry logical axis names."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[-1],)),
        name=name,
    )


def conv(
    features: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int | str = "SAME",
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Conv:
    """NHWC nn.Conv with logical axes; integer padding means symmetric padding as in torch."""
    pad = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=pad,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("conv_height", "conv_width", "conv_in", "conv_out")
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
        name=name,
    )


def layer_norm(eps: float, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
        name=name,
    )


def group_norm(groups: int, eps: float, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               name: str | None = None) -> nn.GroupNorm:
    return nn.GroupNorm(
        num_groups=groups,
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
        name=name,
    )


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    implementation: str | None = None,
) -> jax.Array:
    """Scaled dot-product attention on [B, T, N, H] tensors (K/V may have fewer heads: GQA).

    `implementation` is passed to `jax.nn.dot_product_attention` ("xla", "cudnn" or None = auto);
    the softmax runs in fp32 whatever the compute dtype.
    """
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=is_causal, implementation=implementation
    )


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Activation sharding hint by logical names (no-op outside a mesh / rules context)."""
    return nn.with_logical_constraint(x, tuple(axes))
