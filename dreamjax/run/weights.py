"""Pretrained weights through `config.init`: each named part is converted one tensor at a time and lands
directly on its devices with the sharding the run trains it with; parts not named keep their random init.

    config.init.llm               a transformers Llama directory (config.json, safetensors or .bin shards)
    config.init.clip              a transformers CLIP or CLIPVision directory (the vision tower is used)
    config.init.stable_diffusion  a diffusers Stable Diffusion directory (unet/, vae/, scheduler/)
    config.init.dream             a dreamjax workdir: dream queries, visual and condition projectors
                                  (stage 2 starting from stage 1)
    config.init.checkpoint        a dreamjax workdir: every part (stage 3 from stage 2, or a restart)

The architecture of each part was already taken from the weights' own config (`run/model.py`), so the only
errors left here are the weights' own: missing, unexpected or misshapen keys, named with the part.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from dreamjax.convert import diffusers as diffusers_names
from dreamjax.convert import hf
from dreamjax.convert.core import ConversionError, flatten
from dreamjax.convert.stream import TensorFiles, stream_to_flax
from dreamjax.models.dreamllm import DreamLLMConfig
from dreamjax.run import checkpoints
from dreamjax.run.model import init_paths, sd_component, workdir_of

log = logging.getLogger(__name__)

DREAM_PARTS = ("dream_queries", "visual_projector", "condition_projector")


class InitError(ValueError):
    """A `config.init` entry whose weights do not fit the model: names the part and the keys."""


def _placer(current: Mapping[str, Any], grow_fill: bool = False):
    """place(path, host array) -> a jax.Array with the dtype and sharding of the current leaf at `path`.

    Rows the file lacks (new special tokens: the file's vocabulary is smaller than the tokenizer's) keep
    the current leaf's random init, as upstream's `resize_token_embeddings`.
    """
    flat = flatten(current)

    def place(path: str, arr: np.ndarray) -> jax.Array:
        leaf = flat[path]
        arr = arr.astype(leaf.dtype, copy=False)
        if arr.shape != leaf.shape:
            axis = next(i for i, (a, b) in enumerate(zip(arr.shape, leaf.shape)) if a != b)
            index = tuple(slice(arr.shape[axis], None) if i == axis else slice(None) for i in range(arr.ndim))
            arr = np.concatenate([arr, np.asarray(jax.device_get(leaf[index]))], axis=axis)
        return jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda index: arr[index])

    return place


def _stream(part: str, path: str, rules, ignore, current: Mapping[str, Any], *, may_grow=None,
            what: str) -> dict:
    files = TensorFiles(path, what)
    try:
        return stream_to_flax(files, rules, current, _placer(current), ignore=ignore, may_grow=may_grow,
                              what=f"{what} ({path}) -> {part}")
    except ConversionError as e:
        raise InitError(str(e)) from None


def load_llm(path: str, cfg: DreamLLMConfig, current: Mapping[str, Any]) -> dict:
    ignore = hf.LLAMA_IGNORE + ((r"^lm_head\.weight$",) if cfg.llm.tie_word_embeddings else ())
    grow = {"embed_tokens/embedding": 0, "lm_head/kernel": 1}  # the tokenizer's new special tokens
    return _stream("llm", path, hf.llama_rules(cfg.llm), ignore, current, may_grow=grow, what="config.init.llm")


def load_clip(path: str, cfg: DreamLLMConfig, current: Mapping[str, Any]) -> dict:
    files = TensorFiles(path, "config.init.clip")
    try:
        prefix = hf.detect_clip_prefix(dict.fromkeys(files.keys()))
    except ConversionError as e:
        raise InitError(f"config.init.clip ({path}): {e}") from None
    full_clip = any(k.startswith("text_model.") for k in files.keys())
    ignore = hf.CLIP_IGNORE + (hf.CLIP_TEXT_KEYS if full_clip else ())
    return _stream("vision", path, hf.clip_vision_rules(cfg.vision, prefix), ignore, current,
                   what="config.init.clip")


def load_unet(root: str, cfg: DreamLLMConfig, current: Mapping[str, Any]) -> dict:
    return _stream("unet", sd_component(root, "unet"), diffusers_names.unet_rules(cfg.unet), (), current,
                   what="config.init.stable_diffusion")


def load_vae(root: str, cfg: DreamLLMConfig, current: Mapping[str, Any]) -> dict:
    return _stream("vae", sd_component(root, "vae"), diffusers_names.vae_rules(cfg.vae), (), current,
                   what="config.init.stable_diffusion")


def load_parts_from_checkpoint(workdir: str, current: Mapping[str, Any], parts, what: str) -> dict:
    """Parts of a dreamjax checkpoint, restored straight onto the current leaves' shardings and cast to
    their dtypes (a bf16-stored frozen part into an fp32 run, say)."""
    target = {p: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), current[p])
              for p in parts}
    try:
        restored, step = checkpoints.restore_params(checkpoints.checkpoints_dir(workdir), target, parts=parts,
                                                    what=what)
    except checkpoints.LayoutMismatch as e:
        raise InitError(str(e)) from None
    log.info("%s: parts %s from %s (step %d)", what, ", ".join(parts), workdir, step)
    return {p: jax.tree.map(lambda x, t: x.astype(t.dtype), restored[p], current[p]) for p in parts}


def load_pretrained(config, cfg: DreamLLMConfig, params: dict) -> dict:
    """`params` (placed on the mesh) with every part named in `config.init` replaced by its weights."""
    paths = init_paths(config)
    params = dict(params)
    t0 = time.time()
    if "checkpoint" in paths:
        params.update(load_parts_from_checkpoint(workdir_of(paths["checkpoint"]), params, list(params),
                                                 "config.init.checkpoint"))
    if "dream" in paths:
        params.update(load_parts_from_checkpoint(workdir_of(paths["dream"]), params, list(DREAM_PARTS),
                                                 "config.init.dream"))
    if "llm" in paths:
        params["llm"] = load_llm(paths["llm"], cfg, params["llm"])
    if "clip" in paths:
        params["vision"] = load_clip(paths["clip"], cfg, params["vision"])
    if "stable_diffusion" in paths:
        params["unet"] = load_unet(paths["stable_diffusion"], cfg, params["unet"])
        if cfg.vae is not None:
            params["vae"] = load_vae(paths["stable_diffusion"], cfg, params["vae"])
    if paths:
        log.info("pretrained weights: %s loaded in %.1f s", ", ".join(sorted(paths)), time.time() - t0)
    return params
