"""The DreamLLM train step: one `jax.jit` with NamedSharding in/out shardings and a donated state.

loss = w_lm * (CE summed over the global batch's valid targets / their count)
     + w_vm * (per-image diffusion MSE summed over present output images / their count)

Counts come from the *global* batch before any micro-batching, so the step is independent of the mesh
and of gradient accumulation (spec 1.3: dreamjax's deliberate global token mean).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from dreamjax.diffusion.schedule import Schedule, add_noise, training_target
from dreamjax.models.dreamllm import DreamLLM
from dreamjax.parallel.sharding import Rules, batch_sharding
from dreamjax.train import losses
from dreamjax.train.optimizer import merge_params
from dreamjax.train.state import TrainState

BATCH_KEYS = ("tokens", "labels", "positions", "segment_ids", "images_in", "images_in_mask", "images_out",
              "images_out_mask")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    loss_weight_lm: float = 1.0
    loss_weight_vm: float = 10.0
    grad_accum_steps: int = 1
    # Probability of replacing a condition by the unconditional one (the query readout after BOS alone),
    # for classifier-free guidance training. Upstream trains without it (spec 1.4).
    condition_dropout: float = 0.0
    # Noise draws (t, eps) per output image; the image's MSE is their mean. Upstream uses 1; more draws
    # give the diffusion model more signal per LLM forward (the tiny demo uses several).
    noise_draws: int = 1

    @property
    def uses_lm(self) -> bool:
        return self.loss_weight_lm != 0.0

    @property
    def uses_vm(self) -> bool:
        return self.loss_weight_vm != 0.0


def loss_terms(model: DreamLLM, params: Any, batch: dict, rng: jax.Array, schedule: Schedule,
               cfg: StepConfig) -> dict[str, jax.Array]:
    """Sums (not means) of both loss terms over this (micro-)batch."""
    max_out = batch["images_out"].shape[1] if cfg.uses_vm else 0
    # Image slots without an image never enter a tower: masking their outputs afterwards is not enough,
    # since a NaN/Inf there would still reach the gradients through the backward pass (0 * NaN = NaN)
    # and skip the whole update.
    images_in = _zero_absent(batch["images_in"], batch["images_in_mask"])
    logits, cond, present = model.apply(
        {"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"],
        images_in, batch["images_in_mask"], max_images_out=max_out,
    )
    ce_sum, _ = losses.lm_loss_sum(logits, batch["labels"])
    out = {"ce_sum": ce_sum, "mse_sum": jnp.zeros((), jnp.float32)}
    if not cfg.uses_vm:
        return out

    mask = batch["images_out_mask"] & present  # [B, No]
    images = _zero_absent(batch["images_out"], mask)  # [B, No, R, R, 3] in [-1, 1]
    b, no = images.shape[:2]
    images = images.reshape((b * no,) + images.shape[2:])
    cond = cond.reshape((b * no,) + cond.shape[2:])  # [B*No, Q, C]
    k_lat, k_noise, k_t, k_drop = jax.random.split(rng, 4)
    latents = model.apply({"params": params}, images, k_lat, method=DreamLLM.to_latents)
    k = cfg.noise_draws
    if k > 1:  # [K * B * No, ...]: each image (and its condition) noised K times
        latents, cond = jnp.tile(latents, (k,) + (1,) * (latents.ndim - 1)), jnp.tile(cond, (k, 1, 1))
    noise = jax.random.normal(k_noise, latents.shape, jnp.float32).astype(latents.dtype)
    t = jax.random.randint(k_t, (k * b * no,), 0, schedule.num_train_timesteps)
    if cfg.condition_dropout > 0:
        uncond = unconditional_condition(model, params, batch["tokens"].dtype)  # [Q, C]
        drop = jax.random.bernoulli(k_drop, cfg.condition_dropout, (k * b * no, 1, 1))
        cond = jnp.where(drop, uncond[None].astype(cond.dtype), cond)
    noisy = add_noise(schedule, latents, noise, t)
    pred = model.apply({"params": params}, noisy, t, cond, method=DreamLLM.denoise)
    mse = losses.per_image_mse(pred, training_target(schedule, latents, noise, t)).reshape(k, b * no).mean(0)
    out["mse_sum"] = jnp.sum(jnp.where(mask.reshape(-1), mse, 0.0))
    return out


def _zero_absent(images: jax.Array, mask: jax.Array) -> jax.Array:
    """images [B, N, ...] with the slots where mask [B, N] is False set to 0."""
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


def _micro_batches(batch: dict, n: int) -> dict:
    """[B, ...] -> [n, B/n, ...] taking every n-th row, so each micro-batch keeps rows on every data shard
    (contiguous chunks would sit on a subset of the devices and force a reshard per micro-step)."""
    return {k: jnp.swapaxes(v.reshape((v.shape[0] // n, n) + v.shape[1:]), 0, 1) for k, v in batch.items()}


def make_train_step(model: DreamLLM, tx: optax.GradientTransformation, schedule: Schedule, cfg: StepConfig,
                    mesh: Mesh, rules: Rules, state_shardings: TrainState):
    """A jitted `train_step(state, batch) -> (state, metrics)` with the state donated."""

    def objective(trainable, frozen, micro, rng, n_tokens, n_images):
        params = merge_params(trainable, frozen)
        terms = loss_terms(model, params, micro, rng, schedule, cfg)
        lm = losses.safe_divide(terms["ce_sum"], n_tokens)
        vm = losses.safe_divide(terms["mse_sum"], n_images)
        lm, lm_dropped = losses.drop_nonfinite(lm)
        vm, vm_dropped = losses.drop_nonfinite(vm)
        loss = cfg.loss_weight_lm * lm + cfg.loss_weight_vm * vm
        return loss, {"lm_loss": lm, "vm_loss": vm, "lm_dropped": lm_dropped, "vm_dropped": vm_dropped}

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng, step_rng = jax.random.split(state.rng)
        n_tokens = losses.num_lm_targets(batch["labels"])
        n_images = jnp.sum(batch["images_out_mask"]).astype(jnp.float32)
        a = cfg.grad_accum_steps
        if a == 1:
            (loss, aux), grads = grad_fn(state.trainable, state.frozen, batch, step_rng, n_tokens, n_images)
        else:  # sums over micro-batches: the loss terms are already divided by the global counts
            micro = _micro_batches(batch, a)
            keys = jax.random.split(step_rng, a)
            args = lambda mb, key: (state.trainable, state.frozen, mb, key, n_tokens, n_images)
            shapes = jax.eval_shape(grad_fn, *args(jax.tree.map(lambda x: x[0], micro), keys[0]))
            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
            body = lambda carry, xs: (jax.tree.map(jnp.add, carry, grad_fn(*args(*xs))), None)
            ((loss, aux), grads), _ = jax.lax.scan(body, zeros, (micro, keys))
            # a term dropped in any micro-batch counts once for the step
            aux = {**aux, "lm_dropped": jnp.minimum(aux["lm_dropped"], 1),
                   "vm_dropped": jnp.minimum(aux["vm_dropped"], 1)}

        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, state.opt_state, state.trainable)
        new_params = optax.apply_updates(state.trainable, updates)
        # A non-finite gradient (e.g. NaN activations that a dropped term still leaves in the backward
        # pass) skips the update entirely instead of poisoning the weights.
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = state.replace(
            step=state.step + 1,
            trainable=keep(new_params, state.trainable),
            opt_state=keep(new_opt, state.opt_state),
            rng=rng,
            dropped_lm=state.dropped_lm + aux["lm_dropped"],
            dropped_vm=state.dropped_vm + aux["vm_dropped"],
            skipped_updates=state.skipped_updates + (~finite).astype(jnp.int32),
        )
        metrics = {
            "loss": loss, "lm_loss": aux["lm_loss"], "vm_loss": aux["vm_loss"], "grad_norm": grad_norm,
            "lm_targets": n_tokens, "images_out": n_images,
            "dropped_lm": new_state.dropped_lm, "dropped_vm": new_state.dropped_vm,
            "skipped_updates": new_state.skipped_updates,
        }
        return new_state, metrics

    batch_sh = {k: batch_sharding(mesh, rules, nd) for k, nd in _BATCH_NDIM.items()}
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_sh),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )


_BATCH_NDIM = {"tokens": 2, "labels": 2, "positions": 2, "segment_ids": 2, "images_in": 5, "images_in_mask": 2,
               "images_out": 5, "images_out_mask": 2}


def shard_batch(batch: dict, mesh: Mesh, rules: Rules) -> dict:
    """Host numpy batch (this process's rows) -> global jax Arrays sharded over the batch axes."""
    out = {}
    for k in BATCH_KEYS:
        x = batch[k]
        sh = batch_sharding(mesh, rules, x.ndim)
        out[k] = jax.make_array_from_process_local_data(sh, x)
    return out
