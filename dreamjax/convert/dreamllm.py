"""The whole DreamLLM (LLM + CLIP + projectors + dream queries + UNet + VAE) <-> one dreamjax tree.

Torch names follow upstream's in-model layout (`DreamLLMForCausalMLM.state_dict()`, spec 5.2):

    model.embed_tokens.* / model.layers.* / model.norm.* / lm_head.*      HF LlamaForCausalLM
    model.clip_vision_embedding.clip_vision_model.vision_model.*           CLIP vision tower
    model.clip_vision_embedding.projector.projector.{weight,bias}          visual projector [D, Dv], [D]
    model.dream_embedding.dream_queries                                    [1, Q, D]
    stable_diffusion_head.unet.* / stable_diffusion_head.vae.*             diffusers UNet / AutoencoderKL
    stable_diffusion_head.projector.projector.weight                       condition projector [C, D]

and the Flax tree is `DreamLLM`'s: llm/, vision/, visual_projector/, dream_queries [Q, D],
condition_projector/, unet/, vae/ (no vae/ when `cfg.vae is None`). The table is composed from the
per-model tables of `convert/hf.py` and `convert/diffusers.py`; the only tensor that is not a plain
copy or transpose is `dream_queries` (upstream keeps a leading batch axis of 1), handled here.
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


def dreamllm_rules(cfg: DreamLLMConfig) -> list[Rule]:
    """Upstream in-model state-dict names <-> `DreamLLM` parameter paths.

    `dream_queries` is listed for its name only: its shape differs ([1, Q, D] in torch, [Q, D] here),
    which `dreamllm_from_torch` / `dreamllm_to_torch` take care of.
    """
    rules = core.prefixed(llama_rules(cfg.llm), flax_prefix="llm")
    rules += core.prefixed(clip_vision_rules(cfg.vision, prefix=CLIP_PREFIX), flax_prefix="vision")
    rules += [
        Rule(VISUAL_PROJECTOR + "weight", "visual_projector/kernel", "kernel"),
        Rule(VISUAL_PROJECTOR + "bias", "visual_projector/bias"),
        Rule(DREAM_QUERIES, "dream_queries"),
        Rule(CONDITION_PROJECTOR, "condition_projector/kernel", "kernel"),
    ]
    rules += core.prefixed(unet_rules(cfg.unet), torch_prefix=SD_HEAD + "unet.", flax_prefix="unet")
    if cfg.vae is not None:
        rules += core.prefixed(vae_rules(cfg.vae), torch_prefix=SD_HEAD + "vae.", flax_prefix="vae")
    return rules


def dreamllm_ignore(cfg: DreamLLMConfig) -> tuple[str, ...]:
    """Torch keys dropped on purpose: non-persistent buffers older files still hold, and a tied head."""
    ignore = tuple(LLAMA_IGNORE) + tuple(CLIP_IGNORE)  # both match anywhere under a prefix
    if cfg.llm.tie_word_embeddings:
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
    q, d = cfg.num_dream_queries, cfg.llm.hidden_size
    if DREAM_QUERIES in sd:
        queries = core.to_numpy(sd[DREAM_QUERIES])
        if queries.shape != (1, q, d):
            raise ConversionError(f"DreamLLM state dict: {DREAM_QUERIES} has shape {tuple(queries.shape)}, "
                                  f"expected (1, {q}, {d})")
        sd[DREAM_QUERIES] = queries[0]
    return core.torch_to_flax(sd, dreamllm_rules(cfg), ignore=dreamllm_ignore(cfg),
                              expected=dreamllm_param_shapes(cfg), what="DreamLLM state dict")


def dreamllm_to_torch(params: Mapping[str, Any], cfg: DreamLLMConfig) -> dict[str, np.ndarray]:
    """`DreamLLM` params (plain or boxed) -> {upstream key: numpy array in torch layout}, dtypes kept."""
    params = nn.meta.unbox(params)
    if set(params) == {"params"}:
        params = params["params"]
    out = core.flax_to_torch(params, dreamllm_rules(cfg), what="DreamLLM params")
    if DREAM_QUERIES in out:
        out[DREAM_QUERIES] = out[DREAM_QUERIES][None]  # upstream's nn.Parameter is [1, Q, D]
    return out
