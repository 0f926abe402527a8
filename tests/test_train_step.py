"""The sharded train step (DESIGN section 4, spec 1.6): mesh invariance, stages, gradient accumulation,
non-finite handling.

A very tiny DreamLLM (pixel-space diffusion) and real batches from the data pipeline (ShapesWorld pairs,
conversations and documents). Compiling on CPU dominates the runtime, so:

* parameters are initialised once on the host with numpy (the jitted flax init of even this tiny model is
  a ~30 s CPU compile, and init is not what these tests are about) and fed to `create_state` as its
  `init_fn`;
* each (stage, loss weights, accumulation, mesh) step is compiled once per module and reused; since the
  step donates its state, every run gets a fresh device copy of the same host state.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import numpy as np
import optax.tree_utils as otu
import pytest
from flax import traverse_util

from configs import common
from dreamjax.data.pipeline import SKIPS_KEY, PipelineConfig, make_dataset
from dreamjax.data.synthetic import ShapesWorld
from dreamjax.data.tokenize import IGNORE_INDEX, LayoutConfig
from dreamjax.data.tokenizer import SpecialIds, build_word_tokenizer
from dreamjax.diffusion.schedule import Schedule, ScheduleConfig
from dreamjax.models.dreamllm import DreamLLM, SpecialTokenIds, build_config, init_params
from dreamjax.parallel.mesh import MESH_AXES, make_mesh
from dreamjax.parallel.sharding import DEFAULT_RULES
from dreamjax.train import losses
from dreamjax.train.optimizer import make_optimizer
from dreamjax.train.stages import PARTS, STAGES, Stage
from dreamjax.train.state import TrainState, create_state
from dreamjax.train.step import StepConfig, make_train_step, shard_batch
from tests.helpers import max_rel_err

BATCH = 8
MAX_LENGTH = 64
LR = 1e-2  # large, so three steps move the parameters well beyond fp32 noise
NUM_STEPS = 3
MESH_TOL = 1e-5
# AdamW's first steps move an element by ~LR * g / (|g| + eps). With the default eps=1e-8 that maps the
# fp32 rounding of gradient elements near 1e-7 (sums that cancel, where rounding is ~1% relative) to
# ~1e-5 parameter differences although the gradients agree to ~5e-7 per leaf (measured: up to 2.5e-5 for
# grad accumulation, 1.6e-5 on the (2,2,2) mesh with eps=1e-4). eps=1e-3 bounds that sensitivity
# (<= LR / (4 eps)) while elements with a typical clipped gradient (~1e-3) still move by ~LR / 2.
ADAM_EPS = 1e-3

MODEL = dict(
    llm=dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
             max_position_embeddings=MAX_LENGTH, tie_word_embeddings=False, scan_layers=True,
             remat_policy="none"),
    vision=dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, image_size=16, patch_size=8),
    select_layer=-2,
    num_dream_queries=4,
    # The condition enters through the mid block's cross-attention; plain down/up blocks keep the
    # CPU compile short.
    unet=dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=[16, 32],
              down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"],
              attention_head_dim=[2, 2], cross_attention_dim=32, norm_num_groups=8, use_linear_projection=True),
    vae=None,
)


# ------------------------------------------------------------------------------------------------ fixtures


@dataclasses.dataclass
class Setup:
    model: DreamLLM
    schedule: Schedule
    boxed_params: dict  # LogicallyPartitioned-boxed numpy params (the init_fn's output)
    batches: list  # host numpy batches (pipeline output without `skips`)


@pytest.fixture(scope="module")
def setup() -> Setup:
    world = ShapesWorld(seed=0, resolution=32)
    tok = build_word_tokenizer(world.vocabulary())
    s = SpecialIds.from_tokenizer(tok)
    schedule_cfg = common.base_config().model.schedule.to_dict()
    # vocab padded to a multiple of 8 (unused rows) so the embedding and lm_head shard over 'tensor' too
    cfg = build_config({**MODEL, "schedule": schedule_cfg}, vocab_size=-(-len(tok) // 8) * 8,
                       tokens=SpecialTokenIds(s.bos, s.im_start, s.im_patch, s.dream_start, s.dream_end))
    model = DreamLLM(cfg)
    pipe = PipelineConfig(
        layout=LayoutConfig(num_image_tokens=cfg.num_image_tokens, num_dream_queries=cfg.num_dream_queries,
                            max_length=MAX_LENGTH),
        per_host_batch=BATCH, max_images_in=2, max_images_out=2, resolution_in=16, resolution_out=16,
    )
    sources = dict(pairs=world.pairs("train", 200), conversations=world.conversations("train", 200),
                   documents=world.documents("train", 200))
    it = iter(make_dataset(sources, dict(pairs=0.4, conversations=0.3, documents=0.3), tok, pipe))
    batches = []
    for _ in range(NUM_STEPS):
        b = next(it)
        b.pop(SKIPS_KEY)
        batches.append(b)
    for b in batches:  # every step sees images in, images out and text targets
        assert b["images_in_mask"].any() and b["images_out_mask"].any()
        assert (b["labels"][:, 1:] != IGNORE_INDEX).sum() > 0
        assert np.all(np.abs(b["images_out"]) <= 1.0)
    # the three batches together hold all token-layout kinds: I2T and T2I blocks
    tokens = np.concatenate([b["tokens"] for b in batches])
    assert (tokens == s.im_start).any() and (tokens == s.dream_start).any()

    schedule = Schedule.create(ScheduleConfig.from_diffusers(schedule_cfg))
    return Setup(model, schedule, host_init(model, seed=0), batches)


def host_init(model: DreamLLM, seed: int) -> dict:
    """Boxed random params with the model's tree, shapes and logical names, drawn with numpy."""
    abstract = jax.eval_shape(lambda k: init_params(model, k), jax.random.PRNGKey(0))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = jax.tree_util.keystr(path), leaf.shape
        if "scale" in name:  # norm scales around 1
            x = 1.0 + 0.1 * rng.standard_normal(shape)
        elif len(shape) >= 2 and "dream_queries" not in name:  # kernels and embeddings: 1 / sqrt(fan-in)
            fan_in = np.prod(shape[1:-1] if "['layers']" in name else shape[:-1])  # scanned: [layers, ...]
            x = rng.standard_normal(shape) / np.sqrt(fan_in)
        else:  # biases, queries, class embedding
            x = 0.05 * rng.standard_normal(shape)
        return x.astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def mesh_of(shape: tuple[int, int, int]):
    sizes = dict(zip(MESH_AXES, shape))
    if np.prod(shape) == 1:
        return make_mesh(sizes, devices=jax.devices()[:1])
    return make_mesh(sizes)


