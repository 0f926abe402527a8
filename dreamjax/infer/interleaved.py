"""Free-form interleaved generation (spec 4.3): text and images in one document, through one KV cache.

    decode text ──<dream_start>──> feed DRM = <dream_start> + Q queries + <dream_end>, read the Q outputs
         ^                          -> condition -> sample an image (CFG against the negative readout)
         └──── feed IMG = <im_start> + CLIP(image) + <im_end>  (the generated image read back, as the
                                                                joint training layout DRM + IMG has it)
until EOS, the token budget or the image limit. One document at a time (batch 1): rows of a batch would
reach `<dream_start>` at different steps. The cache has a static size (prompt bucket + budget), so a
document costs one compile per piece (prefill, decode loop, block feed, sampler) per prompt bucket.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dreamjax.data import images as imgs
from dreamjax.infer import decode
from dreamjax.infer.decode import LogitsHook, Sampling
from dreamjax.infer.text_to_image import conditions, image_keys, latent_shape, sample_images
from dreamjax.models.dreamllm import DreamLLM
from dreamjax.models.llama import init_cache
from dreamjax.run import prompts
from dreamjax.run.assembly import Run
from dreamjax.run.prompts import SampleSettings

GREEDY = Sampling()


@dataclasses.dataclass
class Segment:
    kind: str  # "text" or "image"
    text: str = ""
    tokens: list[int] = dataclasses.field(default_factory=list)
    image: np.ndarray | None = None  # uint8 [R, R, 3]
    index: int = -1  # the image's number in the document (its PRNG index)


@dataclasses.dataclass
class Document:
    prompt: str
    segments: list[Segment]
    tokens: list[int]  # the whole stream: prompt, generated text, and every DRM / IMG block fed
    stop: str  # "eos", "max_new_tokens", "max_images" or "context"
    cache: Any = None  # the final KV cache (tests check what was fed back)
    images_in: list[np.ndarray] = dataclasses.field(default_factory=list)  # CLIP inputs of the fed-back images

    @property
    def images(self) -> list[np.ndarray]:
        return [s.image for s in self.segments if s.kind == "image"]

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.segments if s.kind == "text" and s.text)


# ------------------------------------------------------------------------------------------------ jitted pieces


@functools.partial(jax.jit, static_argnames=("model",), donate_argnums=(2,))
def _feed(model: DreamLLM, params, cache, tokens, lengths, index, images_in, images_in_mask):
    """Feed a chunk; also the projected readout of its first dream block (used when the chunk is a DRM)."""
    hidden, logits, cache, index = decode.extend(model, params, cache, tokens, lengths, index, images_in,
                                                 images_in_mask)
    cond, _ = model.apply({"params": params}, hidden, tokens, 1, method=DreamLLM.condition)
    return logits, cache, index, cond[:, 0]


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling", "logits_hook"),
                   donate_argnums=(2,))
def _decode(model: DreamLLM, params, cache, logits, index, key, stop_ids, step_offset, bias, limit, *,
            max_new_tokens: int, sampling: Sampling, logits_hook: LogitsHook | None):
    model, params = decode.unrolled(model, params)
    return decode.decode_loop(model, params, cache, logits, index, key, stop_ids, step_offset, bias, limit,
                              max_new_tokens=max_new_tokens, sampling=sampling, logits_hook=logits_hook)


# ------------------------------------------------------------------------------------------------ driver


def _banned_bias(run: Run) -> np.ndarray:
    """-inf on the ids a document never emits (block-internal specials, placeholders, padding): interleaved
    training leaves them unsupervised, so a model may give them stray mass."""
    s = run.specials
    bias = np.zeros((run.model_config.llm.vocab_size,), np.float32)
    for t in (s.bos, s.im_start, s.im_patch, s.im_end, s.dream_end, s.image, s.dream, s.pad):
        if t != s.eos:
            bias[t] = -np.inf
    return bias


def generate_interleaved(run: Run, prompt: str, *, kind: str = "document", settings: SampleSettings | None = None,
                         sampling: Sampling = GREEDY, max_new_tokens: int = 128, max_images: int = 4,
                         seed: int = 0, input_images: np.ndarray | None = None,
                         logits_hook: LogitsHook | None = None) -> Document:
    """Continue `prompt` as an interleaved document (`kind`: "document" spec 3.2 / "instruction" spec 3.4).

    max_new_tokens counts generated text tokens (`<dream_start>` included), not the blocks fed.
    Image k is sampled with the keys of image k of `seed` (`image_keys`). input_images [Ni, H, W, 3]
    CLIP-normalised, placed first in the prompt.
    """
    with run.mesh:  # the weights keep their training shardings; a document is one row, replicated
        return _generate(run, prompt, kind, settings or run.sample_settings(), sampling, max_new_tokens, max_images,
                         seed, input_images, logits_hook)


def _generate(run, prompt, kind, settings, sampling, max_new_tokens, max_images, seed, input_images,
              logits_hook) -> Document:
    model, params, s = run.model, run.params, run.specials
    cfg = model.config
    q, n = cfg.num_dream_queries, cfg.num_image_tokens
    n_in = 0 if input_images is None else len(input_images)
    ids = prompts.interleaved_prompt(prompt, run.tokenizer, run.layout(), s, kind, n_in)
    block_len = (q + 2) + (n + 2)
    need = len(ids) + max_new_tokens + max_images * block_len
    limit = cfg.llm.max_position_embeddings
    if len(ids) + 1 > limit:
        raise ValueError(f"the prompt ({len(ids)} tokens) leaves no room in the model's {limit} positions")
    cache_len = decode.bucket_length(min(need, limit))
    side = cfg.vision.image_size
    negative = conditions(model, params, [run.image_prompt(settings.negative_prompt)])

    cache = init_cache(cfg.llm, 1, cache_len)
    tokens, lengths = decode.right_pad([ids], 1, decode.bucket_length(len(ids)))
    pixels = mask = None
    if n_in:
        pixels, mask = np.asarray(input_images)[None], np.ones((1, n_in), bool)
    logits, cache, index, _ = _feed(model, params, cache, tokens, lengths, jnp.zeros((1,), jnp.int32), pixels, mask)

    key = jax.random.PRNGKey(seed)
    stop = decode.stop_array([s.eos, s.dream_start])
    bias = _banned_bias(run)
    stream, segments, fed_back = list(ids), [], []
    generated, n_images, why = 0, 0, "max_new_tokens"
    while generated < max_new_tokens:
        room = limit - int(index[0]) - 1
        budget = min(max_new_tokens - generated, room)
        if budget < 1:
            why = "context"
            break
        out, count, cache, index, key = _decode(
            model, params, cache, logits, index, key, stop, jnp.int32(generated), bias, jnp.int32(budget),
            max_new_tokens=max_new_tokens, sampling=sampling, logits_hook=logits_hook)
        new = np.asarray(out[0, : int(count[0])]).tolist()
        generated += len(new)
        last = new[-1] if new else None
        text_ids = new[:-1] if last in (s.eos, s.dream_start) else new
        if text_ids:
            stream += text_ids
            segments.append(Segment("text", run.tokenizer.decode(text_ids, skip_special_tokens=True).strip(),
                                    text_ids))
        if last == s.eos:
            why = "eos"
            break
        if last != s.dream_start:  # the budget ran out mid-text (its last token was never fed)
            why = "max_new_tokens" if generated >= max_new_tokens else "context"
            break
        if n_images >= max_images:
            why = "max_images"
            break
        if int(index[0]) + block_len > cache_len:
            why = "context"
            break
        # 1. the dream block: queries through the cache, their readout is the condition
        drm = [s.dream_start] + [s.im_patch] * q + [s.dream_end]
        _, cache, index, cond = _feed(model, params, cache, np.asarray([drm], np.int32),
                                      np.asarray([len(drm)], np.int32), index, None, None)
        stream += drm
        # 2. the image, sampled as text_to_image samples (same keys for image k of this seed)
        image = sample_images(model, params, run.schedule, cond, negative, image_keys(seed, n_images, 1),
                              jnp.float32(settings.guidance), num_steps=settings.steps, sampler=settings.sampler,
                              shape=latent_shape(model))
        image = imgs.to_uint8(np.asarray(image[0]))
        segments.append(Segment("image", image=image, index=n_images))
        # 3. fed back through CLIP as the joint training layout does (DRM then IMG)
        clip_in = imgs.clip_preprocess(image, side)
        img_block = [s.im_start] + [s.im_patch] * n + [s.im_end]
        logits, cache, index, _ = _feed(model, params, cache, np.asarray([img_block], np.int32),
                                        np.asarray([len(img_block)], np.int32), index, clip_in[None, None],
                                        np.ones((1, 1), bool))
        stream += img_block
        fed_back.append(clip_in)
        n_images += 1
    return Document(prompt, segments, stream, why, cache, fed_back)

