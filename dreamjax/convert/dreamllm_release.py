"""The released DreamLLM checkpoint layout (spec 5), read and written.

    config.json                DreamLLMConfig: LLaMA fields, `special_tokens2ids_dict`, `plugins_init_kwargs`
    pytorch_model.bin          the LLM, HF `LlamaForCausalLM` names (or model.safetensors / shards + index:
                               transformers' `from_pretrained` reads either, and export writes shards)
    clip_vision_embedding.bin  clip_vision_model.vision_model.* (CLIP ViT) + projector.projector.{weight,bias}
    dream_embedding.bin        dream_queries [1, Q, D]
    stable_diffusion_head.bin  vae.*, unet.* (diffusers names) + projector.projector.weight
    tokenizer files            tokenizer.model / tokenizer.json, tokenizer_config.json, special_tokens_map.json,
                               added_tokens.json

The three plugin files are each plugin module's `state_dict()`; under their in-model prefixes
(`PLUGINS`) they are the keys of `convert/dreamllm.py`. Upstream builds CLIP and Stable Diffusion from
`clip_vision_model_name_or_path` / `diffusion_name_or_path` before loading the plugin files over them, so
the architecture of those two towers is not in the release: a local directory of that name (absolute, or
relative to the release) gives it, else a known hub id (`KNOWN_CLIP`, `KNOWN_SD`), else the import fails
naming the field. Export writes the two towers as local directories next to the plugin files
(`clip_vision_model/`, `stable_diffusion/`, complete with weights, since SD 2.1 left the hub) and names
them there, so upstream loads the export with no download.

Unlike upstream, a missing plugin file is an error (upstream silently keeps random dream queries, and
downloads CLIP / SD weights it cannot find locally).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from dreamjax.convert import export_hf
from dreamjax.convert.core import ConversionError
from dreamjax.convert.dreamllm import dreamllm_ignore, dreamllm_rules
from dreamjax.convert.export import DEFAULT_SHARD_BYTES, Leaves, plan_export, write_safetensors, write_torch_bin
from dreamjax.convert.hf import read_hf_config
from dreamjax.convert.stream import MultiFiles, TensorFiles
from dreamjax.models.dreamllm import DreamLLMConfig

# plugin name -> (file, in-model key prefix, upstream class, parts it holds)
PLUGINS = {
    "clip_vision_embedding": ("clip_vision_embedding.bin", "model.clip_vision_embedding.", "CLIPVisionEmbedding",
                              ("vision", "visual_projector")),
    "dream_embedding": ("dream_embedding.bin", "model.dream_embedding.", "DreamEmbedding", ("dream_queries",)),
    "stable_diffusion_head": ("stable_diffusion_head.bin", "stable_diffusion_head.", "StableDiffusionHead",
                              ("unet", "vae", "condition_projector")),
}
PLUGIN_TYPES = {"clip_vision_embedding": "embedding", "dream_embedding": "embedding", "stable_diffusion_head": "head"}
PLUGIN_MODULE = "omni.models.dreamllm.modeling_plugins"
CLIP_DIR, SD_DIR = "clip_vision_model", "stable_diffusion"

# The towers the released checkpoints name (spec 1.1), so a release imports without their hub repositories.
KNOWN_CLIP = {
    "openai/clip-vit-large-patch14": {
        "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
        "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "num_channels": 3, "layer_norm_eps": 1e-5,
        "hidden_act": "quick_gelu", "projection_dim": 768,
    },
}
KNOWN_SD = {
    "stabilityai/stable-diffusion-2-1-base": {
        "unet": {
            "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20],
            "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 1024,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "downsample_padding": 1,
            "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
            "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
            "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4, "sample_size": 64,
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "use_linear_projection": True,
            "upcast_attention": False,  # the 768-px v-prediction 2.1 sets True; the 512-px base keeps the default
        },
        "vae": {
            "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
            "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
            "scaling_factor": 0.18215, "up_block_types": ["UpDecoderBlock2D"] * 4,
        },
        "scheduler": {
            "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon",
            "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
        },
    },
}


@dataclasses.dataclass(frozen=True)
class Release:
    """What a release directory says about the model (nothing read from the weight files yet)."""

    root: str
    llm: dict  # the LLaMA fields of config.json (a HF config dict)
    num_dream_queries: int
    select_layer: int
    clip: dict  # a HF CLIP(Vision) config dict
    unet: dict  # diffusers config dicts
    vae: dict
    scheduler: dict
    special_tokens: dict[str, int]  # token string -> id, from special_tokens2ids_dict


def _plugin_kwargs(config: Mapping, name: str, root: str) -> dict:
    kwargs = (config.get("plugins_init_kwargs") or {}).get(name)
    if not isinstance(kwargs, Mapping):
        raise ConversionError(f"DreamLLM release {root}: config.json has no plugins_init_kwargs.{name}")
    return dict(kwargs)


def _require(kwargs: Mapping, name: str, key: str, want: Any, default: Any, root: str) -> None:
    got = kwargs.get(key, default)
    if got != want:
        raise ConversionError(f"DreamLLM release {root}: plugins_init_kwargs.{name}.{key} = {got!r} is not "
                              f"supported (dreamjax implements {want!r})")


def _local_dir(name: str, root: str) -> str | None:
    """`name` as a local directory: absolute, relative to the release, or relative to the working directory."""
    for cand in ((name,) if os.path.isabs(name) else (os.path.join(root, name), name)):
        if os.path.isdir(cand):
            return cand
    return None


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{what}: {path} not found") from None
    except (OSError, ValueError) as e:
        raise ConversionError(f"{what}: cannot read {path}: {e}") from e


def _clip_config(name: str, root: str) -> dict:
    where = f"DreamLLM release {root}: plugins_init_kwargs.clip_vision_embedding.clip_vision_model_name_or_path"
    local = _local_dir(name, root)
    if local is not None:
        return _read_json(os.path.join(local, "config.json"), f"{where} = {name!r}")
    if name in KNOWN_CLIP:
        return dict(KNOWN_CLIP[name])
    raise ConversionError(f"{where} = {name!r} is neither a local directory nor a known model "
                          f"({', '.join(KNOWN_CLIP)}); point it at a local copy")


def _sd_configs(name: str, root: str) -> tuple[dict, dict, dict]:
    where = f"DreamLLM release {root}: plugins_init_kwargs.stable_diffusion_head.diffusion_name_or_path"
    local = _local_dir(name, root)
    if local is not None:
        return tuple(_read_json(os.path.join(local, sub, file), f"{where} = {name!r}")
                     for sub, file in (("unet", "config.json"), ("vae", "config.json"),
                                       ("scheduler", "scheduler_config.json")))
    if name in KNOWN_SD:
        known = KNOWN_SD[name]
        return dict(known["unet"]), dict(known["vae"]), dict(known["scheduler"])
    raise ConversionError(f"{where} = {name!r} is neither a local directory nor a known model "
                          f"({', '.join(KNOWN_SD)}); point it at a local copy")


def _flat_special_tokens(d: Mapping, root: str) -> dict[str, int]:
    out = {}
    for key, value in dict(d or {}).items():
        if isinstance(value, Mapping):
            out.update({str(k): int(v) for k, v in value.items()})
        elif isinstance(value, int):
            out[str(key)] = value
    if not out:
        raise ConversionError(f"DreamLLM release {root}: config.json has no special_tokens2ids_dict")
    return out


def read_release(root: str | os.PathLike) -> Release:
    """The model description of a release directory; every file it needs must exist."""
    root = os.fspath(root)
    config = read_hf_config(root)
    if config.get("model_type") != "dreamllm":
        raise ConversionError(f"{root}/config.json: model_type is {config.get('model_type')!r}, not 'dreamllm' "
                              f"(a released DreamLLM directory)")
    check_files(root)
    clip = _plugin_kwargs(config, "clip_vision_embedding", root)
    dream = _plugin_kwargs(config, "dream_embedding", root)
    head = _plugin_kwargs(config, "stable_diffusion_head", root)
    for key, want, default in (("projector_type", "linear", "linear"), ("projector_depth", 1, 1),
                               ("use_additional_post_layernorm", False, False)):
        _require(clip, "clip_vision_embedding", key, want, default, root)
    for key, want, default in (("projector_type", "linear", "linear"), ("projector_depth", 1, 1)):
        _require(head, "stable_diffusion_head", key, want, default, root)
    for name, kwargs, key in (("clip_vision_embedding", clip, "clip_vision_model_name_or_path"),
                              ("stable_diffusion_head", head, "diffusion_name_or_path")):
        if not kwargs.get(key):
            raise ConversionError(f"DreamLLM release {root}: plugins_init_kwargs.{name}.{key} is not set")
    unet, vae, scheduler = _sd_configs(head["diffusion_name_or_path"], root)
    llm = {k: v for k, v in config.items() if k not in ("plugins_init_kwargs", "special_tokens2ids_dict")}
    return Release(root=root, llm=llm, num_dream_queries=int(dream.get("num_dream_queries", 64)),
                   select_layer=int(clip.get("select_layer", -2)),
                   clip=_clip_config(clip["clip_vision_model_name_or_path"], root), unet=unet, vae=vae,
                   scheduler=scheduler,
                   special_tokens=_flat_special_tokens(config.get("special_tokens2ids_dict"), root))


def check_files(root: str) -> None:
    """Every weight file of the layout is there (a missing plugin file is an error, unlike upstream)."""
    names = set(os.listdir(root))
    missing = [file for file, *_ in PLUGINS.values() if file not in names]
    if missing:
        raise ConversionError(f"DreamLLM release {root}: missing {', '.join(missing)}")
    TensorFiles(root, f"DreamLLM release {root} (the LLM)")  # raises naming what it looked for


def release_files(root: str) -> MultiFiles:
    """Every tensor of the release under its in-model name (`convert/dreamllm.py`'s keys)."""
    check_files(root)
    what = f"DreamLLM release {root}"
    parts = [("", TensorFiles(root, f"{what} (the LLM)"))]
    parts += [(prefix, TensorFiles(os.path.join(root, file), what)) for file, prefix, _, _ in PLUGINS.values()]
    return MultiFiles(parts, what)


def release_rules(cfg: DreamLLMConfig):
    """(rules, ignore) for `stream.stream_to_flax` over `release_files`."""
    return dreamllm_rules(cfg), dreamllm_ignore(cfg)


# ----------------------------------------------------------------------------- export


def release_config(cfg: DreamLLMConfig, *, special_tokens2ids: Mapping, bos: int, eos: int, pad: int, dtype: str,
                   loss_weights: tuple[float, float] = (1.0, 10.0), clip_name: str = CLIP_DIR,
                   sd_name: str = SD_DIR, resolution: int | None = None) -> dict:
    """config.json as upstream's `DreamLLMConfig` writes it (spec 5.3), with the token ids of `tokenizer`
    (not the release's inherited bos 0 / eos 1 / pad -1 quirk)."""
    config = cfg.llm.to_hf_dict()
    config.update(
        architectures=["DreamLLMForCausalMLM"], model_type="dreamllm", torch_dtype=dtype, dtype=dtype,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, use_cache=True, pretraining_tp=1,
        max_sequence_length=cfg.llm.max_position_embeddings, special_tokens2ids_dict=dict(special_tokens2ids),
        loss_weight_lm=float(loss_weights[0]), loss_weight_vm=float(loss_weights[1]), loss_scale_schedule="none",
        log_attentions=False, log_hidden_states=False, plugins_type=dict(PLUGIN_TYPES),
    )
    d = cfg.llm.hidden_size
    config["plugins_init_kwargs"] = {
        "clip_vision_embedding": {
            "_target_": f"{PLUGIN_MODULE}.CLIPVisionEmbedding", "clip_vision_model_name_or_path": clip_name,
            "projector_type": "linear", "projector_depth": 1, "projector_name_or_path": None,
            "pretrained_model_name_or_path": None, "use_additional_post_layernorm": False,
            "select_layer": cfg.select_layer, "embed_hidden_size": d, "freeze_clip_vision_model": True,
            "freeze_embedding_layers": True, "freeze_projector": False, "local_files_only": True,
        },
        "dream_embedding": {
            "_target_": f"{PLUGIN_MODULE}.DreamEmbedding", "pretrained_model_name_or_path": None,
            "num_dream_queries": cfg.num_dream_queries, "embed_hidden_size": d, "freeze_dream_queries": False,
        },
        "stable_diffusion_head": {
            "_target_": f"{PLUGIN_MODULE}.StableDiffusionHead", "diffusion_name_or_path": sd_name,
            "projector_type": "linear", "projector_depth": 1, "projector_name_or_path": None,
            "pretrained_model_name_or_path": None, "embed_hidden_size": d, "drop_prob": None, "noise_offset": 0.0,
            "input_perturbation": 0.0, "snr_gamma": None,
            "resolution": resolution or cfg.unet.sample_size * cfg.vae.downsample_factor,
            "center_crop": True, "random_flip": True, "freeze_vae": True, "freeze_unet": True,
            "freeze_projector": False, "local_files_only": True,
        },
    }
    return config


def export_release(cfg: DreamLLMConfig, leaves: Leaves, out: str, *, tokenizer, special_tokens2ids: Mapping,
                   special_ids: Mapping[str, int], schedule: Mapping[str, Any],
                   loss_weights: tuple[float, float] = (1.0, 10.0),
                   max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """Write the release layout: the LLM as safetensors shards (streamed), each plugin file as a torch
    pickle (held one file at a time: upstream `torch.load`s them), config.json, the tokenizer (with
    added_tokens.json), and the CLIP / SD towers as the local directories the config names."""
    missing = [p for p in ("llm", "vision", "visual_projector", "dream_queries", "condition_projector", "unet",
                           "vae") if p not in cfg.parts]
    if missing:  # upstream's plugins always build all of them (its StableDiffusionHead loads a VAE)
        raise ConversionError(f"the released DreamLLM layout needs every part; this checkpoint lacks "
                              f"{', '.join(missing)} (export it with `export hf` instead)")
    os.makedirs(out, exist_ok=True)
    plan = plan_export(leaves.specs(), dreamllm_rules(cfg), what="DreamLLM params")
    by_part: dict[str, list] = {}
    for leaf in plan:
        by_part.setdefault(leaf.path.split("/")[0], []).append(leaf)
    files = write_safetensors(by_part["llm"], leaves, out, name="model", max_shard_bytes=max_shard_bytes)
    for file, prefix, _, parts in PLUGINS.values():
        chosen = [leaf for p in parts for leaf in by_part.get(p, [])]
        files.append(write_torch_bin(chosen, leaves, os.path.join(out, file), strip_prefix=prefix))
    dtype = by_part["llm"][0].dtype.name
    config = release_config(cfg, special_tokens2ids=special_tokens2ids, bos=special_ids["bos"],
                            eos=special_ids["eos"], pad=special_ids["pad"], dtype=dtype, loss_weights=loss_weights)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    files.append(os.path.join(out, "config.json"))
    tokenizer.save_pretrained(out)
    # the release lists the pad token and the seven DreamLLM tokens with their ids (spec 1.2)
    added = {t: int(i) for t, i in special_tokens2ids.get("additional_special_tokens", {}).items()}
    added.update({t: int(i) for t, i in special_tokens2ids.items() if i == special_ids["pad"]})
    with open(os.path.join(out, "added_tokens.json"), "w") as f:
        json.dump(dict(sorted(added.items(), key=lambda kv: kv[1])), f, indent=2)
    # The two towers upstream builds before loading the plugin files over them.
    files += export_hf.write_vision(cfg, leaves, os.path.join(out, CLIP_DIR), max_shard_bytes=max_shard_bytes)
    sd = os.path.join(out, SD_DIR)
    for kind in ("unet", "vae"):
        files += export_hf.write_diffusers(kind, cfg, leaves, os.path.join(sd, kind), max_shard_bytes=max_shard_bytes)
    files.append(export_hf.write_scheduler(schedule, os.path.join(sd, "scheduler")))
    return files
