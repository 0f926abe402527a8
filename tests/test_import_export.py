"""`dreamjax import` / `dreamjax export` on tiny random models written by the test (never downloaded):

- import -> export reproduces every tensor bit for bit, for every format (hf-llama, clip, diffusers-sd and a
  released-layout DreamLLM directory with spec 5's file and key names and the released token-id order);
- the exported `hf` directories load with transformers / diffusers `from_pretrained` with no missing or
  unexpected keys, and the PyTorch reference DreamLLM (`tests/torch_reference/`) on them matches the JAX
  forward of the imported checkpoint (logits, condition, losses) to 1e-4;
- an imported Llama decodes through `dreamjax generate --mode text` with transformers' greedy tokens;
- `config.init.dreamllm` gives the same parameters as `import dreamllm`;
- a source with a missing file, a misshapen or an unknown tensor fails through the CLI with exit code 2 and
  one stderr line naming the problem.
"""

import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from dreamjax.cli import main
from dreamjax.convert import core
from dreamjax.convert.core import flatten
from dreamjax.convert.stream import TensorFiles
from dreamjax.data import images as imgs
from dreamjax.data.collate import collate
from dreamjax.data.synthetic import ShapesWorld
from dreamjax.data.tokenize import LayoutConfig, tokenize
from dreamjax.data.tokenizer import RELEASED_SPECIAL_TOKEN_ORDER, SpecialIds, build_word_tokenizer
from dreamjax.diffusion.schedule import SD21_BASE
from dreamjax.infer.decode import generate_text
from dreamjax.run.assembly import load_run, new_run
from dreamjax.train import losses
from dreamjax.train.step import StepConfig, loss_terms
from tests.helpers import assert_close
from tests.test_dreamllm_parity import (
    LLM,
    NUM_QUERIES,
    RES_IN,
    UNET_LATENT,
    VAE,
    VISION,
    _jax_draws,
    make_oracle,
    run_torch,
    torch_threads,
)
from tests.torch_reference.dreamllm_torch import DreamLLMForCausalMLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4
MAX_LENGTH, MAX_IMAGES_IN, MAX_IMAGES_OUT, RES_OUT = 128, 3, 3, 16
INV_FREQ = "model.layers.0.self_attn.rotary_emb.inv_freq"  # an old persistent buffer: dropped on import


def cli(*argv) -> None:
    assert main([str(a) for a in argv]) == 0, argv


def bits(x) -> np.ndarray:
    x = np.ascontiguousarray(core.to_numpy(x))
    return x.view(f"u{x.itemsize}")


def assert_same_tensors(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), (what, sorted(set(got) ^ set(want))[:8])
    for k in want:
        g, w = core.to_numpy(got[k]), core.to_numpy(want[k])
        assert g.dtype == w.dtype and g.shape == w.shape, (what, k, g.dtype, w.dtype, g.shape, w.shape)
        assert np.array_equal(bits(g), bits(w)), f"{what}: {k} differs"


def tensors_of(path: str) -> dict:
    """Every tensor of a weights file or directory (safetensors shards + index, or .bin), as numpy."""
    files = TensorFiles(path)
    return {k: files.get(k) for k in files.keys()}


# ------------------------------------------------------------------------------------------------ sources


@functools.cache
def world():
    return ShapesWorld(seed=0, resolution=RES_IN, doc_images=(3, 3))


def released_tokenizer(out_dir=None):
    """A word tokenizer whose DreamLLM tokens have the released id order ([PAD], <im_start>, <dream_end>, ...)."""
    return build_word_tokenizer(world().vocabulary(), out_dir, special_tokens_order=RELEASED_SPECIAL_TOKEN_ORDER)