@dataclasses.dataclass
class Runner:
    """One compiled step for a (trainable parts, StepConfig, mesh) and its initial state on the host."""

    step: object
    mesh: object
    shardings: TrainState
    host_state: TrainState

    def fresh_state(self) -> TrainState:
        return jax.device_put(self.host_state, self.shardings)

    def run(self, batches, state=None):
        """Steps over `batches` from a fresh copy of the initial state: (final state, host metrics list)."""
        state = self.fresh_state() if state is None else state
        metrics = []
        for b in batches:
            state, m = self.step(state, shard_batch(b, self.mesh, DEFAULT_RULES))
            metrics.append(jax.device_get(m))
        return state, metrics


_RUNNERS: dict = {}


def runner(setup: Setup, trainable: tuple[str, ...], cfg: StepConfig, mesh_shape=(1, 1, 1)) -> Runner:
    key = (tuple(sorted(trainable)), cfg, mesh_shape)
    if key not in _RUNNERS:
        mesh = mesh_of(mesh_shape)
        tx, _ = make_optimizer(learning_rate=LR, total_steps=100, warmup_steps=0, eps=ADAM_EPS)
        state, shardings = create_state(lambda _: setup.boxed_params, tx, trainable, mesh, DEFAULT_RULES,
                                        jax.random.PRNGKey(1))
        step = make_train_step(setup.model, tx, setup.schedule, cfg, mesh, DEFAULT_RULES, shardings)
        _RUNNERS[key] = Runner(step, mesh, shardings, jax.device_get(state))
    return _RUNNERS[key]


def stage_runner(setup: Setup, stage: Stage, mesh_shape=(1, 1, 1), **step_kwargs) -> Runner:
    cfg = StepConfig(loss_weight_lm=stage.loss_weight_lm, loss_weight_vm=stage.loss_weight_vm, **step_kwargs)
    return runner(setup, stage.trainable, cfg, mesh_shape)


