"""A DreamLLM batch in the batch contract (DESIGN section 3) built from random ids, for the train-step benchmarks.

No torch here: `gpu_train_step.py` builds the batch in a JAX-only process.
"""

from __future__ import annotations

import numpy as np

from dreamjax.data.tokenize import IGNORE_INDEX
from dreamjax.models.dreamllm import SpecialTokenIds


def special_tokens(vocab: int) -> SpecialTokenIds:
    return SpecialTokenIds(bos=1, im_start=vocab - 4, im_patch=vocab - 3, dream_start=vocab - 2, dream_end=vocab - 1)


def make_batch(cfg, size: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """The batch contract: per sample [BOS] text <im_start> patches text <dream_start> queries <dream_end> text,
    the last rows padded at the end; labels = the text tokens (image and query slots, padding: ignored)."""
    b, length, v = size["batch"], size["seq"], size["vocab"]
    s, n_img, q = cfg.tokens, cfg.num_image_tokens, cfg.num_dream_queries
    rng = np.random.default_rng(seed)
    tokens = np.zeros((b, length), np.int32)
    labels = np.full((b, length), IGNORE_INDEX, np.int32)
    segment_ids = np.zeros((b, length), np.int32)
    for i in range(b):
        used = length - 8 * i  # different lengths: row i is padded by 8 i tokens
        row = rng.integers(2, v - 4, used).astype(np.int32)
        row[0] = s.bos
        is_text = np.ones(used, bool)
        p_img = 1 + int(rng.integers(2, 8))
        row[p_img] = s.im_start
        row[p_img + 1:p_img + 1 + n_img] = s.im_patch
        is_text[p_img + 1:p_img + 1 + n_img] = False
        p_drm = p_img + 1 + n_img + int(rng.integers(8, max(9, used // 3)))
        row[p_drm] = s.dream_start
        row[p_drm + 1:p_drm + 1 + q] = s.im_patch
        row[p_drm + 1 + q] = s.dream_end
        is_text[p_drm + 1:p_drm + 1 + q] = False
        assert p_drm + q + 2 < used, "sequence too short for the image and query slots"
        tokens[i, :used], segment_ids[i, :used] = row, 1
        labels[i, :used] = np.where(is_text, row, IGNORE_INDEX)
    r_in, r_out = cfg.vision.image_size, size["res_out"]
    return dict(
        tokens=tokens, labels=labels, segment_ids=segment_ids,
        positions=np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy(),
        images_in=rng.standard_normal((b, 1, r_in, r_in, 3)).astype(np.float32),  # CLIP-normalised scale
        images_in_mask=np.ones((b, 1), bool),
        images_out=rng.uniform(-1, 1, (b, 1, r_out, r_out, 3)).astype(np.float32),
        images_out_mask=np.ones((b, 1), bool),
    )
