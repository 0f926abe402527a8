"""The DreamLLM train step: one `jax.jit` with NamedSharding in/out shardings and a donated state.

loss = w_lm * (CE summed over the global batch's valid targets / their count)
     + w_vm * (score-distillation MSE summed over present output images / their count)

Counts come from the *global* batch before any micro-batching, and each example draws its diffusion noise
from a key folded with its row in the global batch, so the step is independent of the mesh and of gradient
accumulation (spec 1.3: dreamjax's deliberate global token mean).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from dreamjax.diffusion.schedule import Schedule
from dreamjax.models.dreamllm import DreamLLM
from dreamjax.parallel.sharding import Rules, batch_sharding, data_parallel_size
from dreamjax.train import losses
from dreamjax.train.stages import merge_params
from dreamjax.train.state import TrainState

# The batch contract (DESIGN section 3): key -> number of dimensions; the leading one is the batch.
BATCH_NDIM = {"tokens": 2, "labels": 2, "positions": 2, "segment_ids": 2, "images_in": 5, "images_in_mask": 2,
              "images_out": 5, "images_out_mask": 2}


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
    # Output images the VAE and UNet process per data shard per (micro-)step (None: every slot [B, No],
    # present or not). Present images beyond it are dropped from the loss and logged as
    # `images_over_budget`; with a budget each slot draws from its own key (`losses.slot_keys`).
    image_budget: int | None = None
    # How many ways the batch axis is sharded; `make_train_step` sets it from the mesh.
    data_shards: int = 1

    @property
    def uses_lm(self) -> bool:
        return self.loss_weight_lm != 0.0

    @property
    def uses_vm(self) -> bool:
        return self.loss_weight_vm != 0.0


def loss_terms(model: DreamLLM, params: Any, batch: dict, rng: jax.Array, schedule: Schedule,
               cfg: StepConfig, rows: jax.Array | None = None) -> dict[str, jax.Array]:
    """Sums (not means) of both loss terms over this (micro-)batch: {"ce_sum", "mse_sum", "images_over_budget"}.

    rng: the step's key. rows [b]: the rows of `batch` in the global batch (default: `batch` is the global
    batch); example i draws its diffusion randomness from `fold_in(rng, rows[i])` (with an image budget, its
    slot j from `fold_in(fold_in(rng, rows[i]), j)`).
    """
    max_out = batch["images_out"].shape[1] if cfg.uses_vm else 0
    images_in = losses.zero_absent(batch["images_in"], batch["images_in_mask"])
    logits, cond, present = model.apply(
        {"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"],
        images_in, batch["images_in_mask"], max_images_out=max_out,
    )
    ce_sum, _ = losses.lm_loss_sum(logits, batch["labels"])
    none_over = jnp.zeros((), jnp.int32)
    if not cfg.uses_vm:
        return {"ce_sum": ce_sum, "mse_sum": jnp.zeros((), jnp.float32), "images_over_budget": none_over}
    if rows is None:
        rows = jnp.arange(batch["tokens"].shape[0])
    keys = losses.example_keys(rng, rows)
    if cfg.image_budget is not None:
        mse_sum, over = losses.budgeted_score_distillation_loss(
            model, params, batch["images_out"], cond, batch["images_out_mask"], present, keys, schedule,
            shards=cfg.data_shards, budget=cfg.image_budget, noise_draws=cfg.noise_draws,
            condition_dropout=cfg.condition_dropout,
        )
        return {"ce_sum": ce_sum, "mse_sum": mse_sum, "images_over_budget": over}
    mse_sum = losses.score_distillation_loss(
        model, params, batch["images_out"], cond, batch["images_out_mask"] & present,
        keys, schedule, noise_draws=cfg.noise_draws, condition_dropout=cfg.condition_dropout,
    )
    return {"ce_sum": ce_sum, "mse_sum": mse_sum, "images_over_budget": none_over}


def _micro_batches(tree: Any, n: int) -> Any:
    """[B, ...] -> [n, B/n, ...] taking every n-th row (micro-batch m holds rows m, m + n, m + 2n, ...), so
    each micro-batch keeps rows on every data shard (contiguous chunks would sit on a subset of the devices
    and force a reshard per micro-step)."""
    return jax.tree.map(lambda v: jnp.swapaxes(v.reshape((v.shape[0] // n, n) + v.shape[1:]), 0, 1), tree)


def images_over_budget(mask: jax.Array, cfg: StepConfig) -> jax.Array:
    """Present output images of the global batch `mask` [B, No] that miss their shard's budget, summed
    over the micro-batches (the budget applies per micro-step). Known before the loss, so the vm term can
    be divided by the images it actually uses."""
    if cfg.image_budget is None or not cfg.uses_vm:
        return jnp.zeros((), jnp.int32)
    micro = _micro_batches(mask, cfg.grad_accum_steps)  # [A, B / A, No]
    return jax.vmap(lambda m: losses.images_over_budget(m, cfg.data_shards, cfg.image_budget))(micro).sum()


def image_budget(config) -> int | None:
    """`config.train.image_budget` checked: None (every output-image slot) or a positive int."""
    budget = config.train.get("image_budget")
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"config.train.image_budget must be None or a positive int, got {budget!r}")
    return budget


def make_train_step(model: DreamLLM, tx: optax.GradientTransformation, schedule: Schedule, cfg: StepConfig,
                    mesh: Mesh, rules: Rules, state_shardings: TrainState):
    """A jitted `train_step(state, batch) -> (state, metrics)` with the state donated."""
    cfg = dataclasses.replace(cfg, data_shards=data_parallel_size(mesh, rules))

    def objective(trainable, frozen, micro, rows, rng, n_tokens, n_images):
        params = merge_params(trainable, frozen)
        terms = loss_terms(model, params, micro, rng, schedule, cfg, rows)
        lm = losses.safe_divide(terms["ce_sum"], n_tokens)
        vm = losses.safe_divide(terms["mse_sum"], n_images)
        lm, lm_dropped = losses.drop_nonfinite(lm)
        vm, vm_dropped = losses.drop_nonfinite(vm)
        loss = cfg.loss_weight_lm * lm + cfg.loss_weight_vm * vm
        return loss, {"lm_loss": lm, "vm_loss": vm, "lm_dropped": lm_dropped, "vm_dropped": vm_dropped}

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def shard_like_params(grads):
        # The accumulated gradient lives across every micro-step: pin it to the parameters' (FSDP) sharding,
        # else XLA may keep it whole on every chip (the 7B stage-2 step: +14 GiB per chip; `dreamjax aot`).
        return jax.lax.with_sharding_constraint(grads, state_shardings.trainable)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng, step_rng = jax.random.split(state.rng)
        n_tokens = losses.num_lm_targets(batch["labels"])
        over = images_over_budget(batch["images_out_mask"], cfg)
        n_images = jnp.sum(batch["images_out_mask"]).astype(jnp.float32)
        n_used = n_images - over.astype(jnp.float32)  # == n_images without a budget
        rows = jnp.arange(batch["tokens"].shape[0])  # global row indices (jit sees the global batch)
        args = lambda mb, mb_rows: (state.trainable, state.frozen, mb, mb_rows, step_rng, n_tokens, n_used)
        a = cfg.grad_accum_steps
        if a == 1:
            (loss, aux), grads = grad_fn(*args(batch, rows))
        else:
            # Sums over micro-batches: the loss terms are already divided by the global counts, and every
            # example draws from its own global-row key, so this is the full-batch step up to fp32 rounding.
            # (Not `optax.MultiSteps`: that accumulates one micro-batch per call across calls and averages.)
            micro = _micro_batches((batch, rows), a)
            shapes = jax.eval_shape(grad_fn, *args(*jax.tree.map(lambda x: x[0], micro)))
            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)

            def body(carry, xs):
                (loss_aux, grads) = jax.tree.map(jnp.add, carry, grad_fn(*args(*xs)))
                return (loss_aux, shard_like_params(grads)), None

            ((loss, aux), grads), _ = jax.lax.scan(body, (zeros[0], shard_like_params(zeros[1])), micro)
            # a term dropped in any micro-batch counts once for the step
            aux = {**aux, "lm_dropped": jnp.minimum(aux["lm_dropped"], 1),
                   "vm_dropped": jnp.minimum(aux["vm_dropped"], 1)}

        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, state.opt_state, state.trainable)
        new_params = optax.apply_updates(state.trainable, updates)
        # A non-finite gradient (e.g. NaN activations that a dropped term still leaves in the backward
        # pass) skips the update entirely instead of poisoning the weights. Not `optax.apply_if_finite`:
        # that keeps its counters inside the optimizer state (a different checkpoint layout from
        # `state.skipped_updates`), applies NaN updates after `max_consecutive_errors`, and tests each
        # element rather than the global norm that is logged (which also catches a norm overflowing fp32).
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
            "lm_targets": n_tokens, "images_out": n_images, "images_over_budget": over,
            "dropped_lm": new_state.dropped_lm, "dropped_vm": new_state.dropped_vm,
            "skipped_updates": new_state.skipped_updates,
        }
        return new_state, metrics

    batch_sh = {k: batch_sharding(mesh, rules, nd) for k, nd in BATCH_NDIM.items()}
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_sh),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )


def shard_batch(batch: dict, mesh: Mesh, rules: Rules) -> dict:
    """Host numpy batch (this process's rows) -> global jax Arrays sharded over the batch axes."""
    out = {}
    for k, ndim in BATCH_NDIM.items():
        sh = batch_sharding(mesh, rules, ndim)
        out[k] = jax.make_array_from_process_local_data(sh, batch[k])
    return out
