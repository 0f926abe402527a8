"""The per-data-shard budget of output images for the diffusion side (`config.train.image_budget`).

The budgeted loss must be the per-slot loss of exactly the images that fit (the first `budget` present
images of each data shard), count the rest, and make the VAE + UNet work follow the budget. The tiny model
and the pipeline batches are `tests/test_train_step.py`'s (its `setup` fixture, built once per module).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamjax.parallel.sharding import DEFAULT_RULES, data_parallel_size
from dreamjax.train import losses
from dreamjax.train.stages import STAGES, merge_params
from dreamjax.train.step import StepConfig, images_over_budget, loss_terms
from tests.test_train_step import runner, setup  # noqa: F401  (setup: the module-scoped fixture)

RNG = jax.random.PRNGKey(7)
VM_ONLY = dict(loss_weight_lm=0.0, loss_weight_vm=1.0)  # the LM term plays no part here


def fits_numpy(mask: np.ndarray, shards: int, budget: int) -> tuple[np.ndarray, int]:
    """(which present images fit [B, No], how many do not), written out slot by slot."""
    rows = mask.reshape(shards, -1)
    fits = np.zeros_like(rows)
    over = 0
    for s in range(shards):
        present = np.flatnonzero(rows[s])
        fits[s, present[:budget]] = True
        over += max(len(present) - budget, 0)
    return fits.reshape(mask.shape), over


def reference_sum(model, schedule, params, batch, rng, fits, cfg: StepConfig) -> jax.Array:
    """The per-slot loss summed over `fits` & present, with every slot run through the UNet (no budget)."""
    images_in = losses.zero_absent(batch["images_in"], batch["images_in_mask"])
    _, cond, present = model.apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"],
                                   images_in, batch["images_in_mask"], max_images_out=batch["images_out"].shape[1])
    b, no = fits.shape
    keys = losses.slot_keys(losses.example_keys(rng, jnp.arange(b)), no)
    mask = jnp.asarray(fits) & present
    flat = lambda x: x.reshape((b * no,) + x.shape[2:])
    mse = losses.slot_mse(model, params, flat(losses.zero_absent(batch["images_out"], mask)), flat(cond),
                          flat(keys), schedule, noise_draws=cfg.noise_draws, condition_dropout=cfg.condition_dropout)
    return jnp.sum(jnp.where(flat(mask), mse, 0.0))


@pytest.fixture(scope="module")
def params(setup):  # noqa: F811
    return jax.tree.map(jnp.asarray, nn.meta.unbox(setup.boxed_params))


def budgeted(setup, params, batch, cfg):  # noqa: F811
    terms = jax.jit(lambda p, b: loss_terms(setup.model, p, b, RNG, setup.schedule, cfg))(params, batch)
    return float(terms["mse_sum"]), int(terms["images_over_budget"])


def test_large_budget_is_the_per_slot_loss(setup, params):  # noqa: F811
    batch = setup.batches[0]
    b, no = batch["images_out_mask"].shape
    cfg = StepConfig(**VM_ONLY, noise_draws=2, condition_dropout=0.3, image_budget=b * no, data_shards=2)
    got, over = budgeted(setup, params, batch, cfg)
    want = reference_sum(setup.model, setup.schedule, params, batch, RNG, batch["images_out_mask"], cfg)
    assert over == 0
    assert got > 0 and got == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize("shards,budget", [(4, 1)])
def test_small_budget_uses_the_first_images_of_each_shard(setup, params, shards, budget):  # noqa: F811
    batch = setup.batches[1]
    fits, over_np = fits_numpy(batch["images_out_mask"], shards, budget)
    assert over_np > 0  # the case is meaningful
    cfg = StepConfig(**VM_ONLY, image_budget=budget, data_shards=shards)
    got, over = budgeted(setup, params, batch, cfg)
    want = reference_sum(setup.model, setup.schedule, params, batch, RNG, fits, cfg)
    assert over == over_np
    assert got == pytest.approx(float(want), rel=1e-6)


def test_no_budget_is_unchanged(setup, params):  # noqa: F811
    """budget None keeps the per-example draws: `loss_terms` is `score_distillation_loss` bit for bit."""
    batch = setup.batches[0]
    cfg = StepConfig(**VM_ONLY)
    got, over = budgeted(setup, params, batch, cfg)
    images_in = losses.zero_absent(batch["images_in"], batch["images_in_mask"])

    def today(p):
        _, cond, present = setup.model.apply({"params": p}, batch["tokens"], batch["positions"],
                                             batch["segment_ids"], images_in, batch["images_in_mask"],
                                             max_images_out=batch["images_out"].shape[1])
        return losses.score_distillation_loss(setup.model, p, batch["images_out"], cond,
                                              batch["images_out_mask"] & present,
                                              losses.example_keys(RNG, jnp.arange(batch["tokens"].shape[0])),
                                              setup.schedule)

    assert over == 0 and got == float(jax.jit(today)(params))


def test_unet_flops_follow_the_budget(setup, params):  # noqa: F811
    batch = setup.batches[0]
    b, no = batch["images_out_mask"].shape

    def flops(budget):
        cfg = StepConfig(**VM_ONLY, image_budget=budget, data_shards=1)
        fn = jax.jit(lambda p, bt: loss_terms(setup.model, p, bt, RNG, setup.schedule, cfg)["mse_sum"])
        cost = fn.lower(params, batch).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return cost["flops"]

    everything, four, one = flops(None), flops(4), flops(1)
    # The LLM forward is shared; the diffusion side scales with the images processed (16 -> 4 -> 1).
    assert one < four < everything
    assert (four - one) > 2.5 * (everything - four) / 12  # ~ linear in the images: 3 vs 12 UNet passes


def test_budget_on_a_mesh(setup):  # noqa: F811
    """The jitted step on a (2, 4, 1) mesh: 8 data shards of one example each, budget 1 per shard."""
    stage = STAGES["stage2"]
    run = runner(setup, stage.trainable, StepConfig(stage.loss_weight_lm, stage.loss_weight_vm, image_budget=1),
                 (2, 4, 1))
    shards = data_parallel_size(run.mesh, DEFAULT_RULES)
    assert shards == 8
    batch = setup.batches[2]
    _, (m,) = run.run([batch])
    fits, over_np = fits_numpy(batch["images_out_mask"], shards, 1)
    assert over_np > 0
    assert m["images_over_budget"] == over_np and m["images_out"] == batch["images_out_mask"].sum()

    host = run.host_state
    _, step_rng = jax.random.split(host.rng)
    p = jax.tree.map(jnp.asarray, merge_params(host.trainable, host.frozen))
    want = reference_sum(setup.model, setup.schedule, p, batch, step_rng, fits, StepConfig())
    assert m["vm_loss"] == pytest.approx(float(want) / fits.sum(), rel=1e-5)


def test_over_budget_count_per_micro_batch():
    """With gradient accumulation the budget applies per micro-step: micro-batch m holds rows m, m + A, ..."""
    rng = np.random.default_rng(0)
    mask = rng.random((16, 3)) < 0.7
    cfg = StepConfig(grad_accum_steps=2, image_budget=2, data_shards=2)
    want = sum(fits_numpy(mask[m::2], 2, 2)[1] for m in range(2))
    assert int(images_over_budget(jnp.asarray(mask), cfg)) == want
    assert int(images_over_budget(jnp.asarray(mask), StepConfig())) == 0
    with pytest.raises(ValueError, match="data shards"):
        images_over_budget(jnp.asarray(mask), StepConfig(grad_accum_steps=2, image_budget=1, data_shards=3))
