"""Pretrained weights through `config.init`: each named part is converted one tensor at a time and lands
directly on its devices with the sharding the run trains it with; parts not named keep their random init.

    config.init.llm               a transformers Llama directory (config.json, safetensors or .bin shards)
    config.init.clip              a transformers CLIP or CLIPVision directory (the vision tower is used)
    config.init.stable_diffusion  a diffusers Stable Diffusion directory (unet/, vae/, scheduler/)
    config.init.dream             a dreamjax workdir: dream queries, visual and condition projectors
                                  (stage 2 starting from stage 1)
    config.init.checkpoint        a dreamjax workdir: every part (stage 3 from stage 2, or a restart)
    config.init.dreamllm          the released DreamLLM layout (spec 5): every part (`run/release.py`)

The architecture of each part was already taken from the weights' own config (`run/model.py`), so the only
errors left here are the weights' own: missing, unexpected or misshapen keys, named with the part.

Memory: a part that `config.init` replaces whole is never randomly initialised (`covered_parts`), and a
stacked (scanned) leaf is filled on its devices one layer at a time, so the host holds the model once plus
about one layer, never a second copy (`dreamjax import` and `benchmarks/convert_memory.py` rely on this).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dreamjax.convert import diffusers as diffusers_names
from dreamjax.convert import dreamllm_release, hf
from dreamjax.convert.core import ConversionError, flatten
from dreamjax.convert.stream import SourceLeaf, TensorFiles, stream_to_flax
from dreamjax.models.dreamllm import DreamLLMConfig
from dreamjax.run import checkpoints
from dreamjax.run.model import init_paths, sd_component, workdir_of

log = logging.getLogger(__name__)

DREAM_PARTS = ("dream_queries", "visual_projector", "condition_projector")
# Leaves a pretrained file may have fewer rows of (the tokenizer's new special tokens): {path: axis}. The
# rows the file lacks take the leaf's random init, as upstream's `resize_token_embeddings`.
GROWABLE = {"llm/embed_tokens/embedding": 0, "llm/lm_head/kernel": 1}


class InitError(ValueError):
    """A `config.init` entry whose weights do not fit the model: names the part and the keys."""


def covered_parts(config, cfg: DreamLLMConfig) -> set[str]:
    """The parts `config.init` replaces whole: they need no random init."""
    paths = init_paths(config)
    covered: set[str] = set()
    if "checkpoint" in paths or "dreamllm" in paths:
        covered |= set(cfg.parts)
    if "dream" in paths:
        covered |= set(DREAM_PARTS)
    if "llm" in paths:
        covered.add("llm")
    if "clip" in paths:
        covered.add("vision")
    if "stable_diffusion" in paths:
        covered |= {"unet", "vae"}
    return covered & set(cfg.parts)


@functools.lru_cache(maxsize=32)
def _layer_setter(sharding):
    """buf[i] = x in place (buf donated), keeping buf's sharding."""
    return jax.jit(lambda buf, x, i: jax.lax.dynamic_update_index_in_dim(buf, x.astype(buf.dtype), i, 0),
                   donate_argnums=0, out_shardings=sharding)


def _zeros(shape, dtype, sharding) -> jax.Array:
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


def _placer(targets: Mapping[str, Any], random_leaf: Callable[[str], jax.Array], prefix: str,
            keep_file_dtype: bool):
    """place(path, SourceLeaf) -> a jax.Array with the shape and sharding of `targets[path]` (a
    ShapeDtypeStruct with `.sharding`, or an array), in its dtype or, with `keep_file_dtype`, the file's.

    A stacked leaf is filled on its devices layer by layer (a donated in-place update per layer). Rows the
    file lacks (see GROWABLE) come from `random_leaf(prefix + path)`, the leaf's random init, computed only
    when a file is short of rows.
    """

    def place(path: str, leaf: SourceLeaf) -> jax.Array:
        target = targets[path]
        dtype = leaf.dtype if keep_file_dtype else np.dtype(target.dtype)
        if leaf.layers is not None and leaf.shape == tuple(target.shape):
            buf = _zeros(target.shape, dtype, target.sharding)
            setter = _layer_setter(target.sharding)
            for i in range(leaf.layers):
                buf = setter(buf, leaf.read_layer(i), i)
                buf.block_until_ready()  # one layer in flight: the host never queues up the whole leaf
            return buf
        arr = leaf.read().astype(dtype, copy=False)
        if arr.shape != tuple(target.shape):
            axis = next(i for i, (a, b) in enumerate(zip(arr.shape, target.shape)) if a != b)
            index = tuple(slice(arr.shape[axis], None) if i == axis else slice(None) for i in range(arr.ndim))
            rest = np.asarray(jax.device_get(random_leaf(prefix + path)[index])).astype(dtype)
            arr = np.concatenate([arr, rest], axis=axis)
        out = jax.make_array_from_callback(tuple(target.shape), target.sharding, lambda index: arr[index])
        out.block_until_ready()
        return out

    return place


def _stream(part: str, files, rules, ignore, targets: Mapping[str, Any], random_leaf, *, prefix: str,
            keep_file_dtype: bool, may_grow=None, what: str, path: str) -> dict:
    try:
        place = _placer(flatten(targets), random_leaf, prefix, keep_file_dtype)
        return stream_to_flax(files, rules, targets, place, ignore=ignore, may_grow=may_grow,
                              what=f"{what} ({path}) -> {part}")
    except ConversionError as e:
        raise InitError(str(e)) from None


def _grow_map(prefix: str) -> dict[str, int]:
    return {p[len(prefix):]: ax for p, ax in GROWABLE.items() if p.startswith(prefix)}


