"""Collation of tokenized samples into the static-shape batch of DESIGN section 3, with the
drop-whole-block rule for samples over the length or image budget (everything cut is counted)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dreamjax.data.documents import ImageRef
from dreamjax.data.tokenize import IGNORE_INDEX, Reason, Skips, TokenizedSample
from dreamjax.data.tokenizer import SpecialIds


def _block_end(ids: Sequence[int], start: int, end_token: int) -> int:
    """Index just after the end token of the block starting at `start`."""
    for i in range(start + 1, len(ids)):
        if ids[i] == end_token:
            return i + 1
    raise ValueError(f"image block at position {start} has no end token {end_token}")


def fit_sample(
    sample: TokenizedSample,
    max_length: int,
    max_images_in: int,
    max_images_out: int,
    specials: SpecialIds,
    skips: Skips | None = None,
) -> TokenizedSample:
    """Cut `sample` so it has <= max_length tokens, <= max_images_in <im_start> blocks and <= max_images_out
    <dream_start> blocks, with the drop-whole-block rule: the sequence ends right before the first block
    that does not fit (by length or by count). A DRM directly followed by an IMG (joint mode, `<dream>`)
    is one unit and is kept or dropped together. The image lists are cut to match; everything is counted."""
    s = specials
    ids = sample.ids
    n_in, n_out = ids.count(s.im_start), ids.count(s.dream_start)
    if n_in != len(sample.images_in) or n_out != len(sample.images_out):
        raise ValueError(
            f"sample has {n_in} <im_start> / {n_out} <dream_start> but {len(sample.images_in)} input / "
            f"{len(sample.images_out)} output images"
        )
    if len(ids) <= max_length and n_in <= max_images_in and n_out <= max_images_out:
        return sample

    cut, k_in, k_out, i = len(ids), 0, 0, 0
    while i < len(ids):
        t = ids[i]
        if t == s.dream_start or t == s.im_start:
            unit_in = unit_out = 0
            if t == s.dream_start:
                end, unit_out = _block_end(ids, i, s.dream_end), 1
                if end < len(ids) and ids[end] == s.im_start:
                    end, unit_in = _block_end(ids, end, s.im_end), 1
            else:
                end, unit_in = _block_end(ids, i, s.im_end), 1
            if end > max_length or k_in + unit_in > max_images_in or k_out + unit_out > max_images_out:
                cut = i
                break
            k_in, k_out, i = k_in + unit_in, k_out + unit_out, end
        else:
            if i + 1 > max_length:
                cut = i
                break
            i += 1
    skips = skips if skips is not None else Skips()
    skips.add(Reason.BATCH_TRUNCATED)
    skips.add(Reason.BATCH_IMAGES_IN_DROPPED, n_in - k_in)
    skips.add(Reason.BATCH_IMAGES_OUT_DROPPED, n_out - k_out)
    return TokenizedSample(
        ids[:cut], sample.labels[:cut], sample.images_in[:k_in], sample.images_out[:k_out], sample.kind
    )


def collate(
    samples: Sequence[TokenizedSample],
    max_length: int,
    max_images_in: int,
    max_images_out: int,
    pad_id: int | None = None,
    *,
    specials: SpecialIds,
    load_in: Callable[[ImageRef], Any] | None = None,
    load_out: Callable[[ImageRef], Any] | None = None,
    in_shape: tuple[int, ...] = (224, 224, 3),
    out_shape: tuple[int, ...] = (512, 512, 3),
    image_dtype: Any = np.float32,
    skips: Skips | None = None,
) -> dict[str, np.ndarray]:
    """Right-pad samples into the static-shape batch of DESIGN section 3 (B = len(samples), L = max_length):

        tokens [B, L] int32 (pad_id), labels [B, L] int32 (-100), positions [B, L] int32 (arange),
        segment_ids [B, L] int32 (1 = token, 0 = padding; no packing),
        images_in_mask [B, Ni] bool, images_out_mask [B, No] bool,
        images_in [B, Ni, *in_shape]    only with `load_in(ref) -> array` (CLIP-normalised pixels)
        images_out [B, No, *out_shape]  only with `load_out(ref) -> array` (pixels in [-1, 1])

    Absent images are zeros with mask False. A sample over the length or image budget is cut by
    `fit_sample` (drop-whole-block rule) and counted in `skips`. `pad_id` defaults to `specials.pad`.
    """
    pad_id = specials.pad if pad_id is None else pad_id
    skips = skips if skips is not None else Skips()
    b, length = len(samples), max_length
    batch = {
        "tokens": np.full((b, length), pad_id, np.int32),
        "labels": np.full((b, length), IGNORE_INDEX, np.int32),
        "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy(),
        "segment_ids": np.zeros((b, length), np.int32),
        "images_in_mask": np.zeros((b, max_images_in), bool),
        "images_out_mask": np.zeros((b, max_images_out), bool),
    }
    if load_in is not None:
        batch["images_in"] = np.zeros((b, max_images_in, *in_shape), image_dtype)
    if load_out is not None:
        batch["images_out"] = np.zeros((b, max_images_out, *out_shape), image_dtype)

    for row, sample in enumerate(samples):
        sample = fit_sample(sample, max_length, max_images_in, max_images_out, specials, skips)
        n = len(sample.ids)
        batch["tokens"][row, :n] = sample.ids
        batch["labels"][row, :n] = sample.labels
        batch["segment_ids"][row, :n] = 1
        for key, refs, load in (
            ("images_in", sample.images_in, load_in),
            ("images_out", sample.images_out, load_out),
        ):
            batch[f"{key}_mask"][row, : len(refs)] = True
            if load is None:
                continue
            for k, ref in enumerate(refs):
                pixels = np.asarray(load(ref))
                want = batch[key].shape[2:]
                if pixels.shape != want:
                    raise ValueError(f"{key}: the loader returned shape {pixels.shape}, expected {want}")
                batch[key][row, k] = pixels
    return batch
