"""The optimizer over the trainable parts (spec 2.1: HF Trainer `adamw_torch` defaults, cosine schedule).

Which parts are trainable is the stage's business (`train/stages.py`); the optimizer only ever sees the
trainable tree, so frozen parts have no optimizer state.
"""

from __future__ import annotations

from typing import Any

import optax


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
