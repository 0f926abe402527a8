"""DreamLLM training losses (spec 1.3): token-mean CE over the *global* batch + the score-distillation term.

Both terms are written as sums over the (micro-)batch; the step divides them by counts taken from the
global batch, so gradient accumulation over micro-batches and any mesh give the same number as one big
batch. The random draws of the score-distillation term come from one key per example (`example_keys`),
folded with the example's row in the global batch, for the same reason.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from dreamjax.data.tokenize import IGNORE_INDEX
from dreamjax.diffusion.schedule import Schedule, add_noise, training_target
from dreamjax.models.dreamllm import DreamLLM

# ----------------------------------------------------------------------------- language modelling


def lm_loss_sum(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Shifted next-token cross-entropy. logits [B, L, V], labels [B, L] (IGNORE_INDEX = masked).

    Returns (sum of CE over valid targets, number of valid targets), both fp32 scalars.
    """
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1].astype(jnp.float32), jnp.where(valid, targets, 0))
    return jnp.where(valid, ce, 0.0).sum(), valid.sum().astype(jnp.float32)


def num_lm_targets(labels: jax.Array) -> jax.Array:
    return (labels[:, 1:] != IGNORE_INDEX).sum().astype(jnp.float32)


# ----------------------------------------------------------------------------- score distillation


def example_keys(key: jax.Array, rows: jax.Array) -> jax.Array:
    """One PRNG key per example: `key` folded with the example's row index in the *global* batch.

    rows [b] int -> keys [b, ...]. An example draws the same numbers whichever micro-batch or shard it is in.
    """
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, rows)


def zero_absent(images: jax.Array, mask: jax.Array) -> jax.Array:
    """images [B, N, ...] with the slots where mask [B, N] is False set to 0.

    Image slots without an image never enter a tower: masking their outputs afterwards is not enough,
    since a NaN/Inf there would still reach the gradients through the backward pass (0 * NaN = NaN)
    and skip the whole update.
    """
    mask = mask.reshape(mask.shape + (1,) * (images.ndim - mask.ndim))
    return jnp.where(mask, images, jnp.zeros((), images.dtype))


def unconditional_condition(model: DreamLLM, params: Any, dtype=jnp.int32) -> jax.Array:
    """The condition for an empty prompt: dream-query readout after `[BOS, <dream_start>]` (spec 1.4)."""
    ids = model.config.tokens
    q = model.config.num_dream_queries
    tokens = jnp.array([[ids.bos, ids.dream_start] + [ids.im_patch] * q + [ids.dream_end]], dtype)
    positions = jnp.arange(tokens.shape[1])[None]
    _, cond, _ = model.apply({"params": params}, tokens, positions, None, None, None, max_images_out=1)
    return cond[0, 0]


