"""Image decoding and preprocessing, in numpy + PIL (no torch).

Two preprocessing paths, as in DreamLLM (spec section 1.1):

* ``clip_preprocess``: the input side, HF ``CLIPImageProcessor`` for ``openai/clip-vit-large-patch14``
  (the PIL "slow" processor that upstream's transformers 4.35 used): shortest side -> 224 with PIL bicubic,
  center crop 224, scale 1/255, CLIP mean/std.  Output float32 HWC.
* ``diffusion_preprocess``: the Stable Diffusion side, torchvision ``Resize(R, bilinear)`` on the shortest
  edge, ``CenterCrop(R)``, ``RandomHorizontalFlip()``, ``ToTensor()``, ``Normalize(0.5, 0.5)``.
  Output float32 HWC in [-1, 1].

Both reproduce the reference arithmetic (output-size truncation, crop-offset rounding, float32 order of
operations) so the results match the reference libraries to float rounding, not just approximately.
Everything here is HWC (channels last), which is what the JAX models take (DESIGN section 3).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

# OpenAI CLIP normalisation constants (identical to transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PathLike = str | os.PathLike

# ``Image.info`` key of an image that ``decode_pil(draft_side=...)`` decoded at a reduced DCT scale:
# ``(full width, full height, scale)``.
DRAFT_INFO = "dreamjax_draft"


class ImageDecodeError(ValueError):
    """An image could not be decoded. ``item`` names the image (path, tar member, record id), ``reason``
    says why. Callers that skip bad items (``dreamjax prepare``, the pipeline) report both."""

    def __init__(self, item: str, reason: str):
        super().__init__(f"cannot decode image {item!r}: {reason}")
        self.item = item
        self.reason = reason

    def __reduce__(self):  # keep the two-argument constructor picklable (Grain worker processes)
        return (type(self), (self.item, self.reason))


# ----------------------------------------------------------------------------------------------------------
# Decoding / encoding


def decode_image(src: bytes | bytearray | memoryview | PathLike, name: str | None = None,
                 max_pixels: int | None = None) -> np.ndarray:
    """Decode encoded bytes or a file into a (writable) uint8 ``[H, W, 3]`` RGB array: ``decode_pil``'s pixels."""
    return np.array(decode_pil(src, name, max_pixels), dtype=np.uint8)


def decode_pil(src: bytes | bytearray | memoryview | PathLike, name: str | None = None,
               max_pixels: int | None = None, draft_side: int | None = None) -> Image.Image:
    """Decode encoded bytes or a file into a loaded RGB PIL image.

    The training pipeline keeps the PIL image: both preprocessing paths resize with PIL, so handing them the
    decoded image saves two numpy <-> PIL copies per image (same pixels, same results).

    ``name`` is what the error message calls the item (default: the path, or ``<N bytes>``). Any failure,
    including a missing file, unknown format, truncated or corrupt data, a zero-sized image or more than
    ``max_pixels`` pixels, raises ``ImageDecodeError``. Like upstream (``Image.open(...).convert("RGB")``),
    alpha is dropped rather than composited, and EXIF orientation is not applied.

    Truncated data is caught because the pixels are decoded here (``im.load()``), unless some other code
    has set the process-wide ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True``.

    ``draft_side``: a JPEG whose shortest side is at least twice this is decoded at a reduced scale
    (libjpeg's DCT scaling by 1/2, 1/4 or 1/8, ``Image.draft``; much cheaper to decode and to resize),
    the smallest one whose shortest side is still >= ``draft_side``. Such an image records the full
    image's size in ``info[DRAFT_INFO]`` (``(width, height, scale)``) and both preprocessors map it back
    (``resize_crop``): same output geometry, pixels within a few levels of the full decode (the DCT
    scaling is a box-like pre-filter). Other images, and every image without ``draft_side``, decode fully.
    """
    if isinstance(src, bytes | bytearray | memoryview):
        item = name or f"<{len(src)} bytes>"
        fp = io.BytesIO(bytes(src))
    elif isinstance(src, str | os.PathLike):
        item = name or os.fspath(src)
        fp = src
    else:
        raise TypeError(f"decode_image takes bytes or a path, got {type(src).__name__}")
    try:
        with Image.open(fp) as im:
            w, h = im.size
            if w == 0 or h == 0:
                raise ImageDecodeError(item, f"empty image ({w}x{h})")
            if max_pixels is not None and w * h > max_pixels:
                raise ImageDecodeError(item, f"{w}x{h} pixels is over max_pixels={max_pixels}")
            scale = 1
            if draft_side is not None and im.format == "JPEG" and min(w, h) >= 2 * draft_side:
                drafted = im.draft(None, (draft_side, draft_side))  # (mode, box of the full image)
                scale = round(w / drafted[1][2]) if drafted else 1
            im.load()  # decode now, so truncated data fails here and not later in the pipeline
            if im.mode != "RGB":
                rgb = im.convert("RGB")
            else:  # an image read from bytes holds no file: no copy needed to outlive the `with`
                rgb = im if isinstance(src, bytes | bytearray | memoryview) else im.copy()
    except ImageDecodeError:
        raise
    except FileNotFoundError as e:
        raise ImageDecodeError(item, "file not found") from e
    except Exception as e:  # PIL raises many types for bad data: OSError, SyntaxError, struct.error, ...
        raise ImageDecodeError(item, f"{type(e).__name__}: {e}") from e
    if scale > 1:
        rgb.info[DRAFT_INFO] = (w, h, scale)
    return rgb


