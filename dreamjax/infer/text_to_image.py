"""Text -> image (spec 4.1): the prompt's dream-query readout conditions the diffusion sampler, with
classifier-free guidance whose unconditional branch is the readout after the negative prompt
(default "" = BOS alone), as upstream `encode_prompt`.

Every image has its own PRNG key (`image_keys`), so image i of a call with a seed is the same whatever
batch, mesh or number of candidates it is drawn with; the batch is sharded over the mesh's batch axes.
`text_to_image(..., num_per_prompt=N, reranker=...)` draws N candidates per prompt and keeps the one the
CLIP scorer ranks first (best-of-N, as upstream's COCO protocol).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dreamjax.data import images as imgs
from dreamjax.diffusion import samplers
from dreamjax.diffusion.schedule import Schedule
from dreamjax.infer.decode import pad_batch, put_batch, right_pad
from dreamjax.models.dreamllm import DreamLLM
from dreamjax.parallel.sharding import Rules
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
    positions = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)  # from the mask
    _, cond, _ = model.apply({"params": params}, tokens, positions, seg, images_in, images_in_mask,
                             max_images_out=1)
    return cond[:, 0]  # [B, Q, C]


def conditions(model: DreamLLM, params, prompts: Sequence[Sequence[int]], images_in=None,
               images_in_mask=None, *, mesh: Mesh | None = None, rules: Rules | None = None) -> jax.Array:
    """[B', Q, C] conditions for tokenized prompts (BOS included, image blocks expanded); B' is B rounded
    up to the mesh's data parallelism (the extra rows are padding, sharded with the rest)."""
    seqs = [dream_prompt(p, model) for p in prompts]
    rows = pad_batch(len(seqs), mesh, rules)
    tokens, lengths = right_pad(seqs, rows, max(len(s) for s in seqs))
    if images_in is not None and rows > len(seqs):
        extra = rows - len(seqs)
        images_in = np.concatenate([images_in, np.zeros((extra,) + images_in.shape[1:], images_in.dtype)])
        images_in_mask = np.concatenate([images_in_mask, np.zeros((extra,) + images_in_mask.shape[1:], bool)])
    with mesh if mesh is not None else contextlib.nullcontext():
        return _conditions(model, params, put_batch(tokens, mesh, rules), put_batch(lengths, mesh, rules),
                           put_batch(images_in, mesh, rules), put_batch(images_in_mask, mesh, rules))


# ------------------------------------------------------------------------------------------------ progress

_BAR: dict = {"bar": None}


def _tick(step) -> None:
    """The sampler's per-step host callback: one stable function (a static jit argument that never
    changes, so a progress bar costs no recompile); it advances whichever bar is open."""
    if _BAR["bar"] is not None:
        _BAR["bar"].update(1)


@contextlib.contextmanager
def progress_bar(total: int, desc: str = "sampling"):
    from tqdm import tqdm

    _BAR["bar"] = tqdm(total=total, desc=desc, unit="step", leave=False)
    try:
        yield
    finally:
        _BAR["bar"].close()
        _BAR["bar"] = None


# ------------------------------------------------------------------------------------------------ sampling


@functools.partial(jax.jit, static_argnames=("model", "num_steps", "sampler", "shape", "trajectory", "decode",
                                             "on_step"))
def sample_images(model: DreamLLM, params, schedule: Schedule, cond, uncond, keys, guidance, x_init=None,
                  noise=None, *, num_steps: int, sampler: str, shape: tuple[int, ...], trajectory: bool = False,
                  decode: bool = True, on_step=None):
    """The CFG sampling loop (one `lax.scan`) and the VAE decode.

    cond, uncond [B, Q, C]; keys [B, 2] per-image keys; x_init [B, *shape] and noise [S, B, *shape]
    optional explicit draws (parity tests). Returns images in [-1, 1] [B, R, R, 3] (decode), else the
    latents, or with `trajectory` the latents after every step [S, B, *shape].
    """
    b = cond.shape[0]

    def model_fn(x, t):
        both = jnp.concatenate([x, x])
        tt = jnp.concatenate([t, t])
        eps = model.apply({"params": params}, both, tt, jnp.concatenate([uncond, cond]), method=DreamLLM.denoise)
        eps_u, eps_c = jnp.split(eps, 2)
        return samplers.classifier_free_guidance(eps_u, eps_c, guidance)

    latents = samplers.sample(model_fn, schedule, (b,) + shape, keys, num_steps, sampler=sampler, x_init=x_init,
                              noise=noise, trajectory=trajectory, on_step=on_step)
    if trajectory or not decode:
        return latents
    images = model.apply({"params": params}, latents, method=DreamLLM.from_latents)
    return jnp.clip(images, -1.0, 1.0)


def image_keys(seed: int, first: int, count: int) -> jax.Array:
    """Per-image PRNG keys: image i of a call with `seed` is drawn from fold_in(PRNGKey(seed), i) alone, so
    the same (prompt, seed, index) gives the same image whatever batch it is drawn in."""
    base = jax.random.PRNGKey(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(first, first + count))


def latent_shape(model: DreamLLM) -> tuple[int, int, int]:
    side = model.config.unet.sample_size
    return (side, side, model.config.unet.in_channels)


def generate_images(model: DreamLLM, params, schedule: Schedule, prompts: Sequence[Sequence[int]], *,
                    negative: Sequence[int], num_steps: int = 50, guidance: float = 2.0, sampler: str = "ddpm",
                    seed: int = 0, first_index: int = 0, images_in=None, images_in_mask=None,
                    mesh: Mesh | None = None, rules: Rules | None = None, progress: bool = False) -> np.ndarray:
    """Images in [-1, 1], [B, R, R, 3], for tokenized prompts; `negative` is the tokenized negative prompt
    (just [BOS] for the default ""). Row b uses the keys of image `first_index + b` (see `image_keys`).
    With `mesh` and `rules` the batch is sharded over the batch axes (rows padded to a multiple)."""
    b = len(prompts)
    cond = conditions(model, params, prompts, images_in, images_in_mask, mesh=mesh, rules=rules)
    rows = cond.shape[0]
    uncond = conditions(model, params, [negative])
    uncond = put_batch(np.broadcast_to(np.asarray(jax.device_get(uncond)), cond.shape), mesh, rules)
    keys = put_batch(np.asarray(image_keys(seed, first_index, rows)), mesh, rules)
    bar = progress_bar(num_steps) if progress else contextlib.nullcontext()
    with bar, mesh if mesh is not None else contextlib.nullcontext():
        out = sample_images(model, params, schedule, cond, uncond, keys, jnp.float32(guidance),
                            num_steps=num_steps, sampler=sampler, shape=latent_shape(model),
                            on_step=_tick if progress else None)
        out = np.asarray(jax.device_get(out))
    return out[:b]


def text_to_image(run: Run, texts: Sequence[str], settings: SampleSettings, *, seed: int = 0, batch: int = 32,
                  images_in: np.ndarray | None = None, progress: bool = False) -> np.ndarray:
    """Images for captions with a loaded run: its prompt layout, its sampler settings (`run.sample_settings`),
    its mesh, and per-image keys, so `dreamjax generate --mode image` and the evaluations agree image for image.

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
                                   images_in_mask=mask, mesh=run.mesh, rules=run.rules, progress=progress))
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def best_of_n(run: Run, texts: Sequence[str], settings: SampleSettings, n: int, scorer, *, seed: int = 0,
              batch: int = 32, images_in: np.ndarray | None = None,
              progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """N candidates per caption (candidate j of caption p is image p*N + j of `text_to_image` with the
    captions repeated), ranked by `scorer(images uint8 [M, R, R, 3], texts) -> [M]` CLIP scores.

    Returns (best images [P, R, R, 3] in [-1, 1], all candidates [P, N, R, R, 3], scores [P, N]).
    """
    if n < 1:
        raise ValueError(f"--num-images must be >= 1, got {n}")
    repeated = [t for t in texts for _ in range(n)]
    cands = text_to_image(run, repeated, settings, seed=seed, batch=batch, images_in=images_in, progress=progress)
    scores = np.asarray(scorer(imgs.to_uint8(cands), repeated), np.float32).reshape(len(texts), n)
    cands = cands.reshape((len(texts), n) + cands.shape[1:])
    best = cands[np.arange(len(texts)), scores.argmax(axis=1)]
    return best, cands, scores

