"""Full-model parity: dreamjax DreamLLM forward + train loss vs the PyTorch oracle (fp32, tiny random weights).

The oracle (`tests/torch_reference/dreamllm_torch.py`) is built from transformers / diffusers modules with
upstream's parameter names. Random torch weights go through `convert/dreamllm.py` into the Flax tree, both
sides get the same real batch (an I2T pair, a T2I pair, an interleaved document in joint mode, a Q&A
conversation and a drawing conversation; several images per sample, one input and one output image
masked), and logits, conditions, both loss terms and the gradients of the dream queries and both
projectors must agree to 1e-4 (max error relative to the reference's max magnitude).

The JAX side is the real training objective (`train.step.loss_terms`, global token / image means). Its
random draws (latent sample noise, diffusion noise, timesteps) come from the step's rng; `_jax_draws`
repeats them exactly (same key split, same shapes) and hands them to the oracle. If `loss_terms` ever
changes how it uses the rng, only `vm_loss` (and the gradients) disagree: update `_jax_draws`.
"""

import contextlib
import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from dreamjax.convert import core
from dreamjax.convert.core import ConversionError
from dreamjax.convert.dreamllm import DREAM_QUERIES, dreamllm_from_torch, dreamllm_rules, dreamllm_to_torch
from dreamjax.data import images as imgs
from dreamjax.data.collate import collate
from dreamjax.data.synthetic import ShapesWorld
from dreamjax.data.tokenize import LayoutConfig, tokenize
from dreamjax.data.tokenizer import SpecialIds, build_word_tokenizer
from dreamjax.diffusion.schedule import SD21_BASE, Schedule
from dreamjax.models.dreamllm import DreamLLM, SpecialTokenIds, build_config
from dreamjax.train import losses
from dreamjax.train.step import StepConfig, loss_terms
from tests.helpers import assert_close, max_rel_err
from tests.torch_reference.dreamllm_torch import DreamLLMForCausalMLM, OutputImage

TOL = 1e-4
LOSS_WEIGHTS = (1.0, 10.0)  # (lm, vm): stages II/III
MAX_LENGTH = 128
MAX_IMAGES_IN = 3
MAX_IMAGES_OUT = 3
RES_IN = 16  # CLIP side: 16 px, patch 8 -> 4 image tokens
NUM_QUERIES = 4
# Stage II/III (spec 1.6): the LLM and the three plugins train; CLIP, UNet and VAE are frozen (no gradients).
TRAINABLE = ("llm", "dream_queries", "visual_projector", "condition_projector")
FROZEN_TORCH = ("model.clip_vision_embedding.clip_vision_model.", "stable_diffusion_head.unet.",
                "stable_diffusion_head.vae.")

# Unrolled layers (scan_layers=False) compile faster on CPU; scanned layers have their own parity tests.
LLM = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=4, rms_norm_eps=1e-5,
           rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False, scan_layers=False)
VISION = dict(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, image_size=RES_IN, patch_size=8,
              layer_norm_eps=1e-5, scan_layers=False)
# SD 2.1-base in miniature, latent diffusion: 16 px images -> 8x8x4 latents.
UNET_LATENT = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[16, 32],
                   down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                   up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=1,
                   attention_head_dim=[2, 4], cross_attention_dim=32, use_linear_projection=True,
                   norm_num_groups=8)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16],
           down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
           layers_per_block=1, norm_num_groups=4, sample_size=16)
# The demo's pixel-space diffusion (configs/tiny.py layout) on 8 px images.
UNET_PIXEL = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=[16, 32],
                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], layers_per_block=1,
                  attention_head_dim=[4, 4], cross_attention_dim=24, use_linear_projection=True,
                  norm_num_groups=8)
CASES = {"vae": (UNET_LATENT, VAE, 16), "pixel": (UNET_PIXEL, None, 8)}  # (unet, vae, output resolution)

ROW_DOC = 2  # the interleaved document: three DRM + IMG blocks; its 2nd input and 3rd output are masked


