"""The built-in shapes world (`dreamjax.data.synthetic`) written out like any other data set.

So the demo can train from prepared shards through exactly the path real data takes. `--input` is not a
path here but `KIND:SPLIT:N[:SEED[:RESOLUTION]]`, e.g. `documents:train:1000` or `pairs:heldout:64:0:32`
(KIND one of pairs, conversations, documents, instruct_documents; SEED default 0, RESOLUTION default 64).
Records come from the world's raw upstream schemas (spec 3), with PNG images.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from dreamjax.data.documents import placeholders_in
from dreamjax.data.sources.base import Context, Counts, Outcome, Prepared, Skip, Unit, normalize_image


def parse_spec(spec: str) -> tuple[str, str, int, int, int]:
    """`KIND:SPLIT:N[:SEED[:RESOLUTION]]` -> (kind, split, n, seed, resolution); ValueError if malformed."""
    from dreamjax.data import synthetic  # imported lazily: it pulls in the tokenizer (transformers)

    parts = spec.split(":")
    usage = "synthetic --input must be KIND:SPLIT:N[:SEED[:RESOLUTION]], e.g. documents:train:1000"
    if not 3 <= len(parts) <= 5:
        raise ValueError(f"{usage}; got {spec!r}")
    kind, split = parts[0], parts[1]
    if kind not in synthetic.KINDS or split not in synthetic.SPLITS:
        raise ValueError(f"{usage} (KIND in {synthetic.KINDS}, SPLIT in {synthetic.SPLITS}); got {spec!r}")
    try:
        n, seed, res = int(parts[2]), int(parts[3]) if len(parts) > 3 else 0, int(parts[4]) if len(parts) > 4 else 64
    except ValueError as e:
        raise ValueError(f"{usage}; got {spec!r}") from e
    if n <= 0 or seed < 0 or res < 8:
        raise ValueError(f"{usage} with N > 0, SEED >= 0, RESOLUTION >= 8; got {spec!r}")
    return kind, split, n, seed, res


def units(input: str, ctx: Context, parts: int) -> list[Unit]:
    kind, split, n, seed, res = parse_spec(input)
    return [Unit(0, input, f"shapes-{kind}-{split}", part, parts, (kind, split, n, seed, res))
            for part in range(min(parts, n))]


def read(unit: Unit, ctx: Context, counts: Counts) -> Iterator[Outcome]:
    from dreamjax.data import synthetic

    kind, split, n, seed, res = unit.options
    world = synthetic.ShapesWorld(seed=seed, resolution=res, image_format="png")
    for index in range(unit.part, n, unit.parts):
        raw = world.record(kind, split, index, format="raw")
        try:
            yield index, _prepared(kind, raw, ctx, counts)
        except Skip as e:  # cannot happen with generated images, but stay uniform with the other readers
            yield index, e.reason


def _prepared(kind: str, raw: dict[str, Any], ctx: Context, counts: Counts) -> Prepared:
    def image(data: bytes) -> bytes:
        return normalize_image(data, ctx.max_image_side, counts)

    if kind == "pairs":
        return Prepared("pair", {"id": raw["id"], "caption": raw["caption"]}, [image(raw["image"])])
    if kind == "conversations":
        turns = [[t["from"], t["value"]] for t in raw["conversations"]]
        slots = [0] * sum(len(placeholders_in(text)) for _, text in turns)
        fields = {"id": raw["id"], "turns": turns, "image_slots": slots, "image_names": [f"{raw['id']}.png"]}
        return Prepared("conversation", fields, [image(raw["image"])])
    fields = {"id": raw["id"], "text_list": list(raw["text_list"]), "images": list(raw["image_info"])}
    if "instruction" in raw:
        fields["instruction"] = raw["instruction"]
    return Prepared("interleaved", fields, [image(b) for b in raw["images"]])
