"""MMC4 interleaved documents (spec 3.2) from JSONL files (plain, `.jsonl.gz`, `.jsonl.zip`).

One document per line: `{"text_list": [str], "image_info": [{"image_name", "matched_text_index",
"matched_sim"?}], "instruction"?}`. Images live in a folder, found by `image_name` (or, as in MMC4 tar
shards, by the name before its first dot plus `.jpg`). A document with an `instruction` is an InstructMMC4
document (spec 3.4) and is kept as one.

Spec 3.2 keeps a document when one of its images is bad, so a bad image is dropped from the document and
counted under its reason; only a document without usable text is skipped. `build_document` is shared with
the WebDataset reader, which finds the images inside the tar instead.
"""

from __future__ import annotations

import gzip
import io
import math
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dreamjax.data.documents import mmc4_member_name
from dreamjax.data.sources.base import (
    Context,
    Counts,
    Outcome,
    Prepared,
    Skip,
    Unit,
    check_text,
    list_files,
    normalize_image,
    parse_json_object,
    read_image_file,
    relative_name,
)

SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zip")

# The most images a document can use (spec 3.2): the cheapest image block is DRM (creation_only mode,
# `LayoutConfig().drm_len` = 64 + 2 tokens) and the loop stops when `len(ids) + len(block) + 2 > 2048`
# with BOS already in `ids`, so at most (2048 - 3) // 66 = 30 images ever fit, whatever the mode. Images
# past that are dropped here, exactly where tokenization would stop (kept in sync with LayoutConfig by a test).
MAX_IMAGES = (2048 - 3) // (64 + 2)

# image_name -> (dedupe key, a function returning the encoded bytes, which raises Skip)
Resolver = Callable[[str], tuple[str, Callable[[], bytes]]]


def units(input: str, ctx: Context, parts: int) -> list[Unit]:
    """Every JSONL file of `input`, each split into `parts` interleaved parts (documents `i % parts`)."""
    images = images_dir(input, ctx)
    files = list_files(input, SUFFIXES, exclude=images)
    return [Unit(i, str(p), relative_name(p, input), part, parts, (images,))
            for i, p in enumerate(files) for part in range(parts)]


def images_dir(input: str, ctx: Context) -> str:
    """`--images`, else `INPUT/images` for a folder input; for a file input, the `images` folder beside it
    if there is one, else the file's own folder."""
    if ctx.images:
        return ctx.images
    root = Path(input)
    if root.is_dir():
        return str(root / "images")
    beside = root.parent / "images"
    return str(beside) if beside.is_dir() else str(root.parent)


def read(unit: Unit, ctx: Context, counts: Counts) -> Iterator[Outcome]:
    (images,) = unit.options
    resolve = folder_resolver(images, ctx, counts)
    for index, line in jsonl_lines(unit.path):
        if not unit.owns(index):
            continue
        try:
            if isinstance(line, str):
                raise Skip("unreadable_file", line)
            yield index, build_document(parse_json_object(line, unit.name), resolve, ctx, counts)
        except Skip as e:
            yield index, e.reason


def jsonl_lines(path: str) -> Iterator[tuple[int, bytes | str]]:
    """(line number, raw bytes) of every non-blank line. A file that breaks mid-way (corrupt gzip/zip)
    yields, in place of the rest, one entry whose value is a `str` saying why."""
    index = 0
    try:
        with _open_text_bytes(path) as f:
            for line in f:
                if line.strip():
                    yield index, line
                    index += 1
    except (OSError, EOFError, zipfile.BadZipFile, gzip.BadGzipFile) as e:
        yield index, f"{path}: {e}"


def _open_text_bytes(path: str) -> io.BufferedIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zip"):
        archive = zipfile.ZipFile(path)
        names = sorted(n for n in archive.namelist() if not n.endswith("/"))
        if len(names) != 1:
            raise OSError(f"{path}: expected one file in the zip, found {len(names)}")
        return archive.open(names[0])
    return open(path, "rb")


def folder_resolver(images: str, ctx: Context, counts: Counts) -> Resolver:
    """Images by `image_name` in a folder, falling back to the tar naming rule (stem + `.jpg`)."""
    root = Path(images)

    def resolve(name: str) -> tuple[str, Callable[[], bytes]]:
        path = root / name
        if not path.is_file() and (root / tar_member_name(name)).is_file():
            path = root / tar_member_name(name)
        return str(path), lambda: normalize_image(read_image_file(path), ctx.max_image_side, counts)

    return resolve


def tar_member_name(image_name: str) -> str:
    """Spec 3.2: the image of `image_name` is tar member `image_name.split(".")[0] + ".jpg"` (one rule for
    the readers and `InterleavedDoc.from_mmc4`)."""
    return mmc4_member_name(image_name)


def build_document(obj: dict[str, Any], resolve: Resolver, ctx: Context, counts: Counts,
                   max_images: int = MAX_IMAGES) -> Prepared:
    """An MMC4 json object -> a prepared "interleaved" record (raises `Skip` for a document-level problem)."""
    if "text_list" not in obj or not isinstance(obj["text_list"], list):
        raise Skip("missing_keys", "text_list")
    text_list = [check_text(t, "text_list") for t in obj["text_list"]]
    if not text_list:
        raise Skip("empty_text_list")
    infos = obj.get("image_info", [])
    if not isinstance(infos, list):
        raise Skip("missing_keys", "image_info is not a list")
    fields: dict[str, Any] = {"text_list": text_list}
    if "instruction" in obj:
        fields["instruction"] = check_text(obj["instruction"], "instruction")
    if "id" in obj and isinstance(obj["id"], str | int):
        fields["id"] = check_text(str(obj["id"]), "id")
    candidates = _valid_infos(infos, len(text_list), resolve, counts)
    entries, images = [], []
    for k, (index, info, load) in enumerate(candidates):
        if len(images) == max_images:  # spec 3.2: stop at the first image that does not fit
            counts.skip("too_many_images", len(candidates) - k)
            counts.skip("document_truncated")
            fields["text_list"] = text_list[: index + 1]
            break
        try:
            images.append(load())
        except Skip as e:
            counts.skip(e.reason)
            continue
        entries.append(info)
    fields["images"] = entries
    return Prepared("interleaved", fields, images)


def _valid_infos(infos: list, n_text: int, resolve: Resolver, counts: Counts):
    """The usable image_info entries as (matched_text_index, entry, loader), sorted stably by the index
    (spec 3.2 order); bad entries and duplicates are counted and left out."""
    seen: set[str] = set()
    out = []
    for info in infos:
        if not isinstance(info, dict) or not isinstance(info.get("image_name"), str):
            counts.skip("image_info_invalid")
            continue
        try:
            name = check_text(info["image_name"], "image_name")
        except Skip as e:
            counts.skip(e.reason)
            continue
        key, load = resolve(name)
        index = info.get("matched_text_index")
        if isinstance(index, bool) or not isinstance(index, int):
            counts.skip("image_info_invalid")
            continue
        if not 0 <= index < n_text:
            counts.skip("matched_text_index_out_of_range")
            continue
        if key in seen:
            counts.skip("duplicate_image_name")
            continue
        seen.add(key)
        entry = {"image_name": name, "matched_text_index": index}
        sim = info.get("matched_sim")
        if isinstance(sim, int | float) and not isinstance(sim, bool) and math.isfinite(sim):
            entry["matched_sim"] = float(sim)
        out.append((index, entry, load))
    out.sort(key=lambda t: t[0])  # stable: equal indices keep their original order
    return out