# ----------------------------------------------------------------------------- data


@functools.cache
def tokenizer_and_world():
    world = ShapesWorld(seed=0, resolution=RES_IN, doc_images=(3, 3))
    tok = build_word_tokenizer(world.vocabulary())
    return tok, SpecialIds.from_tokenizer(tok), world


@functools.cache
def batch_for(res_out: int) -> dict[str, np.ndarray]:
    """One real batch through the data layer: the spec-3 layouts and the static-shape collation."""
    tok, s, world = tokenizer_and_world()
    layout = dict(num_image_tokens=(RES_IN // VISION["patch_size"]) ** 2, num_dream_queries=NUM_QUERIES,
                  max_length=MAX_LENGTH)
    rows = [
        ("pairs", 0, "comprehension_only", {}),  # [BOS] IMG caption [EOS]
        ("pairs", 1, "creation_only", {}),  # caption DRM [EOS], no LM targets
        ("documents", 0, "joint", {}),  # [BOS] seg DRM IMG seg DRM IMG seg DRM IMG ... [EOS]
        ("conversations", 0, "joint", {"create_prob": 0.0}),  # <image> Q&A
        ("conversations", 1, "joint", {"create_prob": 1.0}),  # "Draw ..." -> DRM IMG
    ]
    samples = []
    for kind, index, mode, options in rows:
        record = world.record(kind, "train", index, **options)
        sample = tokenize(record, tok, LayoutConfig(mode=mode, **layout), rng=np.random.default_rng(index),
                          specials=s)
        assert sample is not None and len(sample) <= MAX_LENGTH, (kind, index)
        samples.append(sample)
    batch = collate(
        samples, MAX_LENGTH, MAX_IMAGES_IN, MAX_IMAGES_OUT, specials=s,
        load_in=lambda im: imgs.clip_preprocess(im, RES_IN),
        load_out=lambda im: imgs.diffusion_preprocess(im, res_out, random_flip=False),
        in_shape=(RES_IN, RES_IN, 3), out_shape=(res_out, res_out, 3),
    )
    assert batch["images_in_mask"][ROW_DOC].all() and batch["images_out_mask"][ROW_DOC].all()
    batch["images_in_mask"][ROW_DOC, 1] = False  # its <im_start> keeps the <im_patch> embeddings
    batch["images_out_mask"][ROW_DOC, 2] = False  # not in vm_loss
    return batch


def special_token_ids() -> SpecialTokenIds:
    return SpecialTokenIds.from_ids(tokenizer_and_world()[1])


# ----------------------------------------------------------------------------- models


def model_dict(case: str) -> dict:
    unet, vae, _ = CASES[case]
    return dict(llm=LLM, vision=VISION, unet=unet, vae=vae, num_dream_queries=NUM_QUERIES, select_layer=-2)


def dreamllm_config(case: str):
    tok, _, _ = tokenizer_and_world()
    return build_config(model_dict(case), vocab_size=len(tok), tokens=special_token_ids())


def perturb(module: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Noise on every parameter: no zero bias, unit norm or tiny query is a special case."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return module


@functools.cache
def torch_oracle(case: str) -> DreamLLMForCausalMLM:
    return make_oracle(case, seed=0)


def make_oracle(case: str, seed: int) -> DreamLLMForCausalMLM:
    """A random oracle for `case` (transformers / diffusers init, then `perturb`)."""
    cfg = dreamllm_config(case)
    s = cfg.tokens
    torch.manual_seed(seed)
    oracle = DreamLLMForCausalMLM(
        transformers.LlamaConfig.from_dict(cfg.llm.to_hf_dict(), attn_implementation="eager"),
        transformers.CLIPVisionConfig.from_dict(cfg.vision.to_hf_dict(), attn_implementation="eager"),
        cfg.unet.to_diffusers_dict(),
        cfg.vae.to_diffusers_dict() if cfg.vae is not None else None,
        SD21_BASE.to_diffusers(),
        tokens={"im_start": s.im_start, "dream_start": s.dream_start},
        num_dream_queries=cfg.num_dream_queries,
        select_layer=cfg.select_layer,
        loss_weight_lm=LOSS_WEIGHTS[0],
        loss_weight_vm=LOSS_WEIGHTS[1],
    )
    return perturb(oracle, seed=seed + 1).eval()


# ----------------------------------------------------------------------------- the two sides


def _jax_draws(rng, batch: dict, cfg):
    """The draws `loss_terms` makes from `rng` (NHWC): (latent-sample noise or None, noise, timesteps), each
    [B * No, ...]. As `losses.score_distillation_loss` with one noise draw: example i draws from the key
    `losses.example_keys(rng, rows)[i]` split into (latent sample, noise, timesteps, dropout) keys."""
    b, no, r = batch["images_out"].shape[:3]
    if cfg.vae is not None:
        h = r // cfg.vae.downsample_factor
        shape = (no, h, h, cfg.vae.latent_channels)
    else:
        shape = (no, r, r, batch["images_out"].shape[-1])

    def example(key):
        k_lat, k_noise, k_t, _ = jax.random.split(key, 4)
        latent_noise = None if cfg.vae is None else jax.random.normal(k_lat, shape, jnp.float32)  # to_latents
        noise = jax.random.normal(k_noise, (1,) + shape, jnp.float32)[0]
        t = jax.random.randint(k_t, (1, no), 0, SD21_BASE.num_train_timesteps)[0]
        return latent_noise, noise, t

    draws = jax.vmap(example)(losses.example_keys(rng, jnp.arange(b)))
    return jax.tree.map(lambda x: x.reshape((b * no,) + x.shape[2:]), draws)


@contextlib.contextmanager
def torch_threads(n: int):
    """Tiny ops: one intra-op thread is much faster than several (OpenMP sync), worst on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_torch(oracle: DreamLLMForCausalMLM, batch: dict, draws) -> dict:
    """The oracle on the batch (NHWC -> NCHW), with gradients of the total loss in `.grad`."""
    latent_noise, noise, t = (None if d is None else np.asarray(d) for d in draws)
    b, no = batch["images_out_mask"].shape
    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(2, 0, 1)))
    images = [[nchw(batch["images_in"][i, k]) if batch["images_in_mask"][i, k] else None
               for k in range(batch["images_in_mask"].shape[1])] for i in range(b)]
    images_dm = [[OutputImage(nchw(batch["images_out"][i, k]), int(t[i * no + k]), nchw(noise[i * no + k]),
                              None if latent_noise is None else nchw(latent_noise[i * no + k]))
                  if batch["images_out_mask"][i, k] else None for k in range(no)] for i in range(b)]
    for name, p in oracle.named_parameters():  # CLIP, UNet and VAE are frozen, as on the JAX side
        p.requires_grad_(not name.startswith(FROZEN_TORCH))
        p.grad = None
    out = oracle(
        torch.from_numpy(batch["tokens"]).long(),
        torch.from_numpy((batch["segment_ids"] > 0).astype(np.int64)),
        torch.from_numpy(batch["labels"]).long(),
        images,
        images_dm,
    )
    out["loss"].backward()
    return out


# The programs are tiny and run once or twice: LLVM's backend optimisations cost more than they save
# (about 2.5x faster compiles on CPU; same HLO, same results to well within the tolerance).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.cache
def jax_side(case: str):
    """(cfg, one jitted `run(params, batch, rng) -> (logits, condition, present, loss, lm, vm, grads)`)."""
    cfg = dreamllm_config(case)
    model = DreamLLM(cfg)
    schedule = Schedule.create(SD21_BASE)
    step_cfg = StepConfig(loss_weight_lm=LOSS_WEIGHTS[0], loss_weight_vm=LOSS_WEIGHTS[1])

    def objective(trainable, frozen, batch, rng):  # as make_train_step's, with the global counts
        terms = loss_terms(model, {**trainable, **frozen}, batch, rng, schedule, step_cfg)
        lm = losses.safe_divide(terms["ce_sum"], losses.num_lm_targets(batch["labels"]))
        vm = losses.safe_divide(terms["mse_sum"], jnp.sum(batch["images_out_mask"]).astype(jnp.float32))
        return step_cfg.loss_weight_lm * lm + step_cfg.loss_weight_vm * vm, (lm, vm)

    def run(params, batch, rng):
        logits, cond, present = model.apply(
            {"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"], batch["images_in"],
            batch["images_in_mask"], max_images_out=MAX_IMAGES_OUT)
        trainable = {k: v for k, v in params.items() if k in TRAINABLE}
        frozen = {k: v for k, v in params.items() if k not in TRAINABLE}
        (loss, (lm, vm)), grads = jax.value_and_grad(objective, has_aux=True)(trainable, frozen, batch, rng)
        return logits, cond, present, loss, lm, vm, grads

    return cfg, jax.jit(run, compiler_options=FAST_COMPILE)


# ----------------------------------------------------------------------------- tests


GRADS = {  # the trainable plugin parameters whose gradients must match (torch names)
    "dream_queries": DREAM_QUERIES,
    "visual_projector.weight": "model.clip_vision_embedding.projector.projector.weight",
    "visual_projector.bias": "model.clip_vision_embedding.projector.projector.bias",
    "condition_projector.weight": "stable_diffusion_head.projector.projector.weight",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_loss_and_gradients_match_torch(case):
    start = time.perf_counter()
    batch = batch_for(CASES[case][2])
    oracle = torch_oracle(case)
    cfg, run = jax_side(case)
    params = jax.tree.map(jnp.asarray, dreamllm_from_torch(oracle.state_dict(), cfg))
    jbatch = jax.tree.map(jnp.asarray, batch)
    rng = jax.random.PRNGKey(7)

    draws = jax.jit(functools.partial(_jax_draws, batch=jbatch, cfg=cfg), compiler_options=FAST_COMPILE)(rng)
    with torch_threads(1):
        ref = run_torch(oracle, batch, draws)
    logits, cond, present, loss, lm, vm, grads = run(params, jbatch, rng)

    errs = {}
    valid = batch["segment_ids"] > 0
    errs["logits"] = assert_close(np.asarray(logits)[valid], ref["logits"].detach().numpy()[valid], TOL, "logits")
    slots = ref["condition_slots"]
    assert len(slots) == int(batch["images_out_mask"].sum()) == 4  # T2I pair, 2 of 3 doc images, drawing
    assert sorted(zip(*np.nonzero(np.asarray(present) & batch["images_out_mask"]), strict=True)) == slots
    got = np.stack([np.asarray(cond)[b, k] for b, k in slots])
    errs["condition"] = assert_close(got, ref["condition"].detach().numpy(), TOL, "condition")
    errs["lm_loss"] = assert_close(lm, ref["lm_loss"].item(), TOL, "lm_loss")
    errs["vm_loss"] = assert_close(vm, ref["vm_loss"].item(), TOL, "vm_loss")
    errs["loss"] = assert_close(loss, ref["loss"].item(), TOL, "loss")

    torch_grads = {k: p.grad for k, p in oracle.named_parameters() if p.requires_grad}
    jax_grads = dreamllm_to_torch(grads, cfg)
    assert set(jax_grads) == set(torch_grads)
    for what, key in GRADS.items():
        expected = torch_grads[key].numpy()
        assert np.abs(expected).max() > 0, f"{what}: zero reference gradient"
        errs[f"grad {what}"] = assert_close(jax_grads[key], expected, TOL, f"grad {what}")
    # The LLM's gradients (stage II trains it) agree too.
    others = {k: max_rel_err(jax_grads[k], g.numpy()) for k, g in torch_grads.items() if k not in GRADS.values()}
    worst = max(others, key=others.get)
    errs["grad llm (max)"] = assert_close(jax_grads[worst], torch_grads[worst].numpy(), TOL, f"grad {worst}")

    # A masked input image is ignored: other pixels there change nothing (same compiled program).
    noisy = dict(jbatch, images_in=jbatch["images_in"].at[ROW_DOC, 1].set(
        jax.random.normal(jax.random.PRNGKey(1), jbatch["images_in"].shape[2:])))
    logits2, _, _, loss2, _, _, grads2 = run(params, noisy, rng)
    np.testing.assert_array_equal(np.asarray(logits2), np.asarray(logits))
    np.testing.assert_array_equal(np.asarray(loss2), np.asarray(loss))
    np.testing.assert_array_equal(np.asarray(grads2["visual_projector"]["kernel"]),
                                  np.asarray(grads["visual_projector"]["kernel"]))
    print(f"\n[{case}] {time.perf_counter() - start:.1f}s  " + "  ".join(f"{k} {v:.1e}" for k, v in errs.items()))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_conversion_round_trip_is_bit_exact(case, dtype):
    oracle = torch_oracle(case)
    cfg = dreamllm_config(case)
    sd = {k: v.to(getattr(torch, dtype)) for k, v in oracle.state_dict().items()}
    params = dreamllm_from_torch(sd, cfg)
    assert params["dream_queries"].shape == (NUM_QUERIES, LLM["hidden_size"])
    assert ("vae" in params) == (cfg.vae is not None)
    back = dreamllm_to_torch(params, cfg)
    assert set(back) == set(sd)
    for k, v in sd.items():
        want = core.to_numpy(v)
        assert back[k].dtype == want.dtype == (ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32), k
        assert back[k].shape == want.shape, k
        np.testing.assert_array_equal(back[k].view(np.uint16 if dtype == "bfloat16" else np.uint32),
                                      want.view(np.uint16 if dtype == "bfloat16" else np.uint32), err_msg=k)
    # ...and the exported tensors load strictly into the torch model (upstream loads with strict=True).
    if dtype == "float32":
        fresh = make_oracle(case, seed=5)
        missing, unexpected = fresh.load_state_dict({k: core.to_torch(v) for k, v in back.items()}, strict=True)
        assert not missing and not unexpected


def test_rules_cover_the_upstream_names():
    cfg = dreamllm_config("vae")
    torch_keys = set(torch_oracle("vae").state_dict())
    flax_paths = set(core.flatten(nn.meta.unbox(dreamllm_from_torch(torch_oracle("vae").state_dict(), cfg))))
    rules = dreamllm_rules(cfg)
    assert {r.torch.split(".")[0] for r in rules} == {"model", "lm_head", "stable_diffusion_head"}
    assert {p.split("/")[0] for p in flax_paths} == {"llm", "vision", "visual_projector", "dream_queries",
                                                     "condition_projector", "unet", "vae"}
    assert any(k.startswith("model.clip_vision_embedding.clip_vision_model.vision_model.encoder.layers.")
               for k in torch_keys)
    assert "stable_diffusion_head.vae.encoder.mid_block.attentions.0.to_q.weight" in torch_keys


def test_import_errors_name_the_keys():
    cfg = dreamllm_config("pixel")
    sd = dict(torch_oracle("pixel").state_dict())
    queries = sd.pop(DREAM_QUERIES)
    with pytest.raises(ConversionError, match="dream_queries"):  # upstream would silently keep random ones
        dreamllm_from_torch(sd, cfg)
    with pytest.raises(ConversionError, match=r"dream_queries has shape \(4, 64\)"):
        dreamllm_from_torch({**sd, DREAM_QUERIES: queries[0]}, cfg)
    vae_key = "stable_diffusion_head.vae.encoder.conv_in.weight"  # a VAE the config does not have
    with pytest.raises(ConversionError, match=f"unexpected keys.*{vae_key}"):
        dreamllm_from_torch({**sd, DREAM_QUERIES: queries, vae_key: torch.zeros(8, 3, 3, 3)}, cfg)