def encode_png(img: np.ndarray) -> bytes:
    """uint8 ``[H, W, 3]`` (or ``[H, W]``) -> PNG bytes (lossless; what synthetic data stores)."""
    buf = io.BytesIO()
    Image.fromarray(_as_uint8_image(img)).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------
# Geometry helpers shared by both preprocessing paths


def shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output (height, width) when the shortest edge is resized to ``size``.

    The long edge is ``int(size * long / short)`` (truncated, not rounded), which is what both transformers'
    ``get_resize_output_image_size`` and torchvision's ``Resize(int)`` compute.
    """
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def resize_shortest_edge(img: np.ndarray | Image.Image, size: int, resample: Image.Resampling) -> np.ndarray:
    """PIL resize of a uint8 HWC image (or an RGB PIL image) so that its shortest edge is ``size`` (a no-op
    if it already is); returns a uint8 HWC array."""
    if isinstance(img, Image.Image):
        w, h = img.size
        im = img
    else:
        h, w = img.shape[:2]
        im = None
    new_h, new_w = shortest_edge_size(h, w, size)
    if (new_h, new_w) == (h, w):
        return np.asarray(img)
    im = im if im is not None else Image.fromarray(img)
    return np.asarray(im.resize((new_w, new_h), resample=resample))


def _crop_offsets(h: int, w: int, height: int, width: int, rounding: str) -> tuple[int, int]:
    if rounding == "floor":
        return (h - height) // 2, (w - width) // 2
    if rounding == "round":
        return int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    raise ValueError(f"rounding must be 'floor' or 'round', got {rounding!r}")


def center_crop(img: np.ndarray, height: int, width: int, rounding: str = "floor") -> np.ndarray:
    """Crop the central ``height x width`` window of an HWC image.

    ``rounding`` picks the offset rule when the margin is odd: ``"floor"`` is transformers' ``(H - h) // 2``,
    ``"round"`` is torchvision's ``int(round((H - h) / 2))`` (Python's round-half-to-even).
    """
    h, w = img.shape[:2]
    if height > h or width > w:
        raise ValueError(f"center_crop: crop {height}x{width} is larger than the image {h}x{w}")
    top, left = _crop_offsets(h, w, height, width, rounding)
    return img[top: top + height, left: left + width]


def resize_crop(img: Image.Image, size: int, resample: Image.Resampling, rounding: str,
                window: bool = False) -> Image.Image:
    """``resize_shortest_edge`` to ``size`` then the central ``size x size`` crop (``center_crop``'s
    ``rounding``), of an RGB PIL image; returns the crop as a PIL image.

    ``window=False`` runs exactly those two reference steps (the whole image is resized, then cropped).
    ``window=True`` resizes only the crop window (PIL ``resize(box=...)``: the same filter centres and
    supports, without the pixels the crop throws away; PIL takes the box in float32, which moves the
    centres by ~1e-4 px, so a pixel can differ by one level). An image that ``decode_pil(draft_side=...)``
    decoded at a reduced scale (``info[DRAFT_INFO]``) always takes the window path, in the full image's
    geometry: the output size and the crop are those of the full image.
    """
    draft = img.info.get(DRAFT_INFO)
    w, h, scale = draft if draft else (*img.size, 1)
    new_h, new_w = shortest_edge_size(h, w, size)
    top, left = _crop_offsets(new_h, new_w, size, size, rounding)
    crop = (left, top, left + size, top + size)
    if scale == 1 and (new_h, new_w) == (h, w):  # nothing to resize: the crop alone, exact either way
        return img.crop(crop)
    if not (window or draft):
        return img.resize((new_w, new_h), resample=resample).crop(crop)
    # Crop-window corners in the decoded image's pixels (a pixel of a 1/scale decode spans `scale` full ones).
    fx, fy = new_w * scale, new_h * scale
    box = (left * w / fx, top * h / fy, min((left + size) * w / fx, img.width),
           min((top + size) * h / fy, img.height))
    return img.resize((size, size), resample=resample, box=box)


def _as_rgb_uint8(img: np.ndarray | Image.Image, what: str) -> np.ndarray | Image.Image:
    """Check/convert the input of the preprocessors: uint8 HWC with 3 channels (gray and RGBA accepted), or
    an RGB PIL image (passed through: PIL resizes it directly)."""
    if isinstance(img, Image.Image):
        if img.mode != "RGB" or 0 in img.size:
            raise ValueError(f"{what} takes an RGB PIL image, got mode {img.mode} of size {img.size}")
        return img
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise TypeError(f"{what} takes a uint8 image (0..255), got dtype {img.dtype}")
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"{what} takes an [H, W, 3] image, got shape {img.shape}")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"{what}: empty image of shape {img.shape}")
    return np.ascontiguousarray(img[:, :, :3])


# ----------------------------------------------------------------------------------------------------------
# The two preprocessing paths


def _clip_table() -> np.ndarray:
    """CLIP's rescale + normalisation of every uint8 level, per channel, with the reference arithmetic
    (``x * (1/255)`` in float64 cast to float32, then ``(x - mean) / std`` in float32): ``[3 * 256]``
    float32, channel ``c``'s value of level ``v`` at ``256 * c + v``. A lookup gives the same floats as
    computing them, in one pass."""
    x = (np.arange(256, dtype=np.float64)[:, None] * (1.0 / 255.0)).astype(np.float32)
    table = (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return np.ascontiguousarray(table.T).reshape(-1)


_CLIP_TABLE = _clip_table()
_CLIP_TABLE_OFFSET = np.arange(3, dtype=np.uint16) * 256


def _pil_input(img: np.ndarray | Image.Image, what: str) -> Image.Image:
    img = _as_rgb_uint8(img, what)
    return img if isinstance(img, Image.Image) else Image.fromarray(img)


def clip_preprocess(img: np.ndarray | Image.Image, size: int = 224, *, window: bool = False) -> np.ndarray:
    """CLIP input preprocessing: uint8 ``[H, W, 3]`` -> float32 ``[size, size, 3]``, CLIP-normalised.

    Same steps and arithmetic as transformers' PIL ``CLIPImageProcessor`` (shortest_edge=size, bicubic,
    crop size x size, rescale 1/255, normalise): resize on uint8 through PIL, rescale in float64 then cast
    to float32, normalise in float32 (done by table lookup, same floats). ``window``: see ``resize_crop``
    (resize only the crop window: faster, pixels within one level; off, the result is the reference's).
    """
    crop = resize_crop(_pil_input(img, "clip_preprocess"), size, Image.Resampling.BICUBIC, "floor", window)
    return np.take(_CLIP_TABLE, np.asarray(crop).astype(np.uint16) + _CLIP_TABLE_OFFSET)


def diffusion_preprocess(img: np.ndarray | Image.Image, resolution: int = 512, random_flip: bool = True,
                         rng: np.random.Generator | int | None = None, *, window: bool = False) -> np.ndarray:
    """Stable Diffusion side preprocessing: uint8 ``[H, W, 3]`` -> float32 ``[R, R, 3]`` in [-1, 1].

    Resize the shortest edge to ``resolution`` (PIL bilinear), center crop (torchvision's offset rounding),
    then flip horizontally with probability 1/2 when ``random_flip``. The flip is drawn from ``rng``
    (a ``np.random.Generator`` or an int seed) so the pipeline stays deterministic; ``random_flip=True``
    without an ``rng`` is an error rather than a silent source of nondeterminism. (Upstream's
    ``center_crop=False`` random-crop variant is not used by any shipped config and is not implemented.)
    ``window``: see ``resize_crop`` (resize only the crop window: faster, pixels within one level).
    """
    crop = resize_crop(_pil_input(img, "diffusion_preprocess"), resolution, Image.Resampling.BILINEAR, "round",
                       window)
    if random_flip:
        if rng is None:
            raise ValueError("diffusion_preprocess(random_flip=True) needs rng (a np.random.Generator or an "
                             "int seed) so the flip is reproducible; or pass random_flip=False")
        if not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(rng)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # ToTensor (x / 255 in float32) then Normalize(0.5, 0.5), in the same float32 order as torchvision
    # (times 2 is exactly divided by 0.5), in place.
    x = np.empty((resolution, resolution, 3), np.float32)
    np.divide(np.asarray(crop), np.float32(255.0), out=x, dtype=np.float32)
    x -= np.float32(0.5)
    x *= np.float32(2.0)
    return x


# ----------------------------------------------------------------------------------------------------------
# Output helpers


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] floats (any shape, e.g. HWC or NHWC; numpy or jax) -> uint8 0..255.

    Same rule as diffusers' postprocessing: ``clip(x / 2 + 0.5, 0, 1) * 255``, rounded. NaN maps to 0.
    """
    x = np.asarray(x, dtype=np.float32)
    x = np.nan_to_num(x, nan=-1.0)
    x = np.clip(x / 2 + 0.5, 0.0, 1.0)
    return np.round(x * 255).astype(np.uint8)


def _as_uint8_image(img: np.ndarray) -> np.ndarray:
    """uint8 images pass through; floats are taken to be in [-1, 1] (the model's image range)."""
    img = np.asarray(img)
    if img.dtype != np.uint8:
        if not np.issubdtype(img.dtype, np.floating):
            raise TypeError(f"expected a uint8 image or floats in [-1, 1], got dtype {img.dtype}")
        img = to_uint8(img)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (3, 4)):
        raise ValueError(f"expected an [H, W], [H, W, 3] or [H, W, 4] image, got shape {img.shape}")
    return img


def save_png(img: np.ndarray, path: PathLike) -> str:
    """Write a uint8 image (or floats in [-1, 1]) as PNG, creating parent folders. Returns the path."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    Image.fromarray(_as_uint8_image(img)).save(path, format="PNG")
    return path


def image_grid(images: Sequence[np.ndarray], cols: int | None = None, pad: int = 2,
               pad_value: int = 255) -> np.ndarray:
    """Tile images (uint8 or [-1, 1] floats; sizes may differ) into one uint8 ``[H, W, 3]`` grid.

    Row-major, ``cols`` per row (default ``ceil(sqrt(n))``), each image at the top-left of a cell as large
    as the largest image, ``pad`` pixels of ``pad_value`` between and around cells.
    """
    imgs = []
    for im in images:
        im = _as_uint8_image(im)
        if im.ndim == 2:
            im = np.repeat(im[:, :, None], 3, axis=2)
        imgs.append(im[:, :, :3])
    if not imgs:
        raise ValueError("image_grid needs at least one image")
    n = len(imgs)
    cols = max(1, min(cols or math.ceil(math.sqrt(n)), n))
    rows = math.ceil(n / cols)
    ch = max(im.shape[0] for im in imgs)
    cw = max(im.shape[1] for im in imgs)
    grid = np.full((rows * ch + (rows + 1) * pad, cols * cw + (cols + 1) * pad, 3), pad_value, np.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, cols)
        y, x = pad + r * (ch + pad), pad + c * (cw + pad)
        grid[y: y + im.shape[0], x: x + im.shape[1]] = im
    return grid