def llama_dir(path, tok_dir_writer, *, initializer_range=0.02, seed=0, dtype=torch.float32) -> str:
    tok = tok_dir_writer(path)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
        initializer_range=initializer_range,
    )).to(dtype).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """One directory per import format."""
    root = tmp_path_factory.mktemp("sources")
    # A sharper random init than HF's 0.02 separates the logits, so greedy decoding has clear winners.
    llm = llama_dir(root / "llm", released_tokenizer, initializer_range=0.4)
    torch.manual_seed(1)
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=RES_IN,
        patch_size=8))
    clip.save_pretrained(root / "clip")  # transformers 5 keys: no `vision_model.` prefix
    torch.manual_seed(2)
    UNet2DConditionModel(**UNET_LATENT).to(torch.bfloat16).save_pretrained(root / "sd" / "unet")
    AutoencoderKL(**VAE).save_pretrained(root / "sd" / "vae")
    (root / "sd" / "scheduler").mkdir()
    (root / "sd" / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DDPMScheduler", **SD21_BASE.to_diffusers()}))
    return {"hf-llama": llm, "clip": str(root / "clip"), "diffusers-sd": str(root / "sd"),
            "dreamllm": write_release(root / "dreamllm", torch.float32, root),
            "dreamllm-bf16": write_release(root / "dreamllm_bf16", torch.bfloat16, root)}


def write_release(path, dtype, root) -> str:
    """A released-layout directory (spec 5): config.json with special_tokens2ids_dict and plugins_init_kwargs,
    pytorch_model.bin (LLM only), the three plugin files with their module-relative keys, tokenizer files with
    added_tokens.json in the released id order. CLIP and SD are named by local mirror directories holding
    their configs, as upstream's `from_pretrained` would read them."""
    os.makedirs(path)
    tok = released_tokenizer(path)
    oracle = make_oracle("vae", seed=3)
    sd = {k: v.to(dtype).contiguous() for k, v in oracle.state_dict().items()}
    plugins = {"clip_vision_embedding": "model.clip_vision_embedding.", "dream_embedding": "model.dream_embedding.",
               "stable_diffusion_head": "stable_diffusion_head."}
    llm = {k: v for k, v in sd.items() if not k.startswith(tuple(plugins.values()))}
    llm[INV_FREQ] = torch.arange(8, dtype=torch.float32).to(dtype)
    torch.save(llm, os.path.join(path, "pytorch_model.bin"))
    for name, prefix in plugins.items():
        plugin = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        torch.save(plugin, os.path.join(path, f"{name}.bin"))
    # local mirrors of the two towers (configs only: the weights come from the plugin files)
    mirror_clip, mirror_sd = os.path.join(root, "mirror_clip"), os.path.join(root, "mirror_sd")
    if not os.path.exists(mirror_clip):
        oracle.model.clip_vision_embedding.clip_vision_model.vision_model.config.save_pretrained(mirror_clip)
        for sub, model in (("unet", oracle.stable_diffusion_head.unet), ("vae", oracle.stable_diffusion_head.vae)):
            model.save_config(os.path.join(mirror_sd, sub))
        DDPMScheduler.from_config(SD21_BASE.to_diffusers()).save_config(os.path.join(mirror_sd, "scheduler"))
    s = SpecialIds.from_tokenizer(tok)
    added = {t: tok.convert_tokens_to_ids(t) for t in RELEASED_SPECIAL_TOKEN_ORDER}
    additional = {t: added[t] for t in RELEASED_SPECIAL_TOKEN_ORDER[1:]}
    (path / "added_tokens.json").write_text(json.dumps(added))
    llama = oracle.model.config
    config = {
        "architectures": ["DreamLLMForCausalMLM"], "model_type": "dreamllm", "vocab_size": llama.vocab_size,
        "hidden_size": llama.hidden_size, "intermediate_size": llama.intermediate_size,
        "num_hidden_layers": llama.num_hidden_layers, "num_attention_heads": llama.num_attention_heads,
        "num_key_value_heads": llama.num_key_value_heads, "hidden_act": "silu",
        "max_position_embeddings": llama.max_position_embeddings, "rms_norm_eps": llama.rms_norm_eps,
        "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False, "initializer_range": 0.02,
        "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": -1,  # the released (unused, wrong) values
        "torch_dtype": str(dtype).removeprefix("torch."), "use_cache": True,
        "special_tokens2ids_dict": {"<s>": s.bos, "</s>": s.eos, "<unk>": 0, "[PAD]": s.pad,
                                    "additional_special_tokens": additional},
        "plugins_init_kwargs": {
            "clip_vision_embedding": {"_target_": "omni.models.dreamllm.modeling_plugins.CLIPVisionEmbedding",
                                      "clip_vision_model_name_or_path": mirror_clip, "projector_type": "linear",
                                      "projector_depth": 1, "select_layer": -2, "use_additional_post_layernorm": False,
                                      "embed_hidden_size": llama.hidden_size, "pretrained_model_name_or_path": "none"},
            "dream_embedding": {"_target_": "omni.models.dreamllm.modeling_plugins.DreamEmbedding",
                                "num_dream_queries": NUM_QUERIES, "embed_hidden_size": llama.hidden_size,
                                "pretrained_model_name_or_path": "none"},
            "stable_diffusion_head": {"_target_": "omni.models.dreamllm.modeling_plugins.StableDiffusionHead",
                                      "diffusion_name_or_path": mirror_sd, "projector_type": "linear",
                                      "embed_hidden_size": llama.hidden_size, "pretrained_model_name_or_path": "none"},
        },
        "plugins_type": {"clip_vision_embedding": "embedding", "dream_embedding": "embedding",
                         "stable_diffusion_head": "head"},
        "loss_weight_lm": 1.0, "loss_weight_vm": 10.0, "loss_scale_schedule": "none",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return str(path)


@pytest.fixture(scope="module")
def imported(sources, tmp_path_factory):
    """Each source imported through the CLI: {format: workdir}."""
    root = tmp_path_factory.mktemp("imported")
    out = {}
    for name, src in sources.items():
        fmt = "dreamllm" if name.startswith("dreamllm") else name
        out[name] = str(root / name)
        cli("import", fmt, "--src", src, "--out", out[name])
    return out


# ------------------------------------------------------------------------------------------------ round trips


def test_round_trip_hf_llama_is_bit_exact_in_shards(sources, imported, tmp_path):
    out = tmp_path / "hf"
    cli("export", "hf", "--checkpoint", imported["hf-llama"], "--out", out, "--max-shard-size", "40KB")
    assert (out / "llm" / "model.safetensors.index.json").is_file(), "the 40 KB limit makes several shards"
    assert_same_tensors(tensors_of(str(out / "llm")), tensors_of(sources["hf-llama"]), "llm")
    assert not (out / "vision").exists() and not (out / "unet").exists()
    assert "no vision tower" in (out / "README.md").read_text()  # left out with a note, not an error
    model, info = transformers.LlamaForCausalLM.from_pretrained(out / "llm", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tok = transformers.AutoTokenizer.from_pretrained(out / "llm")
    assert tok.convert_tokens_to_ids("<im_start>") == SpecialIds.from_tokenizer(released_tokenizer()).im_start


def test_round_trip_clip_is_bit_exact(sources, imported, tmp_path):
    out = tmp_path / "hf"
    cli("export", "hf", "--checkpoint", imported["clip"], "--out", out)
    want = {"vision_model." + k: v for k, v in tensors_of(sources["clip"]).items()}  # export keeps transformers
    assert_same_tensors(tensors_of(str(out / "vision")), want, "vision")            # 4's `vision_model.` prefix
    model, info = transformers.CLIPVisionModel.from_pretrained(out / "vision", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert sorted(os.listdir(out)) == ["README.md", "vision"]


def test_round_trip_diffusers_sd_is_bit_exact(sources, imported, tmp_path):
    out = tmp_path / "hf"
    cli("export", "hf", "--checkpoint", imported["diffusers-sd"], "--out", out)
    for part in ("unet", "vae"):  # the UNet is bf16, the VAE fp32: each keeps its dtype
        assert_same_tensors(tensors_of(str(out / part)), tensors_of(os.path.join(sources["diffusers-sd"], part)), part)
    for cls, part in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")):
        _, info = cls.from_pretrained(out / part, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], part
    sched = DDPMScheduler.from_pretrained(out / "scheduler")
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.steps_offset == 1


@pytest.mark.parametrize("name", ["dreamllm", "dreamllm-bf16"])
def test_round_trip_released_layout_is_bit_exact(name, sources, imported, tmp_path):
    src, out = sources[name], tmp_path / "release"
    cli("export", "dreamllm", "--checkpoint", imported[name], "--out", out, "--max-shard-size", "40KB")
    llm = tensors_of(os.path.join(src, "pytorch_model.bin"))
    llm.pop(INV_FREQ)  # a buffer, not a parameter: dropped on import, not written back
    assert_same_tensors(tensors_of(str(out)), llm, "LLM")  # model-0000k-of-0000n.safetensors + index
    for plugin in ("clip_vision_embedding", "dream_embedding", "stable_diffusion_head"):
        got = torch.load(out / f"{plugin}.bin", weights_only=True)
        assert_same_tensors(got, torch.load(os.path.join(src, f"{plugin}.bin"), weights_only=True), plugin)
    config = json.loads((out / "config.json").read_text())
    source_config = json.loads(open(os.path.join(src, "config.json")).read())
    assert config["special_tokens2ids_dict"] == source_config["special_tokens2ids_dict"]
    assert config["model_type"] == "dreamllm" and config["vocab_size"] == source_config["vocab_size"]
    assert config["plugins_init_kwargs"]["dream_embedding"]["num_dream_queries"] == NUM_QUERIES
    # the export is itself a release: it imports again to the same parameters
    again = tmp_path / "again"
    cli("import", "dreamllm", "--src", out, "--out", again)
    first, second = load_run(imported[name]), load_run(str(again))
    assert_same_tensors(flatten(jax.device_get(second.params)), flatten(jax.device_get(first.params)), "re-import")
    assert second.specials == first.specials


def plain_tokenizer(out_dir):
    """A LLaMA-like tokenizer without DreamLLM's tokens (as Vicuna's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for text in world().vocabulary() for w in text.split()})
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                              eos_token="</s>")
    hf.save_pretrained(out_dir)
    return hf


def test_import_adds_dreamllm_tokens_to_a_plain_llama(tmp_path):
    """Vicuna lacks DreamLLM's 8 tokens: import appends them (random rows, as upstream's resize), keeps every
    source row bit for bit, and the export is a consistent, larger transformers model."""
    src = llama_dir(tmp_path / "vicuna", plain_tokenizer)
    cli("import", "hf-llama", "--src", src, "--out", tmp_path / "wd")
    cli("export", "hf", "--checkpoint", tmp_path / "wd", "--out", tmp_path / "hf")
    got, want = tensors_of(str(tmp_path / "hf" / "llm")), tensors_of(src)
    v = want["model.embed_tokens.weight"].shape[0]
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert got[key].shape[0] == v + 8
        got[key] = got[key][:v]
    assert_same_tensors(got, want, "llm rows of the source")
    model, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf" / "llm", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and model.config.vocab_size == v + 8
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf" / "llm")
    assert len(tok) == v + 8 and tok.convert_tokens_to_ids("<dream_start>") >= v


def test_training_needs_every_tower():
    from dreamjax.train.stages import check_model_parts

    with pytest.raises(ValueError, match="training needs the whole DreamLLM, but this model has only llm"):
        check_model_parts(("llm",))
    check_model_parts(("llm", "vision", "visual_projector", "dream_queries", "condition_projector", "unet"))


# ------------------------------------------------------------------------------------------------ the hf export


@pytest.fixture(scope="module")
def exported_hf(imported, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported") / "hf"
    cli("export", "hf", "--checkpoint", imported["dreamllm"], "--out", out)
    return out


def reference_from_hf_dirs(out, specials: SpecialIds) -> DreamLLMForCausalMLM:
    """The PyTorch reference DreamLLM assembled from the exported directories alone (strict load)."""
    llm, info_llm = transformers.LlamaForCausalLM.from_pretrained(out / "llm", output_loading_info=True,
                                                                  attn_implementation="eager")
    vision, info_vision = transformers.CLIPVisionModel.from_pretrained(out / "vision", output_loading_info=True,
                                                                       attn_implementation="eager")
    unet, info_unet = UNet2DConditionModel.from_pretrained(out / "unet", output_loading_info=True)
    vae, info_vae = AutoencoderKL.from_pretrained(out / "vae", output_loading_info=True)
    for what, info in (("llm", info_llm), ("vision", info_vision), ("unet", info_unet), ("vae", info_vae)):
        assert not info["missing_keys"] and not info["unexpected_keys"], (what, info)
    scheduler = dict(DDPMScheduler.from_pretrained(out / "scheduler").config)
    heads = load_file(str(out / "dreamllm_heads.safetensors"))
    queries = heads["model.dream_embedding.dream_queries"]
    oracle = DreamLLMForCausalMLM(
        llm.config, vision.config, dict(unet.config), dict(vae.config), scheduler,
        tokens={"im_start": specials.im_start, "dream_start": specials.dream_start},
        num_dream_queries=queries.shape[1], select_layer=-2)
    state = {k: v for k, v in llm.state_dict().items()}
    state.update({"model.clip_vision_embedding.clip_vision_model.vision_model." + k: v
                  for k, v in vision.state_dict().items()})
    state.update({"stable_diffusion_head.unet." + k: v for k, v in unet.state_dict().items()})
    state.update({"stable_diffusion_head.vae." + k: v for k, v in vae.state_dict().items()})
    state.update(heads)
    missing, unexpected = oracle.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    return oracle.eval()


def release_batch(tok) -> dict:
    """A real batch through the data layer with the released token ids (pairs, a document, conversations)."""
    s = SpecialIds.from_tokenizer(tok)
    layout = dict(num_image_tokens=(RES_IN // VISION["patch_size"]) ** 2, num_dream_queries=NUM_QUERIES,
                  max_length=MAX_LENGTH)
    rows = [("pairs", 0, "comprehension_only", {}), ("pairs", 1, "creation_only", {}), ("documents", 0, "joint", {}),
            ("conversations", 0, "joint", {"create_prob": 0.0}), ("conversations", 1, "joint", {"create_prob": 1.0})]
    samples = [tokenize(world().record(kind, "train", i, **o), tok, LayoutConfig(mode=mode, **layout),
                        rng=np.random.default_rng(i), specials=s) for kind, i, mode, o in rows]
    return collate(samples, MAX_LENGTH, MAX_IMAGES_IN, MAX_IMAGES_OUT, specials=s,
                   load_in=lambda im: imgs.clip_preprocess(im, RES_IN),
                   load_out=lambda im: imgs.diffusion_preprocess(im, RES_OUT, random_flip=False),
                   in_shape=(RES_IN, RES_IN, 3), out_shape=(RES_OUT, RES_OUT, 3))


def test_reference_forward_on_exported_weights_matches_jax(imported, exported_hf):
    run = load_run(imported["dreamllm"])
    assert run.config.train.precision == "fp32"  # fp32 files compute in fp32
    oracle = reference_from_hf_dirs(exported_hf, run.specials)
    batch = release_batch(run.tokenizer)
    cfg, model = run.model_config, run.model
    step_cfg = StepConfig(loss_weight_lm=1.0, loss_weight_vm=10.0)

    @jax.jit
    def forward(params, batch, rng):
        logits, cond, present = model.apply({"params": params}, batch["tokens"], batch["positions"],
                                            batch["segment_ids"], batch["images_in"], batch["images_in_mask"],
                                            max_images_out=MAX_IMAGES_OUT)
        terms = loss_terms(model, params, batch, rng, run.schedule, step_cfg)
        lm = losses.safe_divide(terms["ce_sum"], losses.num_lm_targets(batch["labels"]))
        vm = losses.safe_divide(terms["mse_sum"], jnp.sum(batch["images_out_mask"]).astype(jnp.float32))
        return logits, cond, present, lm, vm, lm + 10.0 * vm

    rng = jax.random.PRNGKey(7)
    jbatch = jax.tree.map(jnp.asarray, batch)
    draws = jax.jit(functools.partial(_jax_draws, batch=jbatch, cfg=cfg))(rng)
    with run.mesh:
        logits, cond, present, lm, vm, loss = forward(run.params, jbatch, rng)
    with torch_threads(1):
        ref = run_torch(oracle, batch, draws)
    valid = batch["segment_ids"] > 0
    errs = {"logits": assert_close(np.asarray(logits)[valid], ref["logits"].detach().numpy()[valid], TOL, "logits")}
    slots = ref["condition_slots"]
    assert len(slots) >= 3
    got = np.stack([np.asarray(cond)[b, k] for b, k in slots])
    errs["condition"] = assert_close(got, ref["condition"].detach().numpy(), TOL, "condition")
    errs["lm_loss"] = assert_close(lm, ref["lm_loss"].item(), TOL, "lm_loss")
    errs["vm_loss"] = assert_close(vm, ref["vm_loss"].item(), TOL, "vm_loss")
    errs["loss"] = assert_close(loss, ref["loss"].item(), TOL, "loss")
    assert float(ref["vm_loss"]) > 0 and float(ref["lm_loss"]) > 0
    print(f"\nlm_loss {float(lm):.6f} vm_loss {float(vm):.6f}  " +
          "  ".join(f"{k} {v:.1e}" for k, v in errs.items()))


def test_hf_export_layout(exported_hf, imported):
    names = sorted(os.listdir(exported_hf))
    assert names == ["README.md", "dreamllm_heads.safetensors", "llm", "scheduler", "unet", "vae", "vision"]
    heads = load_file(str(exported_hf / "dreamllm_heads.safetensors"))
    assert sorted(heads) == ["model.clip_vision_embedding.projector.projector.bias",
                             "model.clip_vision_embedding.projector.projector.weight",
                             "model.dream_embedding.dream_queries", "stable_diffusion_head.projector.projector.weight"]
    assert heads["model.dream_embedding.dream_queries"].shape == (1, NUM_QUERIES, LLM["hidden_size"])
    assert "dreamllm_heads.safetensors" in (exported_hf / "README.md").read_text()


def test_the_exported_readme_snippet_runs(exported_hf):
    """The README's PyTorch snippet runs as written, from the export directory: text, then an image."""
    readme = (exported_hf / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace("set_timesteps(50)", "set_timesteps(3)") + "\nassert image.shape[-1] == 16\n"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", code], cwd=exported_hf, capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ generation


def test_imported_llama_decodes_like_transformers_generate(sources, imported, tmp_path):
    prompt, n_new = "What color is the shape?", 12
    run = load_run(imported["hf-llama"])
    assert run.model_config.parts == ("llm",) and run.model_config.vision is None
    ids = run.text_prompt(prompt)  # the conversation template `generate --mode text` uses
    hf_model = transformers.LlamaForCausalLM.from_pretrained(sources["hf-llama"], attn_implementation="eager")
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n_new, do_sample=False, num_beams=1,
                                eos_token_id=run.specials.eos, pad_token_id=run.specials.pad,
                                output_scores=True, return_dict_in_generate=True)
    want = out.sequences[0, len(ids):].tolist()
    gaps = [float(torch.topk(s[0], 2).values.diff().abs()) for s in out.scores]
    assert min(gaps) > 1e-4, f"near-tied logits make greedy decoding ill-posed: {gaps}"  # fp32 logits agree to ~1e-6
    got = generate_text(run.model, run.params, [ids], max_new_tokens=n_new, stop_ids=[run.specials.eos],
                        mesh=run.mesh, rules=run.rules)[0]
    assert got == want
    cli("generate", "--checkpoint", imported["hf-llama"], "--prompt", prompt, "--mode", "text",
        "--max-new-tokens", n_new, "--out", tmp_path / "gen")
    text = json.loads((tmp_path / "gen" / "output.json").read_text())["text"]
    assert text == run.tokenizer.decode(want, skip_special_tokens=True).strip()
    # what an LLM-only checkpoint cannot do is one error line, not a traceback
    assert main(["generate", "--checkpoint", imported["hf-llama"], "--prompt", "a red circle", "--mode", "image",
                 "--out", str(tmp_path / "img")]) == 2


# ------------------------------------------------------------------------------------------------ config.init


def test_config_init_dreamllm_equals_import(sources, imported):
    from dreamjax.cli import load_config

    config = load_config(os.path.join(ROOT, "configs", "tiny.py"))
    config.train.precision = "fp32"
    config.tokenizer = None
    for section in ("llm", "vision"):  # the architecture comes from the release
        config.model[section] = {k: v for k, v in config.model[section].items()
                                 if k in ("scan_layers", "remat_policy")}
    config.model.unet = config.model.vae = config.model.schedule = None
    config.model.num_dream_queries = None
    config.data.resolution_in, config.data.resolution_out = RES_IN, RES_OUT
    config.init.dreamllm = sources["dreamllm"]
    run = new_run(config)
    ids = SpecialIds.from_tokenizer(released_tokenizer())
    assert run.specials == ids and ids.im_start == ids.pad + 1 and ids.dream_end == ids.pad + 2  # released order
    params = run.init_params(jax.random.PRNGKey(0))
    want = load_run(imported["dreamllm"]).params
    assert_same_tensors(flatten(jax.device_get(params)), flatten(jax.device_get(want)), "config.init.dreamllm")


# ------------------------------------------------------------------------------------------------ errors


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_safetensors(path, edit):
    sd = load_file(path)
    edit(sd)
    save_file(sd, path, metadata={"format": "pt"})


def _edit_bin(path, edit):
    sd = torch.load(path, weights_only=True)
    edit(sd)
    torch.save(sd, path)


ERRORS = {
    "missing weights file": ("hf-llama", lambda d: os.remove(os.path.join(d, "model.safetensors")),
                             "no weights file in"),
    "missing tokenizer": ("hf-llama", lambda d: [os.remove(os.path.join(d, f)) for f in os.listdir(d)
                                                 if f.startswith("tokenizer")], "could not load a tokenizer"),
    "missing plugin file": ("dreamllm", lambda d: os.remove(os.path.join(d, "dream_embedding.bin")),
                            "missing dream_embedding.bin"),
    "shape mismatch": ("hf-llama", lambda d: _edit_safetensors(
        os.path.join(d, "model.safetensors"), lambda sd: sd.update({"model.norm.weight": torch.zeros(63)})),
        "shape mismatch: model.norm.weight: (63,) in the file, (64,) in the model"),
    "unknown key": ("dreamllm", lambda d: _edit_bin(
        os.path.join(d, "stable_diffusion_head.bin"), lambda sd: sd.update({"unet.extra.weight": torch.zeros(2)})),
        "unexpected keys (no rule maps them): stable_diffusion_head.unet.extra.weight"),
    "unknown diffusers key": ("diffusers-sd", lambda d: _edit_safetensors(
        os.path.join(d, "vae", "diffusion_pytorch_model.safetensors"), lambda sd: sd.update({"foo": torch.zeros(1)})),
        "unexpected keys (no rule maps them): foo"),
}


def test_import_errors_are_one_line_through_the_cli(sources, tmp_path):
    """Each broken source is run through the real CLI in one subprocess per case: exit code 2, and stderr is
    exactly one line that names the problem (no traceback, no log lines)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("XLA_FLAGS", None)
    for case, (fmt, edit, needle) in ERRORS.items():
        src = _copy(sources[fmt], tmp_path / case.replace(" ", "_"))
        edit(str(src))
        proc = subprocess.run([sys.executable, "-m", "dreamjax.cli", "import", fmt, "--src", str(src), "--out",
                               str(tmp_path / f"out_{case.replace(' ', '_')}")],
                              capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (case, proc.returncode, proc.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("dreamjax import: error:"), (case, proc.stderr[-2000:])
        assert needle in lines[0], (case, lines[0])
