"""Reading what `dreamjax prepare` wrote: ArrayRecord shards of serialized records, plus `info.json`.

One record is `MAGIC + uint32 header length + JSON header + image bytes`, little-endian. The header holds
the record's `kind` and fields and the byte length of each image (`image_sizes`); the images follow,
still encoded (JPEG/PNG/WebP), so a record is small and decoding happens only where an image is used.

    kind "pair":          {"caption", "id"?}                                       -> ImageTextPair
    kind "interleaved":   {"text_list", "images": [{"image_name", "matched_text_index",
                           "matched_sim"?}], "instruction"?, "id"?}             -> InterleavedDoc,
                                                                                   InstructInterleavedDoc
    kind "conversation":  {"turns": [[role, text]], "image_slots": [k], "image_names", "id"?}
                                                                                -> Conversation

`open_prepared(dir)` gives a random-access, picklable source (what `grain.MapDataset.source` takes) of the
typed records of `data/documents.py`, with images as encoded `bytes` (`ImageRef`).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dreamjax.data.documents import Conversation, ImageTextPair, InstructInterleavedDoc, InterleavedDoc, Record

MAGIC = b"DJX1"
INFO_FILE = "info.json"
REPORT_FILE = "report.json"
KINDS = ("pair", "interleaved", "conversation")
_LEN = struct.Struct("<I")


def encode_record(kind: str, fields: dict[str, Any], images: Sequence[bytes]) -> bytes:
    """Serialize one record (deterministic: sorted keys, no whitespace)."""
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")
    header = dict(fields, kind=kind, image_sizes=[len(b) for b in images])
    head = json.dumps(header, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return b"".join([MAGIC, _LEN.pack(len(head)), head, *images])


def decode_raw(data: bytes) -> tuple[dict[str, Any], list[bytes]]:
    """bytes -> (header dict, list of encoded images)."""
    if data[:4] != MAGIC:
        raise ValueError("not a dreamjax prepared record (bad magic)")
    (n,) = _LEN.unpack_from(data, 4)
    start = 8 + n
    header = json.loads(data[8:start].decode("utf-8"))
    images = []
    for size in header["image_sizes"]:
        images.append(bytes(data[start: start + size]))
        start += size
    return header, images


def to_record(header: dict[str, Any], images: list[bytes]) -> Record:
    """A decoded header and its images -> the typed record of `data/documents.py`."""
    kind = header["kind"]
    if kind == "pair":
        return ImageTextPair(image=images[0], caption=header["caption"])
    if kind == "interleaved":
        pairs = [(img, info["matched_text_index"]) for img, info in zip(images, header["images"], strict=True)]
        if "instruction" in header:
            return InstructInterleavedDoc(instruction=header["instruction"], text_list=header["text_list"],
                                          images=pairs)
        return InterleavedDoc(text_list=header["text_list"], images=pairs)
    if kind == "conversation":
        turns = [(role, text) for role, text in header["turns"]]
        return Conversation(turns=turns, images=[images[k] for k in header["image_slots"]])
    raise ValueError(f"unknown record kind {kind!r}")


def decode_record(data: bytes) -> Record:
    return to_record(*decode_raw(data))


class PreparedSource(Sequence):
    """Random access to the typed records of a prepared directory (picklable, for Grain workers).

    `raw(i)` gives the header dict and images instead (ids, image names, matched_sim...).
    """

    def __init__(self, shard_paths: Sequence[str]):
        import grain  # lazily: reading shards is the only part that needs it

        self.shard_paths = list(shard_paths)
        self._source = grain.sources.ArrayRecordDataSource(self.shard_paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return decode_record(self._source[self._check(index)])

    def raw(self, index: int) -> tuple[dict[str, Any], list[bytes]]:
        return decode_raw(self._source[self._check(index)])

    def _check(self, index: int) -> int:
        index = int(index)
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"record {index} out of range ({n} records)")
        return index

    def __repr__(self):
        return f"PreparedSource({len(self.shard_paths)} shards, {len(self)} records)"


def open_prepared(directory: str | Path) -> tuple[PreparedSource, dict[str, Any]]:
    """(source of typed records, info dict) of a directory written by `dreamjax prepare`.

    Raises ValueError, with one line saying what is wrong, for a missing directory, one without
    `info.json` or shards, or one with no records.
    """
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"prepared data directory {str(root)!r} does not exist")
    info_path = root / INFO_FILE
    if not info_path.is_file():
        raise ValueError(f"{str(root)!r} is not a prepared data directory (no {INFO_FILE}; run `dreamjax prepare`)")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        shards = [root / s["name"] for s in info["shards"]]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(info_path)!r} is not a valid prepare info file ({e})") from e
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise ValueError(f"{str(root)!r}: {len(missing)} shard(s) listed in {INFO_FILE} are missing, e.g. {missing[0]}")
    if not shards or not info.get("num_records"):
        raise ValueError(f"{str(root)!r} holds no records (prepare wrote an empty data set)")
    return PreparedSource([str(p) for p in shards]), info


def open_mixture(paths: Mapping[str, str] | None, mixture: Mapping[str, float] | None
                 ) -> tuple[dict[str, PreparedSource], dict[str, float]]:
    """(sources, weights) for `data.source = "prepared"`: `paths` maps a name to a prepared directory,
    `mixture` a name to its weight (empty: every path, equally weighted).

    Everything is checked here, before a model is built or compiled, and each problem is one ValueError
    line: no paths, a mixture name without a path, a negative weight, a missing or empty directory. A path
    that the mixture does not name (or gives weight 0) is not opened, so one `paths` dict can serve every
    stage of a recipe.
    """
    paths = dict(paths or {})
    if not paths:
        raise ValueError("config.data.paths is empty: with data.source='prepared' it maps each mixture name to a "
                         "directory written by `dreamjax prepare`")
    weights = {str(k): float(v) for k, v in dict(mixture or {}).items()} or dict.fromkeys(paths, 1.0)
    negative = sorted(n for n, w in weights.items() if w < 0)
    if negative:
        raise ValueError(f"config.data.mixture: negative weights for {negative}")
    unknown = sorted(n for n, w in weights.items() if w > 0 and n not in paths)
    if unknown:
        raise ValueError(f"config.data.mixture names {unknown} but config.data.paths has no directory for them "
                         f"(paths: {sorted(paths)})")
    sources = {}
    for name in sorted(n for n, w in weights.items() if w > 0):
        try:
            sources[name], _ = open_prepared(str(paths[name]))
        except ValueError as e:
            raise ValueError(f"config.data.paths[{name!r}]: {e}") from None
    return sources, weights
