"""WebDataset tar shards: MMC4 documents or image-caption pairs (spec 2.2: every upstream web-scale set).

WebDataset convention: a sample is the group of members sharing a key, the member name up to the first
dot of its file name (`dir/000123.json`, `dir/000123.jpg` -> key `dir/000123`). A sample's `KEY.json` is
either an MMC4 document (`text_list`, `image_info`) or a pair (`caption`, or the caption in `KEY.txt`)
whose image is `KEY.jpg/.jpeg/.png/.webp`. MMC4 images are not named by the sample key: spec 3.2 reads
image `image_name` from member `image_name.split(".")[0] + ".jpg"` (looked up beside the json, then at
the top of the tar).

A tar is read whole by one process (it is already a shard of the data set), with random access to its
members. A truncated tar keeps every sample read before the damage; the rest is counted as unreadable.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Callable, Iterator

from dreamjax.data.sources.base import (
    IMAGE_EXTENSIONS,
    Context,
    Counts,
    Outcome,
    Prepared,
    Skip,
    Unit,
    check_text,
    decode_utf8,
    list_files,
    normalize_image,
    parse_json_object,
    relative_name,
)
from dreamjax.data.sources.mmc4 import build_document, tar_member_name

SUFFIXES = (".tar",)


def units(input: str, ctx: Context, parts: int) -> list[Unit]:
    """One unit per tar (a tar is not split: each part would have to read all of it)."""
    return [Unit(i, str(p), relative_name(p, input)) for i, p in enumerate(list_files(input, SUFFIXES))]


def sample_key(name: str) -> tuple[str, str]:
    """(key, extension) of a member name: `a/b.c.d` -> (`a/b`, `c.d`)."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, ext.lower()


class _Tar:
    """The regular members of a tar by name (first one wins), read on demand."""

    def __init__(self, path: str, counts: Counts):
        self.tf = tarfile.open(path, "r:*")
        self.members: dict[str, tarfile.TarInfo] = {}
        self.order: list[str] = []
        self.broken = False  # the tar ended early: its member list is incomplete
        self.counts = counts
        try:
            while (info := self.tf.next()) is not None:
                self._add(info)
        except (tarfile.ReadError, EOFError, OSError):
            self.broken = True

    def _add(self, info: tarfile.TarInfo) -> None:
        if info.isdir():
            return
        if info.name in self.members:
            self.counts.skip("duplicate_tar_member")
            return
        self.members[info.name] = info
        self.order.append(info.name)

    def read(self, name: str) -> bytes:
        """The member's bytes (raises `Skip`: missing, unreadable, empty)."""
        info = self.members.get(name)
        if info is None:
            raise Skip("image_missing", name)
        try:
            f = self.tf.extractfile(info)
            data = f.read() if f is not None else None
        except (tarfile.TarError, KeyError, OSError, EOFError) as e:
            raise Skip("unreadable_tar_member", f"{name}: {e}") from e
        if data is None:
            raise Skip("unreadable_tar_member", f"{name}: not a regular file")
        if not data:
            raise Skip("image_empty", name)
        return data

    def close(self) -> None:
        self.tf.close()


def read(unit: Unit, ctx: Context, counts: Counts) -> Iterator[Outcome]:
    try:
        tar = _Tar(unit.path, counts)
    except (tarfile.TarError, OSError):
        yield 0, "unreadable_file"
        return
    try:
        yield from _samples(tar, ctx, counts)
    finally:
        tar.close()


def _samples(tar: _Tar, ctx: Context, counts: Counts) -> Iterator[Outcome]:
    groups: dict[str, dict[str, str]] = {}  # key -> extension -> member name, in first-seen order
    for name in tar.order:
        key, ext = sample_key(name)
        groups.setdefault(key, {}).setdefault(ext, name)
    used: set[str] = set()
    index = 0
    for key, members in groups.items():
        if "json" not in members and "txt" not in members:
            continue
        try:
            yield index, _sample(tar, key, members, ctx, counts, used)
        except Skip as e:
            yield index, e.reason
        index += 1
    if tar.broken:
        counts.skip("truncated_tar")
    for name in tar.order:
        if name not in used and name.lower().endswith(IMAGE_EXTENSIONS):
            counts.skip("image_without_sample")


def _sample(tar: _Tar, key: str, members: dict[str, str], ctx: Context, counts: Counts,
            used: set[str]) -> Prepared:
    obj = None
    if "json" in members:
        used.add(members["json"])
        obj = parse_json_object(tar.read(members["json"]), members["json"])
    if obj is not None and "text_list" in obj:
        doc = build_document(obj, _tar_resolver(tar, key, ctx, counts, used), ctx, counts)
        doc.fields.setdefault("id", key)
        return doc
    return _pair(tar, key, members, obj, ctx, counts, used)


def _pair(tar: _Tar, key: str, members: dict[str, str], obj: dict | None, ctx: Context, counts: Counts,
          used: set[str]) -> Prepared:
    if obj is not None and "caption" in obj:
        caption = check_text(obj["caption"], "caption")
    elif "txt" in members:
        used.add(members["txt"])
        caption = check_text(decode_utf8(tar.read(members["txt"]), members["txt"]), "caption")
    else:
        raise Skip("missing_keys", f"{key}: neither text_list nor caption")
    image = next((members[e] for e in ("jpg", "jpeg", "png", "webp") if e in members), None)
    if image is None:
        raise Skip("image_missing", f"{key}: no image member")
    used.add(image)
    fields = {"caption": caption, "id": key}
    return Prepared("pair", fields, [normalize_image(tar.read(image), ctx.max_image_side, counts)])


def _tar_resolver(tar: _Tar, key: str, ctx: Context, counts: Counts, used: set[str]):
    folder = posixpath.dirname(key)

    def resolve(image_name: str) -> tuple[str, Callable[[], bytes]]:
        member = tar_member_name(image_name)
        beside = posixpath.join(folder, member) if folder else member
        name = beside if beside in tar.members else member
        used.add(name)  # referenced (even if later dropped as a duplicate or past the image limit)

        def load() -> bytes:
            return normalize_image(tar.read(name), ctx.max_image_side, counts)

        return name, load

    return resolve
