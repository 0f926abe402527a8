"""Config -> tokenizer, model and schedule, with the architecture of every pretrained part read from the
weights' own config files (`config.init`), so a run config may leave those fields out.

Resolution rules (one place for all of them):
- `config.init.llm` (a transformers Llama directory): `model.llm`'s architecture fields come from its
  config.json; `config.init.clip`: `model.vision` from the CLIP config.json (its vision part);
  `config.init.stable_diffusion`: `model.unet`, `model.vae` and `model.schedule` from `unet/`, `vae/` and
  `scheduler/`; `config.init.checkpoint` (a dreamjax workdir): every model section from its config.json.
- A field the run config leaves out (absent or None) takes the weights' value; a field it sets to the
  weights' value is fine; any other value is one `ValueError` naming the field and both values.
- JAX-only fields (scan_layers, remat_policy, attention_impl, initializer_range for new rows, ...) are the
  run's. The resolved config is what the workdir's config.json records, so a trained run needs no
  pretrained directory to be loaded again.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
from ml_collections import ConfigDict

from dreamjax.convert.core import ConversionError
from dreamjax.convert.hf import read_hf_config
from dreamjax.data.synthetic import world_from_config
from dreamjax.data.tokenizer import SpecialIds, build_word_tokenizer, load_tokenizer
from dreamjax.diffusion.schedule import Schedule, ScheduleConfig
from dreamjax.models.clip_vision import ClipVisionConfig
from dreamjax.models.dreamllm import DreamLLM, SpecialTokenIds, build_config, model_towers
from dreamjax.models.llama import LlamaConfig
from dreamjax.models.unet import UNetConfig
from dreamjax.models.vae import VAEConfig
from dreamjax.run import checkpoints, release

PRECISIONS = {  # name -> (compute dtype, trainable param dtype, frozen param dtype)
    "fp32": (jnp.float32, jnp.float32, jnp.float32),
    "bf16": (jnp.bfloat16, jnp.float32, jnp.bfloat16),  # fp32 master weights, bf16 compute
    "pure_bf16": (jnp.bfloat16, jnp.bfloat16, jnp.bfloat16),  # upstream: everything bf16, no master copy
}
INIT_KEYS = ("llm", "clip", "stable_diffusion", "dream", "checkpoint", "dreamllm")
INIT_TOWERS = {"llm": "llm", "clip": "vision", "stable_diffusion": "unet"}  # the tower each entry needs

# Fields that shape the weights or the forward numerics; the rest of each config is the run's choice.
LLM_ARCH = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings", "max_position_embeddings")
VISION_ARCH = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "image_size", "patch_size",
               "num_channels", "layer_norm_eps", "hidden_act")
UNET_JAX_ONLY = ("remat", "attention_impl", "attention_chunk")


def precision(config: ConfigDict) -> tuple[Any, Any, Any]:
    name = config.train.precision
    if name not in PRECISIONS:
        raise ValueError(f"config.train.precision must be one of {sorted(PRECISIONS)}, got {name!r}")
    return PRECISIONS[name]


def init_paths(config: ConfigDict) -> dict[str, str]:
    """The `config.init` entries that are set, validated: {key: absolute path}."""
    init = dict(config.get("init") or {})
    unknown = set(init) - set(INIT_KEYS)
    if unknown:
        raise ValueError(f"config.init: unknown keys {sorted(unknown)}; known: {list(INIT_KEYS)}")
    out = {}
    for key, path in init.items():
        if path in (None, ""):
            continue
        if not isinstance(path, str):
            raise ValueError(f"config.init.{key} must be a local path, got {path!r}")
        if not os.path.exists(path):
            raise FileNotFoundError(f"config.init.{key}: path does not exist: {path}")
        out[key] = os.path.abspath(path)
    if "dreamllm" in out and len(out) > 1:
        others = ", ".join(f"config.init.{k}" for k in sorted(out) if k != "dreamllm")
        raise ValueError(f"config.init.dreamllm already holds every part; drop {others}")
    towers = model_towers(config.model.to_dict())
    for key, tower in INIT_TOWERS.items():
        if key in out and tower not in towers:
            raise ValueError(f"config.init.{key} is set but config.model.parts {list(towers)} has no {tower}")
    if "checkpoint" in out and "dream" in out:
        raise ValueError("config.init.checkpoint already holds the dream queries and projectors; "
                         "drop config.init.dream")
    return out


def workdir_of(path: str) -> str:
    """A dreamjax workdir from itself or its checkpoints/ folder."""
    path = os.path.abspath(path)
    if os.path.basename(path) == "checkpoints" and os.path.isfile(checkpoints.config_path(os.path.dirname(path))):
        return os.path.dirname(path)
    return path


def read_workdir_config(workdir: str) -> ConfigDict:
    with open(checkpoints.require(checkpoints.config_path(workdir), "resolved config")) as f:
        return ConfigDict(json.load(f))


# ------------------------------------------------------------------------------------------------ tokenizer


def build_tokenizer(config: ConfigDict):
    """`config.tokenizer`: "synthetic" (the shapes world's word tokenizer), a local HF tokenizer directory,
    or None: the tokenizer of `config.init.checkpoint`, `config.init.dreamllm` or `config.init.llm`.
    A model without an LLM (`config.model.parts`) has no tokenizer: None."""
    if "llm" not in model_towers(config.model.to_dict()):
        return None
    tok = config.tokenizer
    if tok == "synthetic":
        return build_word_tokenizer(world_from_config(config.data).vocabulary())
    if tok is None:
        paths = init_paths(config)
        if "checkpoint" in paths:
            tok = checkpoints.tokenizer_dir(workdir_of(paths["checkpoint"]))
        elif "dreamllm" in paths:
            return release.load_tokenizer(paths["dreamllm"])
        elif "llm" in paths:
            tok = paths["llm"]
        else:
            raise ValueError("config.tokenizer is None: set it to a tokenizer directory (or 'synthetic'), or "
                             "set config.init.llm to a directory that holds one")
    return load_tokenizer(tok)


# ------------------------------------------------------------------------------------------------ resolution


def _given(section: Any) -> dict:
    return {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in dict(section or {}).items()
            if v is not None}


def _norm(v: Any) -> Any:
    if isinstance(v, list | tuple):
        return [_norm(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _norm(x) for k, x in v.items()}
    return v


def _contradiction(section: str, key: str, ours: Any, theirs: Any, source: str) -> ValueError:
    return ValueError(f"config.model.{section}.{key} = {ours!r} contradicts the weights: {source} has "
                      f"{key} = {theirs!r} (leave the field out or set it to None to take the weights' value)")


def _merge_dataclass(section: str, ours: dict, theirs: Any, arch: tuple[str, ...], source: str) -> dict:
    """Run section (dataclass field names) + the weights' config object -> the resolved section."""
    names = {f.name for f in dataclasses.fields(theirs)}
    unknown = set(ours) - names
    if unknown:
        raise ValueError(f"config.model.{section}: unknown keys {sorted(unknown)}")
    for key in arch:
        if key in ours and _norm(ours[key]) != _norm(getattr(theirs, key)):
            raise _contradiction(section, key, ours[key], getattr(theirs, key), source)
    resolved = {k: _norm(getattr(theirs, k)) for k in arch}
    resolved.update({k: v for k, v in ours.items() if k not in arch})
    return resolved


def _merge_diffusers(section: str, ours: dict, theirs: dict, build: Callable[[dict], Any], source: str,
                     jax_only: tuple[str, ...] = ()) -> dict:
    """Run section and weights' config.json, both diffusers dicts: a key of ours that changes the built
    config is a contradiction. JAX-only keys are the run's."""
    base = build(theirs)
    for key, value in ours.items():
        if key in jax_only or key.startswith("_"):
            continue
        try:
            changed = build({**theirs, key: value}) != base
        except (TypeError, ValueError):
            changed = True
        if changed:
            raise _contradiction(section, key, value, theirs.get(key, "<diffusers default>"), source)
    resolved = {k: v for k, v in theirs.items() if not k.startswith("_")}
    resolved.update({k: v for k, v in ours.items() if k in jax_only})
    return resolved


def _read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: {path} not found")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{what}: cannot read {path}: {e}") from e