def flat(tree) -> dict:
    return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def assert_finite_tree(tree, what):
    for path, v in jax.tree_util.tree_leaves_with_path(jax.device_get(tree)):
        assert np.all(np.isfinite(v)), f"{what}: non-finite values in {jax.tree_util.keystr(path)}"


# ------------------------------------------------------------------------------------------------ 1. meshes

MESHES = [(8, 1, 1), (2, 4, 1), (1, 4, 2), (2, 2, 2)]


def _mesh_invariance(setup: Setup, mesh_shape, stage_name: str):
    stage = STAGES[stage_name]
    ref = stage_runner(setup, stage, (1, 1, 1))
    other = stage_runner(setup, stage, mesh_shape)
    ref_state, ref_metrics = ref.run(setup.batches)
    state, metrics = other.run(setup.batches)

    # the state is laid out as the mesh asks (e.g. the LLM's 'embed' dimension over fsdp)
    emb = state.trainable["llm"]["embed_tokens"]["embedding"]
    assert emb.sharding.mesh.shape == other.mesh.shape
    assert tuple(emb.sharding.spec) == ("tensor", "fsdp")

    errs = {}
    for i, (a, e) in enumerate(zip(metrics, ref_metrics)):
        for k in ("loss", "lm_loss", "vm_loss", "grad_norm"):
            errs[f"step{i}/{k}"] = max_rel_err(a[k], e[k])
        for k in ("lm_targets", "images_out", "dropped_lm", "dropped_vm", "skipped_updates"):
            assert a[k] == e[k], (i, k)
    got, want = flat(state.trainable), flat(ref_state.trainable)
    assert got.keys() == want.keys()
    for k in want:
        errs[f"param/{k}"] = max_rel_err(got[k], want[k])
    # and three steps of LR=1e-2 really moved the parameters
    init = flat(ref.host_state.trainable)
    moved = [k for k in want if not np.array_equal(init[k], want[k])]
    assert len(moved) > 0.9 * len(want)
    worst = max(errs, key=errs.get)
    metric_err = max(v for k, v in errs.items() if k.startswith("step"))
    print(f"mesh {mesh_shape} ({stage_name}): max rel err {errs[worst]:.2e} at {worst}; "
          f"metrics (loss, lm, vm, grad norm) {metric_err:.1e}")
    bad = {k: v for k, v in errs.items() if v > MESH_TOL}
    assert not bad, f"mesh {mesh_shape} differs from one device: {bad}"
    assert int(state.step) == NUM_STEPS
    return errs[worst]


def test_mesh_invariance_fast(setup):
    """stage2 (LLM, projectors and queries train; CLIP and UNet frozen but differentiated through) on
    the mesh that uses all three axes. Its one-device step is shared with the stage test."""
    _mesh_invariance(setup, (2, 2, 2), "stage2")


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", MESHES, ids=str)
def test_mesh_invariance(setup, mesh_shape):
    """Every part trains (stage demo), so every parameter sharding is exercised (~1 min per mesh)."""
    _mesh_invariance(setup, mesh_shape, "demo")


# ------------------------------------------------------------------------------------------------ 2. stages

