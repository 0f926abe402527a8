"""Colour accuracy for the "shapes" world: did the model draw the colour it was asked for?

``dominant_color`` classifies every pixel to the nearest reference colour: the named shape colours
(``synthetic.COLORS``) plus "not a shape colour" references (the background, estimated from the image
border unless given, and the achromatic backgrounds white/black/gray). The most frequent shape colour
wins. Classifying pixels (rather than averaging them) keeps thin anti-aliased or noisy edges, a second
shape, or sensor-like noise from dragging the answer towards a mixed colour.

On clean renders this is exact (tested on every spec of the world); with additive noise it stays exact for
any noise well under half the smallest colour distance (~95 RGB units).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from dreamjax.data.synthetic import BACKGROUNDS, COLORS

NO_COLOR = "none"  # returned when fewer than ``min_fraction`` of the pixels have a shape colour

RGB = tuple[int, int, int] | Sequence[float] | np.ndarray


def estimate_background(img: np.ndarray, border: int | None = None) -> np.ndarray:
    """Per-channel median of the image's outer ring (``border`` pixels wide, default ~1/16 of the side).

    Shapes rarely touch the border, so the median is the background colour even when a few ring pixels
    belong to a shape. Returns float32 ``[3]``.
    """
    img = _check_image(img)
    h, w = img.shape[:2]
    b = border if border is not None else max(1, min(h, w) // 16)
    ring = np.concatenate([img[:b].reshape(-1, 3), img[-b:].reshape(-1, 3),
                           img[b:-b, :b].reshape(-1, 3), img[b:-b, -b:].reshape(-1, 3)])
    return np.median(ring, axis=0).astype(np.float32)


def dominant_color(img: np.ndarray, background: str | RGB | None = None, palette: Iterable[str] | None = None,
                   min_fraction: float = 0.002, min_neighbors: int = 3) -> str:
    """Name of the dominant shape colour of a uint8 ``[H, W, 3]`` image, or ``NO_COLOR``.

    Args:
      img: uint8 image (RGBA and gray are accepted).
      background: a name (``BACKGROUNDS`` or ``COLORS``), an RGB triple, or None to estimate it from the
        border pixels.
      palette: the candidate colour names (default: all of ``COLORS``).
      min_fraction: fewer shape-coloured pixels than this share of the image (and never fewer than 4)
        means there is no shape: ``NO_COLOR``.
      min_neighbors: a pixel only votes if at least this many of its 8 neighbours got the same colour. Shapes
        are blobs, while noise that happens to land nearer a shape colour than the background is scattered,
        so this removes noise votes (0 disables it).
    """
    img = _check_image(img)
    names = list(palette) if palette is not None else list(COLORS)
    unknown = [n for n in names if n not in COLORS]
    if unknown or not names:
        raise ValueError(f"dominant_color: unknown palette colours {unknown}; choose from {sorted(COLORS)}")
    ref = np.asarray([COLORS[n] for n in names], np.float32)  # [K, 3]
    if background is None:
        bg = estimate_background(img)
    elif isinstance(background, str):
        if background not in BACKGROUNDS and background not in COLORS:
            raise ValueError(f"dominant_color: unknown background {background!r}")
        bg = np.asarray(BACKGROUNDS.get(background) or COLORS[background], np.float32)
    else:
        bg = np.asarray(background, np.float32).reshape(3)
    # "Not a shape" references: the image's background and the achromatic world backgrounds.
    others = np.concatenate([bg[None], np.asarray(list(BACKGROUNDS.values()), np.float32)])  # [M, 3]

    h, w = img.shape[:2]
    px = img.reshape(-1, 3).astype(np.float32)  # [N, 3]
    d_ref = _sq_dist(px, ref)  # [N, K]
    d_other = _sq_dist(px, others).min(axis=1)  # [N]
    label = np.where(d_ref.min(axis=1) < d_other, d_ref.argmin(axis=1), -1).reshape(h, w)  # -1: not a shape
    onehot = label[:, :, None] == np.arange(len(names))  # [H, W, K]
    if min_neighbors > 0:
        onehot &= _neighbor_count(onehot) >= min_neighbors
    counts = onehot.sum(axis=(0, 1))  # [K]
    if counts.sum() < max(4, min_fraction * h * w):
        return NO_COLOR
    return names[int(counts.argmax())]


def color_accuracy(images: Iterable[np.ndarray], asked_colors: Iterable[str], **kwargs) -> float:
    """Share of images whose ``dominant_color`` is the asked colour (``kwargs`` go to ``dominant_color``).

    ``images`` may be a list of ``[H, W, 3]`` uint8 arrays or one ``[N, H, W, 3]`` array.
    """
    images, asked = list(images), list(asked_colors)
    if len(images) != len(asked):
        raise ValueError(f"color_accuracy: {len(images)} images but {len(asked)} asked colours")
    if not images:
        raise ValueError("color_accuracy: no images")
    hits = [dominant_color(img, **kwargs) == want for img, want in zip(images, asked, strict=True)]
    return float(np.mean(hits))


def _sq_dist(px: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Squared RGB distances ``[N, K]`` between pixels ``[N, 3]`` and references ``[K, 3]`` (exact in float32
    for 0..255 values)."""
    return (px * px).sum(axis=1, keepdims=True) - 2.0 * px @ ref.T + (ref * ref).sum(axis=1)[None, :]


def _neighbor_count(mask: np.ndarray) -> np.ndarray:
    """For a bool ``[H, W, K]`` mask, how many of each pixel's 8 neighbours are set, per channel."""
    h, w = mask.shape[:2]
    p = np.pad(mask, ((1, 1), (1, 1), (0, 0))).astype(np.int8)
    total = sum(p[dy: dy + h, dx: dx + w] for dy in range(3) for dx in range(3))
    return total - mask.astype(np.int8)


def _check_image(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got dtype {img.dtype} (convert [-1, 1] floats with "
                        "dreamjax.data.images.to_uint8)")
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4) or min(img.shape[:2]) < 3:
        raise ValueError(f"expected an [H, W, 3] image (H, W >= 3), got shape {img.shape}")
    return img[:, :, :3]
