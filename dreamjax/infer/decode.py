"""Batched text decoding with a KV cache (greedy or temperature sampling).

Prompts are right-padded into one static [B, P] prefill (padding has segment 0, so the cache masks it);
each row then continues at its own cache slot, so prompts of different lengths decode together with one
compiled prefill and one compiled step.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dreamjax.models.dreamllm import DreamLLM
from dreamjax.models.llama import init_cache


@functools.partial(jax.jit, static_argnames=("model", "max_len"))
def _prefill(model: DreamLLM, params, tokens, lengths, images_in, images_in_mask, max_len: int):
    b, p = tokens.shape
    seg = (jnp.arange(p)[None] < lengths[:, None]).astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(p), (b, p))
    x = model.apply({"params": params}, tokens, images_in, images_in_mask, method=DreamLLM.embed_inputs)
    cache = init_cache(model.config.llm, b, max_len)
    hidden, cache = model.apply({"params": params}, x, positions, seg, cache, 0, method=DreamLLM.run_llm)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)  # [B, 1, D]
    return model.apply({"params": params}, last, method=DreamLLM.lm_logits)[:, 0], cache


@functools.partial(jax.jit, static_argnames=("model",))
def _step(model: DreamLLM, params, token, position, cache):
    x = model.apply({"params": params}, token[:, None], None, None, method=DreamLLM.embed_inputs)
    hidden, cache = model.apply({"params": params}, x, position[:, None], None, cache, position,
                                method=DreamLLM.run_llm)
    return model.apply({"params": params}, hidden, method=DreamLLM.lm_logits)[:, 0], cache


def generate_text(
    model: DreamLLM,
    params,
    prompts: Sequence[Sequence[int]],
    *,
    images_in: np.ndarray | None = None,
    images_in_mask: np.ndarray | None = None,
    max_new_tokens: int = 32,
    stop_ids: Sequence[int] = (),
    temperature: float = 0.0,
    seed: int = 0,
) -> list[list[int]]:
    """Continue each prompt (token ids, image blocks already expanded) until a stop id or the budget.

    images_in [B, Ni, H, W, 3] CLIP-normalised, consumed by the prompts' `<im_start>` blocks in order.
    Returns the generated ids per prompt (the stop token included when reached).
    """
    b = len(prompts)
    lengths = np.array([len(p) for p in prompts], np.int32)
    if lengths.min() < 1:
        raise ValueError("every prompt needs at least one token (BOS)")
    p = int(lengths.max())
    max_len = p + max_new_tokens
    if max_len > model.config.llm.max_position_embeddings:
        raise ValueError(f"prompt ({p}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"{model.config.llm.max_position_embeddings} positions")
    tokens = np.zeros((b, p), np.int32)
    for i, ids in enumerate(prompts):
        tokens[i, : len(ids)] = ids
    logits, cache = _prefill(model, params, jnp.asarray(tokens), jnp.asarray(lengths),
                             None if images_in is None else jnp.asarray(images_in),
                             None if images_in_mask is None else jnp.asarray(images_in_mask), max_len)
    key = jax.random.PRNGKey(seed)
    out = [[] for _ in range(b)]
    done = np.zeros(b, bool)
    position = jnp.asarray(lengths)
    stop = set(int(t) for t in stop_ids)
    for _ in range(max_new_tokens):
        if temperature > 0:
            key, sub = jax.random.split(key)
            nxt = jax.random.categorical(sub, logits.astype(jnp.float32) / temperature)
        else:
            nxt = jnp.argmax(logits, axis=-1)
        nxt_host = np.asarray(jax.device_get(nxt))
        for i in range(b):
            if not done[i]:
                out[i].append(int(nxt_host[i]))
                done[i] = int(nxt_host[i]) in stop
        if done.all():
            break
        logits, cache = _step(model, params, nxt.astype(jnp.int32), position, cache)
        position = position + 1
    return out
