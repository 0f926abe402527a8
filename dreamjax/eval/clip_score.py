"""CLIP score of images against texts, from a local transformers CLIPModel (`infer/rerank.ClipReranker`).

Reported as torchmetrics' / the T2I papers' CLIP score: mean over images of max(100 * cos(image, text), 0)
(the CLIPScore paper's w = 2.5 scaling is not applied); the raw mean of 100 * cos is reported beside it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def cosines(scorer, images: np.ndarray, texts: Sequence[str]) -> np.ndarray:
    """cos(image m, text m) [M] for uint8 images [M, H, W, 3]: the scorer's logits over its exp(logit_scale)."""
    scale = float(np.exp(np.asarray(scorer.params["logit_scale"], np.float64)))
    return np.asarray(scorer(images, list(texts)), np.float64) / scale


def summarize(cos: Sequence[float]) -> dict:
    c = np.asarray(cos, np.float64)
    if c.size == 0:
        return {"images": 0}
    return {"images": int(c.size), "clip_score": float(np.mean(np.maximum(100 * c, 0))),
            "clip_score_raw": float(np.mean(100 * c)), "clip_score_std": float(np.std(np.maximum(100 * c, 0)))}