# Trainable leaves that get no gradient at all, so AdamW (weight decay 0) leaves them bit-identical:
# with select_layer=-2 the CLIP tower's post-layernorm is never used.
NO_GRADIENT = ("vision/post_layernorm/",)
# Trainable leaves whose gradient is zero in exact arithmetic, only rounding noise in fp32: the key bias
# adds q . b_k to a whole row of attention logits, which the softmax ignores. (The LLM and UNet have no
# key bias.) They may or may not move, but by much less than LR.
ZERO_GRADIENT = ("vision/layers/self_attn/k_proj/bias",)


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_trains_exactly_its_parts(setup, name):
    stage = STAGES[name]
    r = stage_runner(setup, stage)
    before = r.host_state
    state, (m,) = r.run(setup.batches[:1])

    # split: exactly the stage's parts are trainable, the rest frozen
    present = set(PARTS) - {"vae"}  # the tiny model diffuses in pixel space: no VAE
    assert set(state.trainable) == set(stage.trainable) & present
    assert set(state.frozen) == present - set(stage.trainable)
    assert np.isfinite(m["loss"]) and m["skipped_updates"] == 0
    assert m["loss"] == pytest.approx(stage.loss_weight_lm * m["lm_loss"] + stage.loss_weight_vm * m["vm_loss"],
                                      rel=1e-6)
    assert (m["vm_loss"] > 0) == (stage.loss_weight_vm != 0)  # the vm term is not even computed at weight 0

    # frozen: bit-identical
    fb, fa = flat(before.frozen), flat(state.frozen)
    assert fb.keys() == fa.keys()
    for k in fb:
        assert np.array_equal(fb[k], fa[k]), f"{name}: frozen {k} changed"

    # trainable: every leaf that receives gradient changed
    tb, ta = flat(before.trainable), flat(state.trainable)
    unchanged = sorted(k for k in tb if np.array_equal(tb[k], ta[k]) and not k.startswith(ZERO_GRADIENT))
    expected_unchanged = sorted(k for k in tb if k.startswith(NO_GRADIENT))
    assert unchanged == expected_unchanged, f"{name}: unexpectedly unchanged {unchanged}"
    for k in tb:
        if k.startswith(ZERO_GRADIENT):
            assert np.max(np.abs(ta[k] - tb[k])) < 1e-3 * LR, k
    for part in set(stage.trainable) & present:
        assert any(k.split("/")[0] == part and k not in unchanged for k in tb), part

    # optimizer state mirrors the trainable params only: AdamW mu and nu have their tree exactly
    opt_arrays = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    n_train = sum(np.size(x) for x in jax.tree.leaves(state.trainable))
    assert sum(np.size(x) for x in opt_arrays) == 2 * n_train
    for moment in ("mu", "nu"):
        ((_, tree),) = otu.tree_get_all_with_path(state.opt_state, moment)
        assert jax.tree.structure(tree) == jax.tree.structure(state.trainable)
        assert set(tree) == set(stage.trainable) & present
    # in the optimizer state's shardings too (no frozen part sneaks in through a mirror of the full tree)
    assert jax.tree.structure(r.shardings.opt_state) == jax.tree.structure(state.opt_state)


def test_stage1_creation_gradients_reach_queries_through_frozen_llm(setup):
    stage = STAGES["stage1_creation"]
    assert "llm" not in stage.trainable and stage.loss_weight_lm == 0.0
    r = stage_runner(setup, stage)
    state, (m,) = r.run(setup.batches[:1])
    assert m["vm_loss"] > 0 and m["grad_norm"] > 0
    assert m["loss"] == pytest.approx(m["vm_loss"], rel=1e-6)  # lm weight 0: the LLM only carries gradient
    q0 = r.host_state.trainable["dream_queries"]
    q1 = np.asarray(state.trainable["dream_queries"])
    # every query row gets its own gradient (queries are placed one per slot), through the LLM
    changed_rows = np.any(q0 != q1, axis=-1)
    assert changed_rows.all(), changed_rows
    assert np.max(np.abs(q1 - q0)) > 0.5 * LR  # Adam's first step moves by ~LR
    for k, v in flat(r.host_state.frozen["llm"]).items():
        assert np.array_equal(v, np.asarray(flat(state.frozen["llm"])[k])), k


def test_stage2_and_stage3_share_parts_and_weights():
    # stage3 is stage2's setting on other data (spec 1.6); the stage test above runs both
    assert STAGES["stage2"] == STAGES["stage3"]
    assert (STAGES["stage2"].loss_weight_lm, STAGES["stage2"].loss_weight_vm) == (1.0, 10.0)
    assert (STAGES["stage1_creation"].loss_weight_lm, STAGES["stage1_creation"].loss_weight_vm) == (0.0, 1.0)
    assert (STAGES["stage1_comprehension"].loss_weight_lm,
            STAGES["stage1_comprehension"].loss_weight_vm) == (1.0, 0.0)


# ------------------------------------------------------------------------------------------------ 3. accumulation

ACCUM_TRAINABLE = ("llm", "visual_projector", "dream_queries", "condition_projector")


