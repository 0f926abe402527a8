"""Run assembly: `config.init` starts a run from pretrained weights (tiny random transformers / diffusers
models saved by the test, never downloaded), bit for bit; frozen parts stay bit-identical through training;
`dream` and whole-checkpoint starts from a dreamjax run; every init error names the part and the key;
generation and the demo evaluation agree image for image; a run trained on an fsdp mesh loads sharded."""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file, save_file

from dreamjax.cli import load_config, main
from dreamjax.convert import diffusers as dconv
from dreamjax.convert import hf
from dreamjax.convert.core import flatten
from dreamjax.run.assembly import load_run, new_run
from dreamjax.run.model import build_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
VOCAB_SHORTFALL = 3  # the pretrained LLM lacks the tokenizer's last rows, as Vicuna lacks DreamLLM's tokens
UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=[4, 4], cross_attention_dim=64, norm_num_groups=8, use_linear_projection=True,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 32], layers_per_block=1,
    down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8,
    sample_size=16,
)
# stable-diffusion-2-1-base's scheduler/scheduler_config.json (a PNDM config, which upstream reads as DDPM)
SCHEDULER = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.10.0.dev0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
             "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
             "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}


def _base_config():
    c = load_config(TINY + ":smoke")
    c.train.stage = "stage2"
    c.train.steps = 2
    c.train.checkpoint_every = 2
    c.train.precision = "fp32"
    # the diffusion side comes entirely from the Stable Diffusion directory
    c.model.unet = None
    c.model.vae = None
    c.model.schedule = None
    return c


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Tiny random pretrained parts on disk: a Llama (smaller vocabulary than the tokenizer), a full CLIP
    (its text half must be dropped), and a Stable Diffusion directory (unet/, vae/, scheduler/)."""
    root = tmp_path_factory.mktemp("pretrained")
    c = _base_config()
    vocab = len(build_tokenizer(c)) - VOCAB_SHORTFALL
    llm = c.model.llm
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
        max_position_embeddings=llm.max_position_embeddings, rms_norm_eps=llm.rms_norm_eps,
        tie_word_embeddings=False,
    )).save_pretrained(root / "llm")
    v = c.model.vision
    transformers.CLIPModel(transformers.CLIPConfig(
        vision_config=dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                           num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                           image_size=v.image_size, patch_size=v.patch_size),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=50),
        projection_dim=16,
    )).save_pretrained(root / "clip")
    UNet2DConditionModel(**UNET).save_pretrained(root / "sd" / "unet")
    AutoencoderKL(**VAE).save_pretrained(root / "sd" / "vae")
    os.makedirs(root / "sd" / "scheduler")
    (root / "sd" / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    return {"llm": str(root / "llm"), "clip": str(root / "clip"), "stable_diffusion": str(root / "sd")}


def _config(pretrained, **init):
    c = _base_config()
    for key, path in {**pretrained, **init}.items():
        c.init[key] = path
    return c


def _host(tree) -> dict:
    return {k: np.asarray(jax.device_get(v)) for k, v in flatten(tree).items()}


def assert_bit_equal(got: dict, want: dict, what: str, rows: dict | None = None):
    """Same keys, dtypes and bits (a view as unsigned ints: -0.0 != 0.0, NaN payloads count)."""
    got, want = flatten(got), flatten(want)
    assert sorted(got) == sorted(want), what
    for k, w in want.items():
        g = np.asarray(jax.device_get(got[k]))
        w = np.asarray(w)
        if rows and k in rows:  # only the rows the pretrained file has
            axis = rows[k]
            g = np.take(g, np.arange(w.shape[axis]), axis=axis)
        assert g.dtype == w.dtype and g.shape == w.shape, (what, k, g.dtype, w.dtype, g.shape, w.shape)
        assert np.array_equal(g.view(f"u{g.itemsize}"), w.view(f"u{w.itemsize}")), f"{what}: {k} differs"


@pytest.fixture(scope="module")
def converted(pretrained):
    """The same weights through the plain (non-streaming) converters: what the run must hold."""
    return {
        "llm": hf.load_hf_llama(pretrained["llm"])[0],
        "vision": hf.load_hf_clip(pretrained["clip"])[0],
        "unet": dconv.load_diffusers_unet(pretrained["stable_diffusion"])[0],
        "vae": dconv.load_diffusers_vae(pretrained["stable_diffusion"])[0],
    }


GROWN = {"embed_tokens/embedding": 0, "lm_head/kernel": 1}


def test_init_params_equal_the_converted_weights(pretrained, converted):
    run = new_run(_config(pretrained))
    # the architecture came from the weights' config files: the run config left unet / vae / schedule out
    assert run.model_config.unet.in_channels == 4 and run.model_config.vae is not None
    assert run.schedule.config.beta_schedule == "scaled_linear"
    params = run.init_params(jax.random.PRNGKey(0))
    for part in ("vision", "unet", "vae"):
        assert_bit_equal(params[part], converted[part], part)
    assert_bit_equal(params["llm"], converted["llm"], "llm", rows=GROWN)
    vocab = params["llm"]["embed_tokens"]["embedding"].shape[0]
    assert vocab == len(run.tokenizer) == converted["llm"]["embed_tokens"]["embedding"].shape[0] + VOCAB_SHORTFALL
    # every leaf sits on the run's mesh with its training sharding
    for leaf, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(run.param_shardings)):
        assert leaf.sharding == sharding


@pytest.fixture(scope="module")
def stage2_workdir(pretrained, tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("stage2"))
    from dreamjax.train.loop import train

    metrics = train(_config(pretrained), wd, progress=False)
    assert np.isfinite(metrics["loss"]) and metrics["step"] == 2
    return wd


def test_training_keeps_frozen_parts_bit_identical(stage2_workdir, converted):
    run = load_run(stage2_workdir)
    assert run.step == 2
    for part in ("vision", "unet", "vae"):  # frozen in stage 2
        assert_bit_equal(run.params[part], converted[part], part)
    before = converted["llm"]["layers"]["mlp"]["up_proj"]["kernel"]
    after = np.asarray(run.params["llm"]["layers"]["mlp"]["up_proj"]["kernel"])
    assert not np.array_equal(before, after), "the LLM trains in stage 2"
    saved = json.load(open(os.path.join(stage2_workdir, "config.json")))
    assert saved["model"]["unet"]["in_channels"] == 4  # the workdir records the resolved architecture


@pytest.mark.parametrize("key", ["dream", "checkpoint"])
def test_init_from_a_dreamjax_run(key, stage2_workdir, pretrained, converted, tmp_path):
    source = load_run(stage2_workdir)
    config = _config(pretrained, dream=stage2_workdir) if key == "dream" else _config({}, checkpoint=stage2_workdir)
    run = new_run(config)
    params = run.init_params(jax.random.PRNGKey(1))
    parts = ("dream_queries", "visual_projector", "condition_projector") if key == "dream" else tuple(params)
    for part in parts:
        assert_bit_equal({part: params[part]}, _host({part: source.params[part]}), part)
    if key == "dream":  # the rest from the pretrained directories
        assert_bit_equal(params["unet"], converted["unet"], "unet")
    wd = str(tmp_path / "run")
    assert main(["train", "--config", TINY + ":smoke", "--workdir", wd, "--no-progress", "--config.train.steps=2",
                 "--config.train.stage=stage2", "--config.model.unet=None", "--config.model.vae=None",
                 "--config.model.schedule=None", *(f"--config.init.{k}={v}" for k, v in config.init.items() if v),
                 *(["--config.tokenizer=None"] if key == "checkpoint" else [])]) == 0
    trained = load_run(wd)
    for part in ("vision", "unet", "vae"):
        assert_bit_equal({part: trained.params[part]}, _host({part: source.params[part]}), part)


# ------------------------------------------------------------------------------------------------ errors


def _edit_llm(pretrained, tmp_path, edit):
    dst = tmp_path / "llm"
    dst.mkdir()
    for name in os.listdir(pretrained["llm"]):
        if not name.endswith(".safetensors"):
            (dst / name).write_bytes(open(os.path.join(pretrained["llm"], name), "rb").read())
    sd = load_file(os.path.join(pretrained["llm"], "model.safetensors"))
    edit(sd)
    save_file(sd, str(dst / "model.safetensors"))
    return str(dst)


@pytest.mark.parametrize("edit, needle", [
    (lambda sd: sd.pop("model.norm.weight"), "config.init.llm ({path}) -> llm: missing keys: model.norm.weight"),
    (lambda sd: sd.update({"model.extra.weight": torch.zeros(2)}),
     "config.init.llm ({path}) -> llm: unexpected keys (no rule maps them): model.extra.weight"),
    (lambda sd: sd.update({"model.norm.weight": torch.zeros(127)}),
     "config.init.llm ({path}) -> llm: shape mismatch: model.norm.weight: (127,) in the file, (128,) in the model"),
    (lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"), "model.layers.*.mlp.up_proj.weight: layers [1] missing"),
])
def test_init_weight_errors_name_the_part_and_key(edit, needle, pretrained, tmp_path):
    path = _edit_llm(pretrained, tmp_path, edit)
    run = new_run(_config(pretrained, llm=path))
    with pytest.raises(ValueError, match=re.escape(needle.format(path=path))):
        run.init_params(jax.random.PRNGKey(0))


def test_init_config_errors(pretrained, tmp_path, capsys):
    c = _config(pretrained)
    c.model.llm.hidden_size = 64
    with pytest.raises(ValueError, match=re.escape("config.model.llm.hidden_size = 64 contradicts the weights: "
                                                   f"{pretrained['llm']}/config.json has hidden_size = 128")):
        new_run(c)
    c = _config(pretrained)
    c.model.unet = {"cross_attention_dim": 32}
    with pytest.raises(ValueError, match=r"config.model.unet.cross_attention_dim = 32 contradicts the weights: "
                                         r".*/unet/config.json has cross_attention_dim = 64"):
        new_run(c)
    missing = str(tmp_path / "nope")
    assert main(["train", "--config", TINY + ":smoke", "--workdir", str(tmp_path / "wd"),
                 f"--config.init.clip={missing}"]) == 2
    assert f"config.init.clip: path does not exist: {missing}" in capsys.readouterr().err
    shutil.copytree(os.path.join(pretrained["stable_diffusion"], "unet"), tmp_path / "sd_no_vae" / "unet")
    with pytest.raises(FileNotFoundError, match=r"config.init.stable_diffusion: no vae/ folder in .*sd_no_vae"):
        new_run(_config({}, stable_diffusion=str(tmp_path / "sd_no_vae")))


def test_init_dream_shape_mismatch_names_the_part(stage2_workdir, pretrained):
    c = _config(pretrained, dream=stage2_workdir)
    c.model.num_dream_queries = 4  # the source run has 8
    run = new_run(c)
    with pytest.raises(ValueError, match=re.escape("config.init.dream") + r".*shape mismatch.*dream_queries"):
        run.init_params(jax.random.PRNGKey(0))


# ------------------------------------------------------------------------------------------------ inference


@pytest.fixture(scope="module")
def fsdp_workdir(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("fsdp"))
    assert main(["train", "--config", TINY + ":smoke", "--workdir", wd, "--no-progress", "--config.train.steps=2",
                 "--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.mesh.tensor=1"]) == 0
    return wd


def test_generate_loads_params_sharded_as_in_training(fsdp_workdir, tmp_path):
    run = load_run(fsdp_workdir)
    assert dict(run.mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    sharded = 0
    for leaf, sharding in zip(jax.tree.leaves(run.params), jax.tree.leaves(run.param_shardings)):
        assert leaf.sharding == sharding
        sharded += "fsdp" in jax.tree.leaves(tuple(sharding.spec))
    assert sharded >= 10, "the fsdp rules shard the embedding dimension of most weights"
    emb = run.params["llm"]["embed_tokens"]["embedding"]
    assert len(emb.addressable_shards) == 8 and emb.addressable_shards[0].data.shape[1] == emb.shape[1] // 8
    assert main(["generate", "--checkpoint", fsdp_workdir, "--prompt", "a red circle", "--mode", "image",
                 "--steps", "2", "--out", str(tmp_path / "out")]) == 0


def test_generate_image_equals_the_demo_eval_image(fsdp_workdir, tmp_path):
    from dreamjax.data.synthetic import world_from_config
    from dreamjax.eval.demo import color_accuracy

    run = load_run(fsdp_workdir)
    settings = run.sample_settings(steps=3)
    _, records = color_accuracy(run, world_from_config(run.config.data), 1, str(tmp_path / "eval"), settings,
                                seed=7)
    out = str(tmp_path / "gen")
    assert main(["generate", "--checkpoint", fsdp_workdir, "--prompt", records[0]["prompt"], "--mode", "image",
                 "--steps", "3", "--seed", "7", "--out", out]) == 0
    generated = np.asarray(Image.open(os.path.join(out, "image_7_0.png")))
    evaluated = np.asarray(Image.open(records[0]["image"]))
    assert settings.sampler == "ddim"  # the tiny config's sampler, used by both
    np.testing.assert_array_equal(generated, evaluated)
