"""What every source reader shares: the unit of work, the prepared record, skip reasons, image checks.

A reader turns one `Unit` (an input file, or one part of it) into a stream of `(index, Prepared | reason)`
outcomes. `index` is the record's position inside its file, so `(unit.file_index, index)` is a key that
does not depend on how the work was split across processes: that key is what makes `dreamjax prepare`
deterministic. A record that cannot be used is never dropped silently: the reader yields its reason
instead (document-level), and an image dropped from a document that is kept is counted in `Counts`
(image-level).

Images are checked here once, at preparation time, so training never meets an undecodable image:
`normalize_image` decodes every image fully and keeps the original encoded bytes unless the image is too
large or in a mode that other decoders handle badly (CMYK, grayscale, palette, 16-bit, alpha), in which
case it is re-encoded as 8-bit RGB.
"""

from __future__ import annotations

import io
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

# ----------------------------------------------------------------------------------------------------------
# Skip reasons, and what each one counts. A record that is not written is counted once, under the reason
# that stopped it (for a pair or conversation that is its image's reason); an image dropped from a document
# that is kept is counted under its own reason. `dreamjax prepare` reports both totals separately.

REASONS: dict[str, str] = {
    "malformed_json": "a line/member that is not valid JSON, or JSON that is not an object",
    "missing_keys": "a required key is absent or has the wrong type",
    "non_utf8_text": "text that is not valid UTF-8",
    "empty_text_list": "an MMC4 document with no sentences",
    "unknown_role": "a conversation turn whose role is not a known LLaVA role",
    "missing_image_reference": "a conversation placeholder with no image path",
    "unreadable_file": "an input file that stopped being readable (corrupt gzip/zip/parquet/json)",
    "image_missing": "the image file or tar member does not exist",
    "image_empty": "a zero-byte image, or one with a zero-sized side",
    "image_corrupt": "an image whose data cannot be decoded (truncated, damaged)",
    "not_an_image": "a file that no image decoder recognises",
    "image_too_large": "more pixels than PIL's decompression-bomb limit",
    "image_is_url": "an http(s) URL: prepare does not download",
    "image_info_invalid": "an MMC4 image_info entry without a usable image_name/matched_text_index",
    "matched_text_index_out_of_range": "matched_text_index negative or >= len(text_list)",
    "duplicate_image_name": "a second image_info entry naming an image already in the document (dropped)",
    "too_many_images": "images past the most that fit in the context (spec 3.2 stops there)",
    "unreadable_tar_member": "a tar member whose data cannot be read (truncated tar, dangling link)",
    "image_unreferenced": "a conversation image that no <image>/<dream> placeholder uses",
    "image_without_sample": "a tar image member that no sample uses",
    # notes: the record is written, but changed
    "document_truncated": "an MMC4 document cut at the first image that does not fit (spec 3.2)",
    "duplicate_tar_member": "a tar member name seen before in the same tar (the first one is used)",
    "truncated_tar": "a tar that ends early: whatever followed the damage is lost, uncountable",
}
NOTES = ("document_truncated", "duplicate_tar_member", "truncated_tar")  # counted, but nothing was dropped for them

# PIL's own hard limit (it raises above 2 * MAX_IMAGE_PIXELS); kept as a constant so a process that disabled
# PIL's guard (MAX_IMAGE_PIXELS = None) still does not decode decompression bombs here.
MAX_PIXELS = 2 * 89_478_485
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
KEEP_FORMATS = ("JPEG", "PNG", "WEBP")  # formats kept as they are when already 8-bit RGB