def _grad_accumulation(setup: Setup, mesh_shape, accum_steps: int):
    """grad_accum_steps=n over the same global batch = one step over it (accumulation 1, one device), with
    both loss terms on.

    Every example draws its diffusion randomness (VAE sample, noise, timesteps) from the step key folded
    with its row in the global batch, so a micro-batch (every n-th row) draws exactly what the full batch
    draws for those rows. What remains differs only in fp32 summation order (partial CE / MSE sums and n
    gradients added instead of one reduction over the batch): ~1e-7 relative on the loss, ~1e-6 per
    gradient leaf; through clipping and AdamW (see ADAM_EPS) that stays around 1e-6 relative to each leaf's
    scale, so 1e-5 is a tolerance with margin. The micro-batches hold different numbers of targets and of
    output images, so a per-micro-batch token or image mean instead of the global one would show, and so
    would keys folded with the row's index in its micro-batch (a different sample: the loss moves by ~1%).
    """
    batch = setup.batches[0]
    micro = [slice(i, None, accum_steps) for i in range(accum_steps)]  # the rows of each micro-batch
    targets = [(batch["labels"][rows, 1:] != IGNORE_INDEX).sum() for rows in micro]
    images = [batch["images_out_mask"][rows].sum() for rows in micro]
    assert len(set(targets)) > 1 and min(targets) > 0, targets  # the global token mean matters
    assert len(set(images)) > 1 and max(images) > 0, images  # the global image mean matters
    one = runner(setup, ACCUM_TRAINABLE, StepConfig(1.0, 10.0, grad_accum_steps=1))
    acc = runner(setup, ACCUM_TRAINABLE, StepConfig(1.0, 10.0, grad_accum_steps=accum_steps), mesh_shape)
    s1, (m1,) = one.run([batch])
    s2, (m2,) = acc.run([batch])
    assert m1["lm_targets"] == m2["lm_targets"] == sum(targets)
    assert m1["images_out"] == m2["images_out"] == sum(images)
    for k in ("loss", "lm_loss", "vm_loss", "grad_norm"):
        assert max_rel_err(m2[k], m1[k]) <= 1e-6, (k, m1[k], m2[k])
    assert m1["vm_loss"] > 0 and m1["lm_loss"] > 0
    for k in ("dropped_lm", "dropped_vm", "skipped_updates"):
        assert m1[k] == m2[k] == 0, k
    a, b = flat(s1.trainable), flat(s2.trainable)
    errs = {k: max_rel_err(b[k], a[k]) for k in a}
    worst = max(errs, key=errs.get)
    metric_err = max(max_rel_err(m2[k], m1[k]) for k in ("loss", "lm_loss", "vm_loss", "grad_norm"))
    print(f"grad accumulation x{accum_steps} on {mesh_shape}: metrics rel err {metric_err:.1e}, "
          f"max param rel err {errs[worst]:.1e} at {worst}")
    assert errs[worst] <= 1e-5, (worst, errs[worst])
    init = flat(one.host_state.trainable)
    for k in a:  # every leaf moved, the condition projector too (both terms are on)
        assert not np.array_equal(init[k], a[k]), k


@pytest.mark.parametrize("accum_steps", [2, 4])
def test_grad_accumulation_matches_one_batch(setup, accum_steps):
    """Accumulation on the (2, 2, 2) mesh (micro-batches of 4 or 2 rows from a batch sharded 4 ways)."""
    _grad_accumulation(setup, (2, 2, 2), accum_steps)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (8, 1, 1)], ids=str)
def test_grad_accumulation_other_meshes(setup, mesh_shape):
    _grad_accumulation(setup, mesh_shape, 2)


# ------------------------------------------------------------------------------------------------ 4. non-finite