def score_distillation_loss(model: DreamLLM, params: Any, images_out: jax.Array, condition: jax.Array,
                            mask: jax.Array, keys: jax.Array, schedule: Schedule, *, noise_draws: int = 1,
                            condition_dropout: float = 0.0) -> jax.Array:
    """The paper's score-distillation term: the frozen diffusion model's denoising MSE, conditioned on the
    projected dream-query readout, whose gradient trains the queries, the LLM and the condition projector.

    As upstream's `StableDiffusionHead.forward` (spec 1.3 step 6), per output image x and per draw:
      z = VAE posterior sample of x * scaling factor (pixel-space models: z = x),
      t ~ U{0 .. T-1}, eps ~ N(0, I), z_t = add_noise(z, eps, t),
      the condition replaced by the unconditional one with probability `condition_dropout` (spec 1.4),
      MSE(UNet(z_t, t, condition), target) over all elements, in fp32, with the target by the schedule's
      prediction type (eps, v, or z for "sample").
    An image's loss is the mean over its `noise_draws` draws (upstream: 1).

    images_out [B, No, R, R, 3] in [-1, 1]; condition [B, No, Q, C]; mask [B, No]: the present images;
    keys [B]: `example_keys(step_key, global rows)`; every draw of an example (latent sample, eps, t, dropout)
    comes from its key alone. Returns the sum of the present images' losses (an fp32 scalar); the step
    divides it by the number of present images in the global batch.
    """
    b, no = mask.shape
    k = noise_draws
    images = zero_absent(images_out, mask)

    def draw(key, images):  # one example: images [No, R, R, 3]
        k_lat, k_noise, k_t, k_drop = jax.random.split(key, 4)
        latents = model.apply({"params": params}, images, k_lat, method=DreamLLM.to_latents)  # [No, h, w, c]
        noise = jax.random.normal(k_noise, (k,) + latents.shape, jnp.float32).astype(latents.dtype)
        t = jax.random.randint(k_t, (k, no), 0, schedule.num_train_timesteps)
        drop = jax.random.bernoulli(k_drop, condition_dropout, (k, no))
        return latents, noise, t, drop

    latents, noise, t, drop = jax.vmap(draw)(keys, images)  # [B, No, ...], [B, K, No, ...], [B, K, No] x2
    latents = jnp.broadcast_to(latents[:, None], noise.shape)  # each image noised K times
    cond = jnp.broadcast_to(condition[:, None], (b, k) + condition.shape[1:])  # [B, K, No, Q, C]
    if condition_dropout > 0:
        uncond = unconditional_condition(model, params)  # [Q, C]
        cond = jnp.where(drop[..., None, None], uncond.astype(cond.dtype), cond)

    flat = lambda x: x.reshape((b * k * no,) + x.shape[3:])  # [B, K, No, ...] -> [B * K * No, ...]
    latents, noise, t, cond = flat(latents), flat(noise), flat(t), flat(cond)
    pred = model.apply({"params": params}, add_noise(schedule, latents, noise, t), t, cond,
                       method=DreamLLM.denoise)
    target = training_target(schedule, latents, noise, t)
    err = optax.squared_error(pred.astype(jnp.float32), target.astype(jnp.float32))  # upstream: .float()
    mse = err.mean(axis=tuple(range(1, err.ndim))).reshape(b, k, no).mean(axis=1)  # [B, No]
    return jnp.sum(jnp.where(mask, mse, 0.0))


# ----------------------------------------------------------------------------- per-slot, with an image budget


def slot_keys(keys: jax.Array, num_slots: int) -> jax.Array:
    """keys [B] -> [B, No]: slot j of example i draws from `fold_in(keys[i], j)`.

    Keyed by the slot, not by the example, so a slot's draws do not depend on which other slots are
    processed with it (the image budget picks a data-dependent subset).
    """
    slots = jnp.arange(num_slots)
    return jax.vmap(lambda k: jax.vmap(jax.random.fold_in, in_axes=(None, 0))(k, slots))(keys)


def slot_mse(model: DreamLLM, params: Any, images: jax.Array, condition: jax.Array, keys: jax.Array,
             schedule: Schedule, *, noise_draws: int = 1, condition_dropout: float = 0.0) -> jax.Array:
    """The score-distillation MSE of each image on its own key: images [N, R, R, 3] (absent ones zeroed),
    condition [N, Q, C], keys [N] -> [N] fp32 (mean over the image's `noise_draws` draws).

    The same recipe as `score_distillation_loss`, but every draw (latent sample, eps, t, dropout) comes from
    the slot's key, which makes it the shared core of the budgeted loss and its reference.
    """
    n, k = images.shape[0], noise_draws

    def draw(key, image):  # one slot: image [R, R, 3]
        k_lat, k_noise, k_t, k_drop = jax.random.split(key, 4)
        latent = model.apply({"params": params}, image[None], k_lat, method=DreamLLM.to_latents)[0]
        noise = jax.random.normal(k_noise, (k,) + latent.shape, jnp.float32).astype(latent.dtype)
        t = jax.random.randint(k_t, (k,), 0, schedule.num_train_timesteps)
        drop = jax.random.bernoulli(k_drop, condition_dropout, (k,))
        return latent, noise, t, drop

    latents, noise, t, drop = jax.vmap(draw)(keys, images)  # [N, ...], [N, K, ...], [N, K] x2
    latents = jnp.broadcast_to(latents[:, None], noise.shape)  # each image noised K times
    cond = jnp.broadcast_to(condition[:, None], (n, k) + condition.shape[1:])  # [N, K, Q, C]
    if condition_dropout > 0:
        uncond = unconditional_condition(model, params)  # [Q, C]
        cond = jnp.where(drop[..., None, None], uncond.astype(cond.dtype), cond)

    flat = lambda x: x.reshape((n * k,) + x.shape[2:])  # [N, K, ...] -> [N * K, ...]
    latents, noise, t, cond = flat(latents), flat(noise), flat(t), flat(cond)
    pred = model.apply({"params": params}, add_noise(schedule, latents, noise, t), t, cond,
                       method=DreamLLM.denoise)
    target = training_target(schedule, latents, noise, t)
    err = optax.squared_error(pred.astype(jnp.float32), target.astype(jnp.float32))  # upstream: .float()
    return err.mean(axis=tuple(range(1, err.ndim))).reshape(n, k).mean(axis=1)