def load_llm(path: str, cfg: DreamLLMConfig, target, random_leaf, keep_file_dtype=False) -> dict:
    ignore = hf.LLAMA_IGNORE + ((r"^lm_head\.weight$",) if cfg.llm.tie_word_embeddings else ())
    files = _files(path, "config.init.llm")
    return _stream("llm", files, hf.llama_rules(cfg.llm), ignore, target, random_leaf, prefix="llm/",
                   keep_file_dtype=keep_file_dtype, may_grow=_grow_map("llm/"), what="config.init.llm", path=path)


def load_clip(path: str, cfg: DreamLLMConfig, target, keep_file_dtype=False) -> dict:
    files = _files(path, "config.init.clip")
    try:
        prefix = hf.detect_clip_prefix(dict.fromkeys(files.keys()))
    except ConversionError as e:
        raise InitError(f"config.init.clip ({path}): {e}") from None
    full_clip = any(k.startswith("text_model.") for k in files.keys())
    ignore = hf.CLIP_IGNORE + (hf.CLIP_TEXT_KEYS if full_clip else ())
    return _stream("vision", files, hf.clip_vision_rules(cfg.vision, prefix), ignore, target, None,
                   prefix="vision/", keep_file_dtype=keep_file_dtype, what="config.init.clip", path=path)


def load_diffusers(kind: str, root: str, cfg: DreamLLMConfig, target, keep_file_dtype=False) -> dict:
    """`kind` "unet" or "vae" from a diffusers Stable Diffusion directory."""
    folder = sd_component(root, kind)
    rules = diffusers_names.unet_rules(cfg.unet) if kind == "unet" else diffusers_names.vae_rules(cfg.vae)
    return _stream(kind, _files(folder, "config.init.stable_diffusion"), rules, (), target, None, prefix=f"{kind}/",
                   keep_file_dtype=keep_file_dtype, what="config.init.stable_diffusion", path=folder)


def load_release(path: str, cfg: DreamLLMConfig, targets, random_leaf, keep_file_dtype=False) -> dict:
    """Every part from the released DreamLLM layout (four weight files, upstream's in-model names)."""
    try:
        files = dreamllm_release.release_files(path)
    except ConversionError as e:
        raise InitError(f"config.init.dreamllm: {e}") from None
    rules, ignore = dreamllm_release.release_rules(cfg)
    return _stream("every part", files, rules, ignore, targets, random_leaf, prefix="",
                   keep_file_dtype=keep_file_dtype, may_grow=GROWABLE, what="config.init.dreamllm", path=path)


def _files(path: str, what: str) -> TensorFiles:
    try:
        return TensorFiles(path, what)
    except ConversionError as e:
        raise InitError(str(e)) from None


def load_parts_from_checkpoint(workdir: str, targets: Mapping[str, Any], parts, what: str,
                               keep_saved_dtype: bool = False) -> dict:
    """Parts of a dreamjax checkpoint, restored straight onto the targets' shardings and cast to their dtypes
    (a bf16-stored frozen part into an fp32 run, say), or kept as saved."""
    target = {p: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), targets[p])
              for p in parts}
    try:
        restored, step = checkpoints.restore_params(checkpoints.checkpoints_dir(workdir), target, parts=parts,
                                                    what=what)
    except checkpoints.LayoutMismatch as e:
        raise InitError(str(e)) from None
    log.info("%s: parts %s from %s (step %d)", what, ", ".join(parts), workdir, step)
    if keep_saved_dtype:
        return {p: restored[p] for p in parts}
    return {p: jax.tree.map(lambda x, t: x.astype(t.dtype), restored[p], targets[p]) for p in parts}


def load_pretrained(config, cfg: DreamLLMConfig, params: dict, targets: Mapping[str, Any] | None = None, *,
                    random_leaf: Callable[[str], jax.Array] | None = None, keep_file_dtype: bool = False) -> dict:
    """`params` (placed on the mesh; the parts `covered_parts` names may be missing) with every part named in
    `config.init` replaced by its weights.

    targets: {part: tree of ShapeDtypeStructs with `.sharding`} for every part (default: `params`' own).
    random_leaf(path) -> the random init of one leaf ("llm/embed_tokens/embedding"), for the rows a
    pretrained file lacks (default: taken from `params`).
    keep_file_dtype: keep each tensor's dtype as the files hold it (`dreamjax import`: bit for bit), instead
    of casting to the model's parameter dtypes (training).
    """
    paths = init_paths(config)
    targets = dict(params if targets is None else targets)
    if random_leaf is None:
        flat = flatten(params)
        random_leaf = flat.__getitem__
    params = dict(params)
    keep = keep_file_dtype
    t0 = time.time()
    if "checkpoint" in paths:
        params.update(load_parts_from_checkpoint(workdir_of(paths["checkpoint"]), targets, list(targets),
                                                 "config.init.checkpoint", keep))
    if "dream" in paths:
        params.update(load_parts_from_checkpoint(workdir_of(paths["dream"]), targets, list(DREAM_PARTS),
                                                 "config.init.dream", keep))
    if "dreamllm" in paths:
        params.update(load_release(paths["dreamllm"], cfg, targets, random_leaf, keep))
    if "llm" in paths:
        params["llm"] = load_llm(paths["llm"], cfg, targets["llm"], random_leaf, keep)
    if "clip" in paths:
        params["vision"] = load_clip(paths["clip"], cfg, targets["vision"], keep)
    if "stable_diffusion" in paths:
        params["unet"] = load_diffusers("unet", paths["stable_diffusion"], cfg, targets["unet"], keep)
        if cfg.vae is not None:
            params["vae"] = load_diffusers("vae", paths["stable_diffusion"], cfg, targets["vae"], keep)
    if paths:
        log.info("pretrained weights: %s loaded in %.1f s", ", ".join(sorted(paths)), time.time() - t0)
    return params
