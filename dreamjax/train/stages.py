"""The training stages (spec 1.6): which parts of DreamLLM train, and the loss weights.

The parameter tree of `DreamLLM` has these top-level parts:
  llm (embed_tokens, layers, norm, lm_head), vision (CLIP ViT), visual_projector, dream_queries,
  condition_projector, unet, vae.
A stage names the parts that train; everything else is frozen: no gradient, no optimizer state.
`split_params` / `merge_params` cut the tree at those part names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from flax import traverse_util

PARTS = ("llm", "vision", "visual_projector", "dream_queries", "condition_projector", "unet", "vae")


@dataclasses.dataclass(frozen=True)
class Stage:
    trainable: tuple[str, ...]
    loss_weight_lm: float
    loss_weight_vm: float


STAGES: dict[str, Stage] = {
    # Stage I is two independent jobs upstream (projects/dreamllm/README.md).
    "stage1_creation": Stage(("dream_queries", "condition_projector"), 0.0, 1.0),
    "stage1_comprehension": Stage(("visual_projector",), 1.0, 0.0),
    "stage2": Stage(("llm", "visual_projector", "dream_queries", "condition_projector"), 1.0, 10.0),
    "stage3": Stage(("llm", "visual_projector", "dream_queries", "condition_projector"), 1.0, 10.0),
    # The built-in demo has no pretrained CLIP or diffusion model offline, so everything trains.
    "demo": Stage(("llm", "vision", "visual_projector", "dream_queries", "condition_projector", "unet", "vae"),
                  1.0, 10.0),
}


def _check_parts(parts) -> None:
    bad = set(parts) - set(PARTS)
    if bad:
        raise ValueError(f"unknown trainable parts {sorted(bad)}; parts are {PARTS}")


def check_model_parts(parts: tuple[str, ...]) -> None:
    """Training needs every part: its data feeds images in and asks for images out. A checkpoint with fewer
    parts (an imported LLM, CLIP or Stable Diffusion alone: `config.model.parts`) is for inference, export, or
    as one `config.init` entry of a full model."""
    missing = [p for p in PARTS if p not in parts and p != "vae"]  # no VAE: pixel-space diffusion
    if missing:
        raise ValueError(f"training needs the whole DreamLLM, but this model has only {', '.join(parts)} (no "
                         f"{', '.join(missing)}); start the missing towers from config.init.llm / clip / "
                         f"stable_diffusion")


def get_stage(name: str, trainable: tuple[str, ...] | None = None, loss_weights=None) -> Stage:
    """The named stage, optionally with other trainable parts and/or (lm, vm) loss weights."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose one of {sorted(STAGES)}")
    stage = STAGES[name]
    if trainable is not None:
        _check_parts(trainable)
        stage = dataclasses.replace(stage, trainable=tuple(trainable))
    if loss_weights is not None:
        lm, vm = loss_weights
        stage = dataclasses.replace(stage, loss_weight_lm=float(lm), loss_weight_vm=float(vm))
    return stage


def split_params(params: Mapping[str, Any], trainable: tuple[str, ...]) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts, split at the top-level part names."""
    _check_parts(trainable)
    flat = traverse_util.flatten_dict(dict(params))
    train = {k: v for k, v in flat.items() if k[0] in trainable}
    frozen = {k: v for k, v in flat.items() if k[0] not in trainable}
    return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen)


def merge_params(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict:
    """The inverse of `split_params`: one nested dict."""
    flat = traverse_util.flatten_dict(dict(frozen))
    flat.update(traverse_util.flatten_dict(dict(trainable)))
    return traverse_util.unflatten_dict(flat)