def test_nonfinite_vm_term_is_dropped_and_the_update_skipped(setup):
    stage = STAGES["demo"]
    r = stage_runner(setup, stage)
    batch = {k: v.copy() for k, v in setup.batches[0].items()}
    row, col = np.argwhere(batch["images_out_mask"])[0]
    batch["images_out"][row, col, 0, 0, 0] = np.nan  # one pixel of one present output image

    state, (m,) = r.run([batch])
    assert np.isfinite(m["loss"])
    assert m["vm_loss"] == 0.0 and m["dropped_vm"] == 1 and m["dropped_lm"] == 0
    assert m["lm_loss"] > 0 and m["loss"] == pytest.approx(stage.loss_weight_lm * m["lm_loss"], rel=1e-6)
    # The NaN reaches the gradient through the backward pass of the dropped term (0 * NaN), so the
    # update is skipped, counted, and neither parameters nor optimizer state change.
    assert not np.isfinite(m["grad_norm"])
    assert m["skipped_updates"] == 1
    assert int(state.step) == 1
    for what, before, after in (("trainable", r.host_state.trainable, state.trainable),
                                ("opt_state", r.host_state.opt_state, state.opt_state)):
        b, a = jax.tree.leaves(before), jax.tree.leaves(jax.device_get(after))
        assert all(np.array_equal(x, y) for x, y in zip(b, a)), what
    assert_finite_tree(state.trainable, "params after a skipped update")

    # the counters carry on and a clean batch trains normally afterwards
    state, (m2,) = r.run([setup.batches[1]], state=state)
    assert np.isfinite(m2["grad_norm"]) and m2["vm_loss"] > 0
    assert m2["dropped_vm"] == 1 and m2["skipped_updates"] == 1 and int(state.step) == 2
    assert_finite_tree(state.trainable, "params")
    assert_finite_tree(state.opt_state, "opt_state")
    changed = flat(state.trainable)
    assert any(not np.array_equal(v, changed[k]) for k, v in flat(r.host_state.trainable).items())


@pytest.mark.parametrize("key", ["images_in", "images_out"])
def test_nonfinite_absent_image_is_ignored(setup, key):
    """NaN in the pixels of an *absent* image slot (mask False) changes nothing at all.

    (Before the fix in `step.loss_terms` the slot went through CLIP / the UNet and was masked only
    afterwards, so the backward pass turned 0 * NaN into NaN gradients and the update was skipped.)
    """
    r = stage_runner(setup, STAGES["demo"])
    batch = {k: v.copy() for k, v in setup.batches[0].items()}
    absent = np.argwhere(~batch[f"{key}_mask"])
    assert len(absent), f"the batch should have an absent {key} slot"
    row, col = absent[0]
    batch[key][row, col] = np.nan
    clean_state, (clean,) = r.run(setup.batches[:1])
    state, (m,) = r.run([batch])
    assert m["dropped_vm"] == 0 and m["dropped_lm"] == 0 and m["skipped_updates"] == 0
    for k in ("loss", "lm_loss", "vm_loss", "grad_norm"):
        assert m[k] == clean[k], k
    a, b = flat(state.trainable), flat(clean_state.trainable)
    for k in b:
        assert np.array_equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------ 5. score distillation


def test_score_distillation_draws_per_example(setup):
    """Several noise draws and condition dropout: every draw of an example comes from its own key, so a
    batch's loss is the sum of its parts' losses for any split of the rows; dropout 1 ignores the condition
    (every draw sees the unconditional one), dropout 0 does not; more draws are a different sample."""
    params = nn.meta.unbox(setup.boxed_params)
    batch = jax.tree.map(jax.numpy.asarray, setup.batches[0])
    mask = batch["images_out_mask"]
    b, no = mask.shape
    cfg = setup.model.config
    # a stand-in for the LLM's dream-query readout [B, No, Q, C]
    cond = 0.5 * jax.random.normal(jax.random.PRNGKey(4), (b, no, cfg.num_dream_queries, cfg.condition_dim))
    key = jax.random.PRNGKey(3)

    @functools.partial(jax.jit, static_argnames=("draws", "dropout"))
    def loss(params, rows, cond, draws, dropout):
        return losses.score_distillation_loss(
            setup.model, params, batch["images_out"][rows], cond[rows], mask[rows], losses.example_keys(key, rows),
            setup.schedule, noise_draws=draws, condition_dropout=dropout)

    rows = np.arange(b)
    full = loss(params, rows, cond, 3, 0.5)
    parts = sum(loss(params, rows[i::2], cond, 3, 0.5) for i in range(2))
    assert np.isfinite(full) and full > 0
    assert max_rel_err(parts, full) <= 1e-6, (parts, full)
    assert not np.allclose(loss(params, rows, cond, 1, 0.5), full, rtol=1e-3)

    other = 0.5 * jax.random.normal(jax.random.PRNGKey(5), cond.shape)
    assert loss(params, rows, cond, 3, 1.0) == loss(params, rows, other, 3, 1.0)
    assert not np.allclose(loss(params, rows, cond, 3, 0.0), loss(params, rows, other, 3, 0.0), rtol=1e-3)
