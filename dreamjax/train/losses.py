"""DreamLLM training losses (spec 1.3): token-mean CE over the *global* batch + diffusion MSE.

Both terms are written as (sum, count) so gradient accumulation over micro-batches and any mesh give
the same number as one big batch: the step divides by the global counts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE = -100


def lm_loss_sum(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Shifted next-token cross-entropy. logits [B, L, V], labels [B, L] (IGNORE = masked).

    Returns (sum of CE over valid targets, number of valid targets), both fp32 scalars.
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    valid = targets != IGNORE
    safe = jnp.where(valid, targets, 0)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    ce = jnp.where(valid, logz - picked, 0.0)
    return ce.sum(), valid.sum().astype(jnp.float32)


def num_lm_targets(labels: jax.Array) -> jax.Array:
    return (labels[:, 1:] != IGNORE).sum().astype(jnp.float32)


def per_image_mse(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """[N, ...] -> [N]: element-mean squared error per image, in fp32 (upstream casts to float)."""
    d = prediction.astype(jnp.float32) - target.astype(jnp.float32)
    return jnp.mean(jnp.square(d), axis=tuple(range(1, d.ndim)))


def safe_divide(total: jax.Array, count: jax.Array) -> jax.Array:
    """total / count, and exactly 0 when count is 0 (upstream: an all-ignored batch gives lm_loss 0)."""
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


def drop_nonfinite(term: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(term or 0, 1 if dropped). A select, not a multiply: upstream's `nan * 0.0` stays NaN."""
    finite = jnp.isfinite(term)
    return jnp.where(finite, term, 0.0), (~finite).astype(jnp.int32)
