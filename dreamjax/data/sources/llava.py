"""LLaVA conversations (spec 3.3): a JSON list (or JSONL) of `{id?, image?, conversations: [{from, value}]}`.

The text holds `<image>` (an input image) and `<dream>` (an image the assistant generates) placeholders.
In the old format every placeholder refers to the record's one `image`; in the newer one a message names
its images in `modal_info` (`documents.Conversation.from_llava` reads both). Image paths are relative to
`--images` (default: the JSON file's folder).

A prepared conversation stores each distinct image once, plus `image_slots`: for each placeholder in
reading order, which stored image it takes. A conversation whose image cannot be used is skipped (counted
under the image's reason): tokenization would drop it anyway (`conversation_corrupt_image`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dreamjax.data.documents import Conversation, normalize_roles
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
    parse_json_object,
    relative_name,
)
from dreamjax.data.sources.mmc4 import jsonl_lines

SUFFIXES = (".json", ".jsonl")


def units(input: str, ctx: Context, parts: int) -> list[Unit]:
    out = []
    for i, p in enumerate(list_files(input, SUFFIXES, exclude=ctx.images)):
        images = ctx.images or str(p.parent)
        out.extend(Unit(i, str(p), relative_name(p, input), part, parts, (images,)) for part in range(parts))
    return out


def read(unit: Unit, ctx: Context, counts: Counts) -> Iterator[Outcome]:
    (images,) = unit.options
    for index, raw in _records(unit.path):
        if not unit.owns(index):
            continue
        try:
            if isinstance(raw, Skip):
                raise raw
            yield index, _conversation(raw, images, ctx, counts)
        except Skip as e:
            yield index, e.reason


def _records(path: str) -> Iterator[tuple[int, Any]]:
    """(index, raw record or Skip). A JSON file that does not parse is one `unreadable_file`."""
    if path.endswith(".jsonl"):
        for index, line in jsonl_lines(path):
            if isinstance(line, str):
                yield index, Skip("unreadable_file", line)
                return
            try:
                yield index, parse_json_object(line, path)
            except Skip as e:
                yield index, e
        return
    try:
        data = json.loads(decode_utf8(Path(path).read_bytes(), path))
    except (Skip, json.JSONDecodeError, OSError, RecursionError) as e:
        yield 0, Skip("unreadable_file", f"{path}: {e}")
        return
    if not isinstance(data, list):
        yield 0, Skip("unreadable_file", f"{path}: expected a JSON list of conversations")
        return
    yield from enumerate(data)


def _conversation(raw: Any, images: str, ctx: Context, counts: Counts) -> Prepared:
    if not isinstance(raw, dict):
        raise Skip("malformed_json", "a conversation record is not an object")
    turns = raw.get("conversations")
    if not isinstance(turns, list) or not turns or not all(
            isinstance(t, dict) and "from" in t and "value" in t for t in turns):
        raise Skip("missing_keys", "conversations")
    pairs = [(check_text(t["from"], "from"), check_text(t["value"], "value")) for t in turns]
    try:
        normalize_roles(pairs)
    except ValueError as e:
        raise Skip("unknown_role", str(e)) from e
    if "image" in raw and not isinstance(raw["image"], str):
        raise Skip("missing_keys", "image is not a path")
    try:
        paths = Conversation.from_llava(raw, resolve=lambda p: p).images
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # a malformed modal_info
        raise Skip("missing_keys", f"modal_info: {e}") from e
    if any(p is None or not isinstance(p, str) for p in paths):
        raise Skip("missing_image_reference")
    if "image" in raw and not paths:
        counts.skip("image_unreferenced")
    unique = list(dict.fromkeys(paths))
    blobs = [load_image(Path(images) / check_text(p, "image"), ctx.max_image_side, counts) for p in unique]
    fields: dict[str, Any] = {"turns": [list(t) for t in pairs], "image_slots": [unique.index(p) for p in paths],
                              "image_names": unique}
    if isinstance(raw.get("id"), str | int) and not isinstance(raw.get("id"), bool):
        fields["id"] = check_text(str(raw["id"]), "id")
    return Prepared("conversation", fields, blobs)