def sd_component(root: str, name: str) -> str:
    """The `unet` / `vae` / `scheduler` folder of a diffusers Stable Diffusion directory."""
    path = os.path.join(root, name)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"config.init.stable_diffusion: no {name}/ folder in {root} (a diffusers Stable "
                                f"Diffusion directory has unet/, vae/ and scheduler/)")
    return path


def _diffusers_unet(d: dict) -> UNetConfig:
    return UNetConfig.from_diffusers(d)


def _diffusers_vae(d: dict) -> VAEConfig:
    return VAEConfig.from_diffusers(d)


def resolve_config(config: ConfigDict) -> ConfigDict:
    """A copy of `config` whose model sections carry the architecture of every pretrained part it names."""
    paths = init_paths(config)
    config = ConfigDict(config.to_dict())  # a resolved, unlocked copy
    model = config.model
    try:
        if "checkpoint" in paths:
            _resolve_from_workdir(model, workdir_of(paths["checkpoint"]))
        if "dreamllm" in paths:
            _resolve_from_release(model, paths["dreamllm"])
        if "llm" in paths:
            source = os.path.join(paths["llm"], "config.json")
            theirs = LlamaConfig.from_hf(read_hf_config(paths["llm"]))
            llm = _merge_dataclass("llm", _given(model.llm), theirs, LLM_ARCH, source)
            llm["vocab_size"] = theirs.vocab_size
            model.llm = ConfigDict(llm)
        if "clip" in paths:
            source = os.path.join(paths["clip"], "config.json")
            theirs = ClipVisionConfig.from_hf(read_hf_config(paths["clip"]))
            model.vision = ConfigDict(_merge_dataclass("vision", _given(model.vision), theirs, VISION_ARCH, source))
        if "stable_diffusion" in paths:
            root = paths["stable_diffusion"]
            for section, folder, file, build, jax_only in (
                ("unet", "unet", "config.json", _diffusers_unet, UNET_JAX_ONLY),
                ("vae", "vae", "config.json", _diffusers_vae, ()),
                ("schedule", "scheduler", "scheduler_config.json", ScheduleConfig.from_diffusers, ()),
            ):
                source = os.path.join(sd_component(root, folder), file)
                theirs = _read_json(source, "config.init.stable_diffusion")
                merged = _merge_diffusers(section, _given(model.get(section)), theirs, build, source, jax_only)
                model[section] = ConfigDict(merged)
    except ConversionError as e:
        raise ValueError(str(e)) from None
    return config