def shard_rows(x: jax.Array, shards: int) -> jax.Array:
    """[B, No, ...] -> [S, B * No / S, ...]: row s holds data shard s's slots.

    The batch is sharded over its leading axis in S contiguous blocks, so this reshape keeps data local.
    """
    b = x.shape[0]
    if b % shards:
        raise ValueError(f"the (micro-)batch of {b} examples does not split into {shards} data shards")
    return x.reshape((shards, -1) + x.shape[2:])


def budget_picks(mask: jax.Array, shards: int, budget: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The slots the diffusion side processes: in each data shard, its first `budget` present images.

    mask [B, No] -> (slot indices within the shard's row [S, budget'], pick is present [S, budget'],
    number of present images beyond the budget (int32 scalar)), budget' = min(budget, B * No / S).
    A stable sort keeps the slot order, so which images fit does not depend on the backend.
    """
    rows = shard_rows(mask, shards)
    idx = jnp.argsort(~rows, axis=1, stable=True)[:, :budget]
    picked = jnp.take_along_axis(rows, idx, axis=1)
    return idx, picked, images_over_budget(mask, shards, budget)


def images_over_budget(mask: jax.Array, shards: int, budget: int) -> jax.Array:
    """Present images that do not fit in their shard's budget: dropped from the loss, counted for the log."""
    return jnp.maximum(shard_rows(mask, shards).sum(axis=1, dtype=jnp.int32) - budget, 0).sum()


def gather_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [S, M, ...], idx [S, P] -> [S, P, ...]: a gather within each shard's row (no cross-shard traffic)."""
    return jax.vmap(lambda r, i: jnp.take(r, i, axis=0))(x, idx)


def budgeted_score_distillation_loss(model: DreamLLM, params: Any, images_out: jax.Array, condition: jax.Array,
                                     data_mask: jax.Array, present: jax.Array, keys: jax.Array,
                                     schedule: Schedule, *, shards: int, budget: int, noise_draws: int = 1,
                                     condition_dropout: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """`score_distillation_loss` on at most `budget` output images per data shard, with per-slot keys.

    The VAE and the UNet run on S * budget images instead of every slot [B, No]: absent slots cost nothing
    beyond the padding of a shard with fewer images than its budget. The budget picks on `data_mask`
    (images_out_mask, which the step can count up front for the divisor); `present` (the model saw the
    image's dream queries) only masks the loss, as in the unbudgeted path.

    keys [B]: the examples' keys (`example_keys`); slot j draws from `fold_in(keys[i], j)` (`slot_keys`).
    Returns (sum of the used images' losses, present images over the budget).
    """
    no = data_mask.shape[1]
    idx, picked, over = budget_picks(data_mask, shards, budget)
    take = lambda x: gather_rows(shard_rows(x, shards), idx).reshape((-1,) + x.shape[2:])  # -> [S * P, ...]
    use = take(data_mask & present) & picked.reshape(-1)
    images = zero_absent(take(images_out), use)
    mse = slot_mse(model, params, images, take(condition), take(slot_keys(keys, no)), schedule,
                   noise_draws=noise_draws, condition_dropout=condition_dropout)
    return jnp.sum(jnp.where(use, mse, 0.0)), over


# ----------------------------------------------------------------------------- combining the terms


def safe_divide(total: jax.Array, count: jax.Array) -> jax.Array:
    """total / count, and exactly 0 when count is 0 (upstream: an all-ignored batch gives lm_loss 0)."""
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


def drop_nonfinite(term: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(term or 0, 1 if dropped). A select, not a multiply: upstream's `nan * 0.0` stays NaN."""
    finite = jnp.isfinite(term)
    return jnp.where(finite, term, 0.0), (~finite).astype(jnp.int32)
