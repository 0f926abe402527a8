"""Shared building blocks. Every parameter carries logical axis names so sharding is config.

Logical axis vocabulary (mapped to mesh axes by `dreamjax.parallel.sharding` rules):
  LLM / ViT:  "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers" (scan axis), "norm"
  conv nets:  "conv_height", "conv_width", "conv_in", "conv_out", "norm"
  activations: "batch", "length", "act_embed", "act_heads", "act_mlp", "act_vocab"
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Initializer = Any  # a jax.nn.initializers function

default_kernel_init = nn.initializers.normal(stddev=0.02)
# PyTorch's default for nn.Linear / nn.Conv2d weights, U(+-1/sqrt(fan_in)): what the diffusers modules
# start from. A UNet trained from scratch with N(0, 0.02) kernels barely learns its cross-attention (two
# small projections in a row), so the diffusion models use this.
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class Dense(nn.Dense):
    """nn.Dense (same parameters) that multiplies [..., in] inputs as one 2-D [N, in] x [in, out] matmul.

    Why: for [B, T, in] inputs the weight gradient contracts over two axes, and XLA:CPU then writes the
    backward's elementwise producers (e.g. SwiGLU's silu derivative) into a transposed layout in the same
    fusion, with strided stores: 40-60 ms per LLM layer in the benchmark train step, more than the layer's
    matmuls. Flattened first, the same gradients need no transposed copy (a SwiGLU MLP's fwd + bwd 189 -> 112 ms
    on CPU). Elsewhere the reshape is free (a bitcast; the merged batch x length axis keeps its sharding).
    """

    def __call__(self, inputs: jax.Array) -> jax.Array:
        if inputs.ndim <= 2:
            return super().__call__(inputs)
        out = super().__call__(inputs.reshape(-1, inputs.shape[-1]))
        return out.reshape(*inputs.shape[:-1], out.shape[-1])


def dense(
    features: int,
    axes: tuple[str, str],
    *,
    use_bias: bool = False,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    kernel_init=default_kernel_init,
    name: str | None = None,
) -> Dense:
    """`Dense` whose kernel ([in, out]) and bias ([out]) carry logical axis names."""
    return Dense(
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
            torch_default_init, ("conv_height", "conv_width", "conv_in", "conv_out")
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
        name=name,
    )


def torch_dense(features: int, axes: tuple[str, str], **kwargs) -> Dense:
    """`dense` with PyTorch's default kernel init (for modules that mirror PyTorch ones and may train
    from scratch: UNet, VAE)."""
    return dense(features, axes, kernel_init=torch_default_init, **kwargs)


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
    chunk: int | None = None,
) -> jax.Array:
    """Scaled dot-product attention on [B, T, N, H] tensors (K/V may have fewer heads: GQA).

    `mask` (True = attend) broadcasts to [B, N, T, S]; `is_causal` adds the lower-triangular mask (T == S).
    The softmax runs in fp32 whatever the compute dtype.

    `implementation="cudnn"` (or "xla") hands the call to `jax.nn.dot_product_attention`. The default (None)
    writes the attention out as two einsums around an fp32 softmax. Plain multi-head attention transposes
    Q, K, V to heads-first [B, N, T, H] and uses 4-D [B, N, T, S] scores: in that form XLA:CPU fuses QK^T,
    the softmax and PV into one YNNPACK fusion; a size-1 group axis (or `jax.nn`'s vmapped form) puts a
    transposed copy of the scores in between, and without the heads-first copies the dots read strided rows.
    Q is scaled by 1/sqrt(H) before QK^T ([T, H] multiplies instead of [T, S]). At the UNet's 1024
    positions (2 heads of 32) this is 9 ms forward and 73 ms forward+backward, against 40 / 165 for
    `jax.nn` and 29 / 80 for 4-D einsums on [B, T, N, H] (benchmarks/README.md).
    Grouped-query attention keeps the query heads grouped per K/V head, so K/V are never repeated.

    `chunk` (unmasked attention only, e.g. the UNet's): when T is a multiple of it and larger, queries are
    processed `chunk` at a time with a flash-attention backward (`chunked_attention`), so no [T, S] score
    tensor is ever alive (memory O(chunk * S) instead of O(T * S)).
    """
    if implementation is not None:
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask, is_causal=is_causal, implementation=implementation
        )
    if chunk and mask is None and not is_causal and q.shape[1] > chunk and q.shape[1] % chunk == 0:
        return chunked_attention(q, k, v, chunk)
    b, t, n, h = q.shape
    s, n_kv = k.shape[1], k.shape[2]
    g = n // n_kv
    q = q * jnp.asarray(1.0 / math.sqrt(h), q.dtype)  # on [T, H] rather than on the [T, S] scores
    if g == 1:  # plain multi-head: heads-first 4-D einsums, which XLA:CPU fuses with the softmax (docstring)
        q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [B, N, T, H]: each head's rows contiguous
        logits = jnp.einsum("bhtd,bhsd->bhts", q, k, preferred_element_type=jnp.float32)
    else:  # grouped-query: each K/V head serves its g query heads without being repeated
        logits = jnp.einsum("btkgh,bskh->bkgts", q.reshape(b, t, n_kv, g, h), k,
                            preferred_element_type=jnp.float32).reshape(b, n, t, s)
    valid = None
    if is_causal:
        valid = jnp.tril(jnp.ones((t, s), dtype=bool))
    if mask is not None:
        valid = mask if valid is None else valid & mask
    if valid is not None:  # an additive bias, not a select: its gradient needs no saved [B, N, T, S] mask
        logits = logits + jnp.where(valid, np.float32(0), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    if g == 1:
        return jnp.swapaxes(jnp.einsum("bhts,bhsd->bhtd", probs, v), 1, 2)
    out = jnp.einsum("bkgts,bskh->btkgh", probs.reshape(b, n_kv, g, t, s), v)
    return out.reshape(b, t, n, h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, chunk: int) -> jax.Array:
    """Unmasked attention (q [B, T, N, H], k/v [B, S, N, H], T % chunk == 0) over query chunks.

    Forward: one chunk's [chunk, S] scores at a time (`lax.map`), keeping only the output and the
    log-sum-exp of each query row. Backward (FlashAttention's): per chunk, recompute P = exp(S - lse) and
    accumulate dK, dV; dS = P * (dP - rowsum(dO * O)). Memory O(chunk * S) instead of O(T * S), at the cost
    of computing the scores twice.
    """
    return _chunked_forward(q, k, v, chunk)[0]


def _chunks(x: jax.Array, chunk: int) -> jax.Array:
    """[B, T, ...] -> [T / chunk, B, chunk, ...]"""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // chunk, chunk, *x.shape[2:]), 1, 0)


def _unchunk(x: jax.Array) -> jax.Array:
    """[C, B, chunk, ...] -> [B, C * chunk, ...]"""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _chunk_scores(qc: jax.Array, k: jax.Array) -> jax.Array:
    """[B, c, N, H] x [B, S, N, H] -> fp32 scaled scores [B, N, c, S]"""
    scale = np.float32(1.0 / math.sqrt(qc.shape[-1]))
    return jnp.einsum("bqnh,bsnh->bnqs", qc, k, preferred_element_type=jnp.float32) * scale


def _chunked_forward(q, k, v, chunk):
    def one(qc):
        scores = _chunk_scores(qc, k)
        top = jnp.max(scores, axis=-1, keepdims=True)
        p = jnp.exp(scores - top)
        total = jnp.sum(p, axis=-1, keepdims=True)
        out = jnp.einsum("bnqs,bsnh->bqnh", (p / total).astype(v.dtype), v)
        return out, (top + jnp.log(total))[..., 0]  # [B, c, N, H], lse [B, N, c]

    out, lse = jax.lax.map(one, _chunks(q, chunk))
    out = _unchunk(out)
    return out, (q, k, v, out, lse)


def _chunked_backward(chunk, residuals, d_out):
    q, k, v, out, lse = residuals  # lse [C, B, N, c]
    # rowsum(dO * O) per query, [C, B, N, c] like lse
    delta = jnp.einsum("bqnh,bqnh->bnq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    delta = jnp.moveaxis(delta.reshape(*delta.shape[:2], -1, chunk), 2, 0)
    scale = np.float32(1.0 / math.sqrt(q.shape[-1]))

    def one(carry, xs):
        dk, dv = carry
        qc, doc, lse_c, delta_c = xs
        p = jnp.exp(_chunk_scores(qc, k) - lse_c[..., None])  # [B, N, c, S]
        dv = dv + jnp.einsum("bnqs,bqnh->bsnh", p, doc.astype(jnp.float32))
        dp = jnp.einsum("bqnh,bsnh->bnqs", doc, v, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_c[..., None]) * scale
        dq = jnp.einsum("bnqs,bsnh->bqnh", ds, k.astype(jnp.float32))
        dk = dk + jnp.einsum("bnqs,bqnh->bsnh", ds, qc.astype(jnp.float32))
        return (dk, dv), dq.astype(q.dtype)

    zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    (dk, dv), dq = jax.lax.scan(one, zeros, (_chunks(q, chunk), _chunks(d_out, chunk), lse, delta))
    return _unchunk(dq), dk.astype(k.dtype), dv.astype(v.dtype)


chunked_attention.defvjp(_chunked_forward, _chunked_backward)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Activation sharding hint by logical names (no-op outside a mesh / rules context)."""
    return nn.with_logical_constraint(x, tuple(axes))


# ----------------------------------------------------------------------------- LLaMA blocks


class RMSNorm(nn.Module):
    """LLaMA RMSNorm: statistics in fp32, scale applied in the compute dtype (as HF `LlamaRMSNorm`)."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return y.astype(self.dtype) * scale.astype(self.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """RoPE inverse frequencies [head_dim // 2] (float32), computed as in HF `modeling_rope_utils`.

    scaling: None / {"rope_type": "default"}, {"rope_type": "linear", "factor"}, or the Llama-3 scheme
    {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}.
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    inv_freq = inv_freq.astype(np.float32)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    if kind != "llama3":
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are divided by `factor`, short ones kept, the band between interpolated
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotary embedding, HF rotate_half convention. x [B, L, N, H], positions [B, L] -> [B, L, N, H].

    Angles and the rotation are computed in fp32 and cast back to x's dtype.
    """
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, L, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, L, 1, H]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * jnp.cos(emb) + rotated * jnp.sin(emb)).astype(x.dtype)


class SwiGLU(nn.Module):
    """LLaMA MLP: down(silu(gate(x)) * up(x)); kernels [in, out], no biases, HF parameter names."""

    intermediate_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = default_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init)
        gate = dense(self.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x)
        up = dense(self.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x)
        h = constrain(nn.silu(gate) * up, ("batch", "length", "act_mlp"))  # [B, L, F]
        return dense(x.shape[-1], ("mlp", "embed"), name="down_proj", **kw)(h)