class Skip(Exception):
    """Raised inside a reader for one record or one image that cannot be used; `reason` is a REASONS key."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class Unit(NamedTuple):
    """One piece of work: record `i` of file `path` belongs to this unit when `i % parts == part`.

    `name` is the path relative to the input (what record ids and shard hashing use, so the output does
    not depend on where the input lives). `options` carries format-specific settings (picklable).
    """

    file_index: int
    path: str
    name: str
    part: int = 0
    parts: int = 1
    options: tuple = ()

    def owns(self, index: int) -> bool:
        return index % self.parts == self.part


@dataclass
class Prepared:
    """A record ready to serialize: `kind` ("pair", "interleaved", "conversation"), JSON-able `fields`
    and the encoded `images` (their meaning per kind is in `data/prepared.py`)."""

    kind: str
    fields: dict[str, Any]
    images: list[bytes] = field(default_factory=list)


@dataclass
class Counts:
    """Image-level counts of one unit (document-level outcomes are counted by the caller)."""

    skipped: Counter = field(default_factory=Counter)
    reencoded: Counter = field(default_factory=Counter)

    def skip(self, reason: str, n: int = 1) -> None:
        assert reason in REASONS, reason
        if n:
            self.skipped[reason] += n


@dataclass(frozen=True)
class Context:
    """Settings shared by all readers."""

    images: str | None = None  # image folder (None: the reader's default)
    max_image_side: int = 1024  # longer side above this is downscaled; 0 disables


Outcome = tuple[int, "Prepared | str"]  # (index in file, record or document-level skip reason)


# ----------------------------------------------------------------------------------------------------------
# Images


def read_image_file(path: str | os.PathLike) -> bytes:
    """The bytes of an image file; a missing or empty file raises `Skip`."""
    try:
        data = Path(path).read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        raise Skip("image_missing", str(path)) from e
    except OSError as e:
        raise Skip("image_corrupt", f"{path}: {e}") from e
    if not data:
        raise Skip("image_empty", str(path))
    return data


def normalize_image(data: bytes, max_side: int, counts: Counts | None = None) -> bytes:
    """Check that `data` decodes; return it unchanged, or re-encoded as 8-bit RGB when needed.

    Re-encoding happens only when the longer side exceeds `max_side` (0: never) or the image is not
    8-bit RGB JPEG/PNG/WebP, so most images keep their original bytes (no generation loss, fast). The
    reasons for re-encoding are counted in `counts.reencoded`. Raises `Skip` for an unusable image.
    """
    if not data:
        raise Skip("image_empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                return _normalize_open(im, data, max_side, counts)
    except Skip:
        raise
    except Image.DecompressionBombError as e:
        raise Skip("image_too_large", str(e)) from e
    except UnidentifiedImageError as e:
        raise Skip("not_an_image", str(e)) from e
    except Exception as e:  # PIL raises many types for bad data (OSError, SyntaxError, struct.error, ...)
        raise Skip("image_corrupt", f"{type(e).__name__}: {e}") from e


def _normalize_open(im: Image.Image, data: bytes, max_side: int, counts: Counts | None) -> bytes:
    w, h = im.size
    if w == 0 or h == 0:
        raise Skip("image_empty", f"{w}x{h}")
    if w * h > MAX_PIXELS:
        raise Skip("image_too_large", f"{w}x{h}")
    why = _reencode_reasons(im, data, max_side)
    if max_side and max(w, h) > max_side and im.format == "JPEG":
        im.draft("RGB", _fit(w, h, max_side))  # decode big JPEGs at a reduced scale (memory, speed)
    im.load()  # decode every pixel now: truncated data fails here, not during training
    if not why:
        return data
    if counts is not None:
        counts.reencoded.update(why)
    rgb = _to_rgb(im)
    if max_side and max(rgb.size) > max_side:
        rgb = rgb.resize(_fit(*rgb.size, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if im.format == "JPEG":  # a lossy source stays JPEG; everything else becomes lossless PNG
        rgb.save(out, format="JPEG", quality=95)
    else:
        rgb.save(out, format="PNG")
    return out.getvalue()


def _reencode_reasons(im: Image.Image, data: bytes, max_side: int) -> list[str]:
    why = []
    if im.mode != "RGB":
        why.append(f"mode_{im.mode}")
    elif im.format == "PNG" and len(data) > 24 and data[24] == 16:  # IHDR bit depth: PIL reads 16-bit RGB as RGB
        why.append("16_bit")
    if im.format not in KEEP_FORMATS:
        why.append(f"format_{im.format}")
    if max_side and max(im.size) > max_side:
        why.append("downscaled")
    return why


def _fit(w: int, h: int, max_side: int) -> tuple[int, int]:
    """(w, h) scaled so the longer side is `max_side` (each side at least 1)."""
    scale = max_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB. 16/32-bit integer and float modes are scaled to 0..255 (PIL's convert would clip them);
    alpha is dropped, not composited, as upstream's `convert("RGB")` does, so decoded pixels agree."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode != "F" and arr.max(initial=0) > 255 else 255.0
        if im.mode == "F":
            top = max(float(arr.max(initial=1.0)), 1e-12)
        arr = np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    return im.convert("RGB")


def load_image(path: str | os.PathLike, max_side: int, counts: Counts | None = None) -> bytes:
    """Read and normalize an image file (raises `Skip`)."""
    return normalize_image(read_image_file(path), max_side, counts)


# ----------------------------------------------------------------------------------------------------------
# Input files and text checks


def list_files(input: str | os.PathLike, suffixes: tuple[str, ...], exclude: str | None = None) -> list[Path]:
    """`input` itself if it is a file, else every file under it whose name ends in one of `suffixes`
    (sorted, so the file order, and with it the output, is deterministic). `exclude`: a folder to skip."""
    root = Path(input)
    if root.is_file():
        return [root]
    skip = Path(exclude).resolve() if exclude else None
    files = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or not p.name.lower().endswith(suffixes):
            continue
        if skip is not None and skip in p.resolve().parents:
            continue
        files.append(p)
    return files


def relative_name(path: Path, input: str | os.PathLike) -> str:
    root = Path(input)
    return path.name if root.is_file() else path.relative_to(root).as_posix()


def check_text(value: Any, what: str) -> str:
    """A str that encodes as UTF-8 (JSON `\\ud800` escapes give lone surrogates that do not)."""
    if not isinstance(value, str):
        raise Skip("missing_keys", f"{what} is {type(value).__name__}, not str")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Skip("non_utf8_text", what) from e
    return value


def decode_utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Skip("non_utf8_text", what) from e


def parse_json_object(data: bytes | str, what: str) -> dict[str, Any]:
    """A JSON object from bytes/str (raises `Skip` for non-UTF-8 bytes, bad JSON, or a non-object)."""
    import json

    text = decode_utf8(data, what) if isinstance(data, bytes) else data
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise Skip("malformed_json", f"{what}: {e}") from e
    if not isinstance(obj, dict):
        raise Skip("malformed_json", f"{what}: a JSON {type(obj).__name__}, not an object")
    return obj
