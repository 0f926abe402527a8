"""The whole DreamLLM (LLM + CLIP + projectors + dream queries + UNet + VAE) <-> one dreamjax tree.

Torch names follow upstream's in-model layout (`DreamLLMForCausalMLM.state_dict()`, spec 5.2):

    model.embed_tokens.* / model.layers.* / model.norm.* / lm_head.*      HF LlamaForCausalLM
    model.clip_vision_embedding.clip_vision_model.vision_model.*           CLIP vision tower
    model.clip_vision_embedding.projector.projector.{weight,bias}          visual projector [D, Dv], [D]
    model.dream_embedding.dream_queries                                    [1, Q, D]
    stable_diffusion_head.unet.* / stable_diffusion_head.vae.*             diffusers UNet / AutoencoderKL
    stable_diffusion_head.projector.projector.weight                       condition projector [C, D]

and the Flax tree is `DreamLLM`'s: llm/, vision/, visual_projector/, dream_queries [Q, D],
condition_projector/, unet/, vae/ (no vae/ when `cfg.vae is None`; only the parts the model has, see
`DreamLLMConfig.parts`). The table is composed from the per-model tables of `convert/hf.py` and
`convert/diffusers.py`; the only tensor that is not a plain copy or transpose is `dream_queries` (upstream
keeps a leading batch axis of 1: a `squeeze0` rule).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from dreamjax.convert import core
from dreamjax.convert.core import ConversionError, Rule
from dreamjax.convert.diffusers import unet_rules, vae_rules
from dreamjax.convert.hf import CLIP_IGNORE, LLAMA_IGNORE, clip_vision_rules, llama_rules
from dreamjax.models import dreamllm
from dreamjax.models.dreamllm import DreamLLMConfig

CLIP_PREFIX = "model.clip_vision_embedding.clip_vision_model.vision_model."
VISUAL_PROJECTOR = "model.clip_vision_embedding.projector.projector."
DREAM_QUERIES = "model.dream_embedding.dream_queries"
SD_HEAD = "stable_diffusion_head."
CONDITION_PROJECTOR = "stable_diffusion_head.projector.projector.weight"


def part_rules(cfg: DreamLLMConfig, part: str) -> list[Rule]:
    """The rules of one top-level part (`DreamLLMConfig.parts`), torch names upstream's in-model ones."""
    if part == "llm":
        return core.prefixed(llama_rules(cfg.llm), flax_prefix="llm")
    if part == "vision":
        return core.prefixed(clip_vision_rules(cfg.vision, prefix=CLIP_PREFIX), flax_prefix="vision")
    if part == "visual_projector":
        return [Rule(VISUAL_PROJECTOR + "weight", "visual_projector/kernel", "kernel"),
                Rule(VISUAL_PROJECTOR + "bias", "visual_projector/bias")]
    if part == "dream_queries":  # [1, Q, D] upstream, [Q, D] here
        return [Rule(DREAM_QUERIES, "dream_queries", "squeeze0")]
    if part == "condition_projector":
        return [Rule(CONDITION_PROJECTOR, "condition_projector/kernel", "kernel")]
    if part == "unet":
        return core.prefixed(unet_rules(cfg.unet), torch_prefix=SD_HEAD + "unet.", flax_prefix="unet")
    if part == "vae":
        return core.prefixed(vae_rules(cfg.vae), torch_prefix=SD_HEAD + "vae.", flax_prefix="vae")
    raise ValueError(f"unknown DreamLLM part {part!r}")


def dreamllm_rules(cfg: DreamLLMConfig) -> list[Rule]:
    """Upstream in-model state-dict names <-> `DreamLLM` parameter paths, for every part the model has."""
    return [r for part in cfg.parts for r in part_rules(cfg, part)]


def dreamllm_ignore(cfg: DreamLLMConfig) -> tuple[str, ...]:
    """Torch keys dropped on purpose: non-persistent buffers older files still hold, and a tied head."""
    ignore = tuple(LLAMA_IGNORE) + tuple(CLIP_IGNORE)  # both match anywhere under a prefix
    if cfg.llm is not None and cfg.llm.tie_word_embeddings:
        ignore += (r"^lm_head\.weight$",)
    return ignore


@functools.lru_cache(maxsize=8)
def dreamllm_param_shapes(cfg: DreamLLMConfig) -> dict:
    """The model's parameter tree as ShapeDtypeStructs (nothing allocated; cached: tracing takes seconds).
    Do not mutate the returned dict."""
    model = dreamllm.DreamLLM(cfg)
    return nn.meta.unbox(jax.eval_shape(lambda: dreamllm.init_params(model, jax.random.key(0))))


def dreamllm_from_torch(state_dict: Mapping[str, Any], cfg: DreamLLMConfig) -> dict:
    """A full upstream-layout DreamLLM state dict (torch tensors or numpy) -> nested dict of numpy params.

    Raises `ConversionError` naming every unexpected, missing or misshapen key.
    """
    sd = dict(state_dict)
    if DREAM_QUERIES in sd and "dream_queries" in cfg.parts:
        q, d = cfg.num_dream_queries, cfg.llm.hidden_size
        shape = tuple(sd[DREAM_QUERIES].shape)
        if shape != (1, q, d):
            raise ConversionError(f"DreamLLM state dict: {DREAM_QUERIES} has shape {shape}, expected (1, {q}, {d})")
    return core.torch_to_flax(sd, dreamllm_rules(cfg), ignore=dreamllm_ignore(cfg),
                              expected=dreamllm_param_shapes(cfg), what="DreamLLM state dict")


def dreamllm_to_torch(params: Mapping[str, Any], cfg: DreamLLMConfig) -> dict[str, np.ndarray]:
    """`DreamLLM` params (plain or boxed) -> {upstream key: numpy array in torch layout}, dtypes kept."""
    params = nn.meta.unbox(params)
    if set(params) == {"params"}:
        params = params["params"]
    return core.flax_to_torch(params, dreamllm_rules(cfg), what="DreamLLM params")
