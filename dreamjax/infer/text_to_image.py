"""Text -> image (spec 4.1): the prompt's dream-query readout conditions the diffusion sampler, with
classifier-free guidance whose unconditional branch is the readout after the negative prompt
(default "" = BOS alone), as upstream `encode_prompt`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dreamjax.diffusion import samplers
from dreamjax.diffusion.schedule import Schedule
from dreamjax.models.dreamllm import DreamLLM
from dreamjax.run.assembly import Run
from dreamjax.run.prompts import SampleSettings


def dream_prompt(prompt_ids: Sequence[int], model: DreamLLM) -> list[int]:
    """BOS + prompt (no EOS) + `<dream_start>` + Q query slots + `<dream_end>`."""
    t = model.config.tokens
    return list(prompt_ids) + [t.dream_start] + [t.im_patch] * model.config.num_dream_queries + [t.dream_end]


@functools.partial(jax.jit, static_argnames=("model",))
def _conditions(model: DreamLLM, params, tokens, lengths, images_in, images_in_mask):
    b, length = tokens.shape
    seg = (jnp.arange(length)[None] < lengths[:, None]).astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(length), (b, length))
    _, cond, _ = model.apply({"params": params}, tokens, positions, seg, images_in, images_in_mask,
                             max_images_out=1)
    return cond[:, 0]  # [B, Q, C]


def conditions(model: DreamLLM, params, prompts: Sequence[Sequence[int]], images_in=None,
               images_in_mask=None) -> jax.Array:
    """[B, Q, C] conditions for tokenized prompts (BOS included, image blocks expanded)."""
    seqs = [dream_prompt(p, model) for p in prompts]
    lengths = np.array([len(s) for s in seqs], np.int32)
    tokens = np.zeros((len(seqs), int(lengths.max())), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
    return _conditions(model, params, jnp.asarray(tokens), jnp.asarray(lengths),
                       None if images_in is None else jnp.asarray(images_in),
                       None if images_in_mask is None else jnp.asarray(images_in_mask))


@functools.partial(jax.jit, static_argnames=("model", "num_steps", "sampler", "shape"))
def _sample(model: DreamLLM, params, schedule: Schedule, cond, uncond, keys, guidance,
            num_steps: int, sampler: str, shape: tuple[int, ...]):
    b = cond.shape[0]

    def model_fn(x, t):
        both = jnp.concatenate([x, x])
        tt = jnp.concatenate([t, t])
        eps = model.apply({"params": params}, both, tt, jnp.concatenate([uncond, cond]), method=DreamLLM.denoise)
        eps_u, eps_c = jnp.split(eps, 2)
        return samplers.classifier_free_guidance(eps_u, eps_c, guidance)

    latents = samplers.sample(model_fn, schedule, (b,) + shape, keys, num_steps, sampler=sampler)
    images = model.apply({"params": params}, latents, method=DreamLLM.from_latents)
    return jnp.clip(images, -1.0, 1.0)


def image_keys(seed: int, first: int, count: int) -> jax.Array:
    """Per-image PRNG keys: image i of a call with `seed` is drawn from fold_in(PRNGKey(seed), i) alone, so
    the same (prompt, seed, index) gives the same image whatever batch it is drawn in."""
    base = jax.random.PRNGKey(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(first, first + count))


def generate_images(model: DreamLLM, params, schedule: Schedule, prompts: Sequence[Sequence[int]], *,
                    negative: Sequence[int], num_steps: int = 50, guidance: float = 2.0, sampler: str = "ddpm",
                    seed: int = 0, first_index: int = 0, images_in=None, images_in_mask=None) -> np.ndarray:
    """Images in [-1, 1], [B, R, R, 3], for tokenized prompts; `negative` is the tokenized negative prompt
    (just [BOS] for the default ""). Row b uses the keys of image `first_index + b` (see `image_keys`)."""
    cond = conditions(model, params, prompts, images_in, images_in_mask)
    uncond = conditions(model, params, [negative])
    uncond = jnp.broadcast_to(uncond, cond.shape)
    cfg = model.config
    side = cfg.unet.sample_size
    shape = (side, side, cfg.unet.in_channels)
    out = _sample(model, params, schedule, cond, uncond, image_keys(seed, first_index, len(prompts)),
                  jnp.float32(guidance), num_steps, sampler, shape)
    return np.asarray(jax.device_get(out))


def text_to_image(run: Run, texts: Sequence[str], settings: SampleSettings, *, seed: int = 0, batch: int = 32,
                  images_in: np.ndarray | None = None) -> np.ndarray:
    """Images for captions with a loaded run: its prompt layout, its sampler settings (`run.sample_settings`)
    and per-image keys, so `dreamjax generate --mode image` and the evaluations agree image for image.

    images_in [Ni, H, W, 3] CLIP-normalised: the same input images for every caption (`<image>` first).
    """
    n_in = 0 if images_in is None else len(images_in)
    negative = run.image_prompt(settings.negative_prompt)
    out = []
    for start in range(0, len(texts), batch):
        chunk = texts[start : start + batch]
        pixels = mask = None
        if n_in:
            pixels = np.repeat(np.asarray(images_in)[None], len(chunk), 0)
            mask = np.ones((len(chunk), n_in), bool)
        out.append(generate_images(run.model, run.params, run.schedule, [run.image_prompt(t, n_in) for t in chunk],
                                   negative=negative, num_steps=settings.steps, guidance=settings.guidance,
                                   sampler=settings.sampler, seed=seed, first_index=start, images_in=pixels,
                                   images_in_mask=mask))
    return np.concatenate(out) if out else np.zeros((0,), np.float32)
