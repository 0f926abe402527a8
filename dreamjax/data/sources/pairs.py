"""Image-caption pairs (spec 3.1) from TSV (with a header row), JSONL or Parquet files.

The image column holds a path (relative paths resolve against `--images`, else the input file's folder),
or, in Parquet/JSONL exported from HF datasets, the encoded bytes themselves (`bytes`, or `{"bytes": ...}`).
Column names: `--image-column` (default `image`, falling back to `url`, `image_path`, `filepath`) and
`--caption-column` (default `caption`, falling back to `text`). A name given explicitly has no fallback.
URLs are not downloaded (prepare runs offline): such a pair is counted as `image_is_url`.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dreamjax.data.sources.base import (
    Context,
    Counts,
    Outcome,
    Prepared,
    Skip,
    Unit,
    check_text,
    decode_utf8,
    list_files,
    load_image,
    normalize_image,
    parse_json_object,
    relative_name,
)
from dreamjax.data.sources.mmc4 import jsonl_lines

SUFFIXES = (".tsv", ".jsonl", ".jsonl.gz", ".parquet")
IMAGE_COLUMNS = ("image", "url", "image_path", "filepath")
CAPTION_COLUMNS = ("caption", "text")


def units(input: str, ctx: Context, parts: int, image_column: str | None = None,
          caption_column: str | None = None) -> list[Unit]:
    image_cols = (image_column,) if image_column else IMAGE_COLUMNS
    caption_cols = (caption_column,) if caption_column else CAPTION_COLUMNS
    out = []
    for i, p in enumerate(list_files(input, SUFFIXES, exclude=ctx.images)):
        images = ctx.images or str(p.parent)
        for part in range(parts):
            out.append(Unit(i, str(p), relative_name(p, input), part, parts, (images, image_cols, caption_cols)))
    return out


def read(unit: Unit, ctx: Context, counts: Counts) -> Iterator[Outcome]:
    images, image_cols, caption_cols = unit.options
    for index, row in _rows(unit):
        if not unit.owns(index):
            continue
        try:
            if isinstance(row, Skip):
                raise row
            yield index, _pair(row, images, image_cols, caption_cols, ctx, counts)
        except Skip as e:
            yield index, e.reason


def _rows(unit: Unit) -> Iterator[tuple[int, dict[str, Any] | Skip]]:
    """(row number, row dict or the Skip for that row). A file that breaks mid-way ends with one
    `unreadable_file` row."""
    path = unit.path
    if path.endswith(".parquet"):
        yield from _parquet_rows(path)
        return
    is_tsv = path.endswith(".tsv")
    header: list[str] | None = None
    index = 0
    for _, line in jsonl_lines(path):
        if isinstance(line, str):  # the file stopped being readable
            yield index, Skip("unreadable_file", line)
            return
        try:
            if is_tsv and header is None:
                header = _tsv_fields(line, unit.name)
                continue
            row = _tsv_row(line, header, unit.name) if is_tsv else parse_json_object(line, unit.name)
        except Skip as e:
            if header is None and is_tsv:  # without a header no row can be read
                yield index, Skip("unreadable_file", f"{path}: header row: {e}")
                return
            row = e
        yield index, row
        index += 1


def _tsv_fields(line: bytes, what: str) -> list[str]:
    text = decode_utf8(line, what).rstrip("\r\n")
    return next(csv.reader([text], delimiter="\t"))


def _tsv_row(line: bytes, header: list[str], what: str) -> dict[str, Any]:
    values = _tsv_fields(line, what)
    return {k: v for k, v in zip(header, values, strict=False)}


def _parquet_rows(path: str) -> Iterator[tuple[int, dict[str, Any] | Skip]]:
    import pyarrow.parquet as pq

    index = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            for row in batch.to_pylist():
                yield index, row
                index += 1
    except (OSError, ValueError, UnicodeDecodeError) as e:  # pyarrow's ArrowInvalid is a ValueError
        yield index, Skip("unreadable_file", f"{path}: {e}")


def _column(row: dict[str, Any], names: tuple[str, ...]) -> Any:
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    raise Skip("missing_keys", f"none of {names}")


def _pair(row: dict[str, Any], images: str, image_cols: tuple[str, ...], caption_cols: tuple[str, ...],
          ctx: Context, counts: Counts) -> Prepared:
    caption = check_text(_column(row, caption_cols), "caption")
    image = _image_bytes(_column(row, image_cols), images, ctx, counts)
    fields: dict[str, Any] = {"caption": caption}
    for key in ("id", "key"):
        if isinstance(row.get(key), str | int) and not isinstance(row.get(key), bool):
            fields["id"] = check_text(str(row[key]), key)
            break
    return Prepared("pair", fields, [image])


def _image_bytes(value: Any, images: str, ctx: Context, counts: Counts) -> bytes:
    if isinstance(value, dict):  # HF datasets' Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes | bytearray):
        return normalize_image(bytes(value), ctx.max_image_side, counts)
    if not isinstance(value, str) or not value:
        raise Skip("missing_keys", "image column is not a path")
    if value.startswith(("http://", "https://")):
        raise Skip("image_is_url", value)
    path = value if os.path.isabs(value) else str(Path(images) / value)
    return load_image(path, ctx.max_image_side, counts)
