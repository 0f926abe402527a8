"""Stages (which parts train, loss weights; spec 1.6) and the optimizer over the trainable parts.

The parameter tree of `DreamLLM` has these top-level parts:
  llm (embed_tokens, layers, norm, lm_head), vision (CLIP ViT), visual_projector, dream_queries,
  condition_projector, unet, vae.
A stage names the parts that train; everything else is frozen: no gradient, no optimizer state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import optax
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


def get_stage(name: str, trainable: tuple[str, ...] | None = None, loss_weights=None) -> Stage:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose one of {sorted(STAGES)}")
    stage = STAGES[name]
    if trainable is not None:
        bad = set(trainable) - set(PARTS)
        if bad:
            raise ValueError(f"unknown trainable parts {sorted(bad)}; parts are {PARTS}")
        stage = dataclasses.replace(stage, trainable=tuple(trainable))
    if loss_weights is not None:
        lm, vm = loss_weights
        stage = dataclasses.replace(stage, loss_weight_lm=float(lm), loss_weight_vm=float(vm))
    return stage


def split_params(params: Mapping[str, Any], trainable: tuple[str, ...]) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts, split at the top-level part names."""
    bad = set(trainable) - set(PARTS)
    if bad:
        raise ValueError(f"unknown trainable parts {sorted(bad)}; parts are {PARTS}")
    flat = traverse_util.flatten_dict(dict(params))
    train = {k: v for k, v in flat.items() if k[0] in trainable}
    frozen = {k: v for k, v in flat.items() if k[0] not in trainable}
    return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen)


def merge_params(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict:
    flat = traverse_util.flatten_dict(dict(frozen))
    flat.update(traverse_util.flatten_dict(dict(trainable)))
    return traverse_util.unflatten_dict(flat)


def learning_rate_schedule(peak: float, total_steps: int, warmup_steps: int, final_fraction: float = 0.0):
    """Linear warmup then cosine decay (HF `cosine` scheduler shape)."""
    warmup_steps = max(0, min(warmup_steps, total_steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=peak * final_fraction,
    )


def make_optimizer(
    *,
    learning_rate: float,
    total_steps: int,
    warmup_steps: int,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    grad_clip_norm: float | None = 1.0,
    mu_dtype=None,
) -> tuple[optax.GradientTransformation, Any]:
    """AdamW + warmup-cosine + global-norm clipping (upstream: HF Trainer `adamw_torch` defaults)."""
    schedule = learning_rate_schedule(learning_rate, total_steps, warmup_steps)
    parts = []
    if grad_clip_norm:
        parts.append(optax.clip_by_global_norm(grad_clip_norm))
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mu_dtype=mu_dtype))
    return optax.chain(*parts), schedule