def _resolve_from_release(model: ConfigDict, path: str) -> None:
    rel, llm, vision = release.model_configs(path)
    source = os.path.join(path, "config.json")
    for key, value in (("num_dream_queries", rel.num_dream_queries), ("select_layer", rel.select_layer)):
        if model.get(key) is not None and model[key] != value:
            raise ValueError(f"config.model.{key} = {model[key]!r} contradicts the weights: {source} has {value!r}")
        model[key] = value
    resolved = _merge_dataclass("llm", _given(model.llm), llm, LLM_ARCH, source)
    resolved["vocab_size"] = llm.vocab_size
    model.llm = ConfigDict(resolved)
    model.vision = ConfigDict(_merge_dataclass("vision", _given(model.vision), vision, VISION_ARCH,
                                               f"{source} (its CLIP)"))
    for section, theirs, build, jax_only in (("unet", rel.unet, _diffusers_unet, UNET_JAX_ONLY),
                                             ("vae", rel.vae, _diffusers_vae, ()),
                                             ("schedule", rel.scheduler, ScheduleConfig.from_diffusers, ())):
        model[section] = ConfigDict(_merge_diffusers(section, _given(model.get(section)), theirs, build,
                                                     f"{source} (its Stable Diffusion)", jax_only))


def _resolve_from_workdir(model: ConfigDict, workdir: str) -> None:
    source = checkpoints.config_path(workdir)
    theirs = read_workdir_config(workdir).model
    ours_towers, their_towers = model_towers(model.to_dict()), model_towers(theirs.to_dict())
    if set(ours_towers) - set(their_towers):
        raise ValueError(f"config.init.checkpoint: {workdir} has only the towers {list(their_towers)}, this "
                         f"config asks for {list(ours_towers)} (set config.model.parts, or start the other "
                         f"towers from config.init.llm / clip / stable_diffusion in a run of their own)")
    for key in ("num_dream_queries", "select_layer"):
        ours, value = model.get(key), theirs.get(key)
        if ours is not None and value is not None and ours != value:
            raise ValueError(f"config.model.{key} = {ours!r} contradicts the weights: {source} has {value!r}")
        if value is not None:
            model[key] = value
    if "llm" in ours_towers:
        llm = _given(model.llm)
        for key, value in _given(theirs.llm).items():
            if key in LLM_ARCH + ("vocab_size",) and key in llm and _norm(llm[key]) != _norm(value):
                raise _contradiction("llm", key, llm[key], value, source)
            if key in LLM_ARCH + ("vocab_size",):
                llm[key] = value
        model.llm = ConfigDict(llm)
    if "vision" in ours_towers:
        vision = _given(model.vision)
        for key, value in _given(theirs.vision).items():
            if key in VISION_ARCH and key in vision and _norm(vision[key]) != _norm(value):
                raise _contradiction("vision", key, vision[key], value, source)
            vision.setdefault(key, value)
        model.vision = ConfigDict(vision)
    for section, build, jax_only in (("unet", _diffusers_unet, UNET_JAX_ONLY), ("vae", _diffusers_vae, ()),
                                     ("schedule", ScheduleConfig.from_diffusers, ())):
        if section in ("unet", "vae") and "unet" not in ours_towers:
            continue
        if theirs.get(section) is None:  # only the VAE may be absent (pixel-space diffusion)
            if _given(model.get(section)):
                raise _contradiction(section, section, "a config", None, source)
            model[section] = None
            continue
        merged = _merge_diffusers(section, _given(model.get(section)), _given(theirs[section]), build, source,
                                  jax_only)
        model[section] = ConfigDict(merged)


