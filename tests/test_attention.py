"""layers.attention (the einsum form every model uses by default) and its chunked, flash-backward form."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamjax.models import layers
from tests.helpers import max_rel_err


def _qkv(rng, b, t, s, n, n_kv, h, dtype=jnp.float32):
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((b, s, n_kv, h)), dtype) for _ in range(2))
    return q, k, v


def _value_and_grads(fn, q, k, v, weight):
    loss = lambda *x: jnp.sum(fn(*x).astype(jnp.float32) * weight)
    return fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("n, n_kv, causal, masked",
                         [(4, 4, False, False), (4, 4, True, True), (8, 2, True, True), (4, 1, False, True)],
                         ids=["mha", "mha-causal-mask", "gqa-causal-mask", "mqa-mask"])
def test_einsum_attention_matches_jax_nn(n, n_kv, causal, masked):
    rng = np.random.default_rng(0)
    q, k, v = _qkv(rng, 2, 16, 16, n, n_kv, 8)
    mask = None
    if masked:
        mask = jnp.asarray(rng.random((2, 1, 16, 16)) > 0.3).at[..., 0].set(True)  # every row sees a key
    weight = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    ours = _value_and_grads(lambda *x: layers.attention(*x, mask=mask, is_causal=causal), q, k, v, weight)
    ref = _value_and_grads(lambda *x: jax.nn.dot_product_attention(*x, mask=mask, is_causal=causal), q, k, v, weight)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        assert max_rel_err(a, b) < 1e-5


@pytest.mark.parametrize("t, s, chunk", [(64, 64, 16), (48, 20, 16)])
def test_chunked_attention_matches_in_value_and_gradient(t, s, chunk):
    rng = np.random.default_rng(1)
    q, k, v = _qkv(rng, 2, t, s, 3, 3, 8)
    weight = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    chunked = _value_and_grads(jax.jit(lambda *x: layers.attention(*x, chunk=chunk)), q, k, v, weight)
    plain = _value_and_grads(layers.attention, q, k, v, weight)
    for a, b in zip(jax.tree.leaves(chunked), jax.tree.leaves(plain)):
        assert max_rel_err(a, b) < 1e-5


def test_chunked_attention_keeps_no_full_score_tensor():
    """The point of chunking: no [B, N, T, S] buffer in the compiled forward + backward."""
    rng = np.random.default_rng(2)
    t, chunk = 256, 32
    q, k, v = _qkv(rng, 1, t, t, 2, 2, 8)
    loss = lambda c: lambda *x: jnp.sum(layers.attention(*x, chunk=c) ** 2)
    hlo = lambda c: jax.jit(jax.grad(loss(c), argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()
    def largest(text):  # elements of the largest f32 buffer
        return max(int(np.prod([int(d) for d in dims.split(",")])) for dims in re.findall(r"f32\[([\d,]+)\]", text))

    assert largest(hlo(None)) >= 2 * t * t  # heads x [T, S]
    assert largest(hlo(chunk)) <= 2 * chunk * t


def test_chunk_that_does_not_divide_falls_back():
    rng = np.random.default_rng(3)
    q, k, v = _qkv(rng, 1, 20, 20, 2, 2, 8)
    np.testing.assert_array_equal(layers.attention(q, k, v, chunk=8), layers.attention(q, k, v))