# ------------------------------------------------------------------------------------------------ model


def build_model(config: ConfigDict, tokenizer, *, compute_dtype=None) -> tuple[DreamLLM, Schedule]:
    """DreamLLM and its noise schedule from a *resolved* config (see `resolve_config`) and the tokenizer
    (None for a model without an LLM).

    The vocabulary is the tokenizer's, or the pretrained LLM's when that is larger (upstream resizes the
    embeddings only when the tokenizer outgrows them).
    """
    compute, _, _ = precision(config)
    compute = compute if compute_dtype is None else compute_dtype
    model_section = config.model.to_dict()
    towers = model_towers(model_section)
    tokens, vocab = None, None
    if "llm" in towers:
        if tokenizer is None:
            raise ValueError("a model with an LLM needs a tokenizer")
        tokens = SpecialTokenIds.from_ids(SpecialIds.from_tokenizer(tokenizer))
        llm = {k: v for k, v in dict(model_section["llm"]).items() if v is not None}
        vocab = max(len(tokenizer), int(llm.pop("vocab_size", 0) or 0))
        model_section["llm"] = llm
    unet = dict(model_section.get("unet") or {})
    unet_overrides = {k: unet.pop(k) for k in UNET_JAX_ONLY if k in unet}
    model_section["unet"] = unet
    model_cfg = build_config(model_section, vocab_size=vocab, tokens=tokens, dtype=compute)
    if unet_overrides and model_cfg.unet is not None:
        model_cfg = dataclasses.replace(model_cfg, unet=dataclasses.replace(model_cfg.unet, **unet_overrides))
    if model_cfg.unet is not None and model_cfg.vae is None and \
            model_cfg.unet.sample_size != int(config.data.resolution_out):
        raise ValueError(f"pixel-space diffusion (model.vae=None) needs model.unet.sample_size "
                         f"({model_cfg.unet.sample_size}) == data.resolution_out ({config.data.resolution_out})")
    if model_cfg.vision is not None and model_cfg.vision.image_size != int(config.data.resolution_in):
        raise ValueError(f"data.resolution_in ({config.data.resolution_in}) must equal the vision tower's "
                         f"image_size ({model_cfg.vision.image_size})")
    schedule = Schedule.create(ScheduleConfig.from_diffusers(dict(config.model.schedule)))
    return DreamLLM(model_cfg), schedule
