"""PyTorch weight files -> Flax leaves, one tensor at a time, placed straight onto their devices.

`TensorFiles` opens a weights directory (safetensors or torch `.bin`, sharded with an `*.index.json` or
not) lazily: names, shapes and dtypes come from the headers, and a tensor is read only when asked for.
Reads never pin the file in memory: a safetensors tensor is read into a fresh buffer (the page cache
holds the file, not this process), and a `.bin` file is memory-mapped by torch but re-opened after every
`TORCH_REMAP_BYTES` read, so its touched pages are unmapped instead of adding up to the file's size.
`MultiFiles` joins several of them under key prefixes (the released DreamLLM layout is four files).

`stream_to_flax` plans the whole mapping from the names and shapes alone (so a missing, unexpected or
misshapen key fails before anything is read), then hands each Flax leaf to `place` as a `SourceLeaf`,
which reads the leaf whole or, for a stacked (scanned) leaf, layer by layer: the host holds one leaf, or
one layer of it, at a time, never a second copy of the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from dreamjax.convert.core import (
    ConversionError,
    Rule,
    _fmt_keys,
    _to_flax_layout,
    _torch_name_for,
    flatten,
    flax_shape,
    plan_keys,
    to_numpy,
    torch_shape,
    unflatten,
)

WEIGHT_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin",
                "diffusion_pytorch_model.bin")
INDEX_FILES = tuple(f + ".index.json" for f in WEIGHT_FILES)
# A torch `.bin` mapping is dropped and re-opened after this many bytes were read through it, so the
# file pages it touched stop counting as this process's memory (they stay in the page cache).
TORCH_REMAP_BYTES = 256 << 20

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _safetensors_dtype(name: str, file: str):
    if name == "BF16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if name not in _SAFETENSORS_DTYPES:
        raise ConversionError(f"{file}: unsupported safetensors dtype {name}")
    return np.dtype(_SAFETENSORS_DTYPES[name])


class _Safetensors:
    """One .safetensors file: the JSON header read once, each tensor read into its own buffer on access."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
        except (OSError, ValueError) as e:
            raise ConversionError(f"cannot read safetensors file {path}: {e}") from e
        header.pop("__metadata__", None)
        self.entries = header
        self.data_start = 8 + n

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def dtype(self, key: str) -> np.dtype:
        return _safetensors_dtype(self.entries[key]["dtype"], self.path)

    def get(self, key: str) -> np.ndarray:
        e = self.entries[key]
        start, end = e["data_offsets"]
        buf = np.empty(end - start, np.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + start)
            if f.readinto(memoryview(buf)) != end - start:
                raise ConversionError(f"{self.path}: truncated file (tensor {key})")
        return buf.view(self.dtype(key)).reshape(e["shape"])


class _TorchBin:
    """One torch `.bin` / `.pt` file, memory-mapped (torch's zip format), tensors copied out on access."""

    def __init__(self, path: str):
        self.path = path
        self._sd = self._load()
        self.entries = {k: (tuple(v.shape), to_numpy(v.reshape(-1)[:0]).dtype) for k, v in self._sd.items()}
        self._read = 0

    def _load(self) -> dict:
        try:
            import torch
        except ImportError as e:
            raise ConversionError(f"reading {self.path} needs torch: pip install 'dreamjax[torch]'") from e
        try:
            sd = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise ConversionError(f"cannot read torch checkpoint {self.path}: {e}") from e
        if not isinstance(sd, Mapping):
            raise ConversionError(f"{self.path} does not hold a state dict (got {type(sd).__name__})")
        bad = [k for k, v in sd.items() if not hasattr(v, "shape")]
        if bad:
            raise ConversionError(f"{self.path}: entries that are not tensors: {_fmt_keys(bad)}")
        return dict(sd)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][0]

    def dtype(self, key: str) -> np.dtype:
        return self.entries[key][1]

    def get(self, key: str) -> np.ndarray:
        if self._sd is None:
            self._sd = self._load()
        out = np.array(to_numpy(self._sd[key]), copy=True)  # a copy: the result must not pin the mapping
        self._read += out.nbytes
        if self._read >= TORCH_REMAP_BYTES:  # unmap what was touched; re-open on the next read
            self._sd, self._read = None, 0
        return out


def _open(path: str):
    if path.endswith(".safetensors"):
        return _Safetensors(path)
    if path.endswith((".bin", ".pt", ".pth")):
        return _TorchBin(path)
    raise ConversionError(f"unknown weights file type (want .safetensors, .bin, .pt): {path}")


class TensorFiles:
    """The tensors of a weights file, or of a directory holding one (sharded with an index, or not)."""

    def __init__(self, path: str | os.PathLike, what: str = "weights"):
        path = os.fspath(path)
        if not os.path.exists(path):
            raise ConversionError(f"{what}: path does not exist: {path}")
        self.path = path
        self._where: dict[str, Any] = {}
        for file in self._files(path, what):
            opened = _open(file)
            for key in opened.entries:
                if key in self._where:
                    raise ConversionError(f"{what}: {key} is in both {self._where[key].path} and {file}")
                self._where[key] = opened

    @staticmethod
    def _files(path: str, what: str) -> list[str]:
        if not os.path.isdir(path):
            return [path]
        names = set(os.listdir(path))
        for index in INDEX_FILES:
            if index in names:
                try:
                    with open(os.path.join(path, index)) as f:
                        shards = sorted(set(json.load(f)["weight_map"].values()))
                except (OSError, ValueError, KeyError) as e:
                    raise ConversionError(f"{what}: cannot read {os.path.join(path, index)}: {e}") from e
                missing = [s for s in shards if s not in names]
                if missing:
                    raise ConversionError(f"{what}: {index} in {path} names shard files that are missing: "
                                          f"{_fmt_keys(missing)}")
                return [os.path.join(path, s) for s in shards]
        for name in WEIGHT_FILES:
            if name in names:
                return [os.path.join(path, name)]
        raise ConversionError(f"{what}: no weights file in {path} (looked for {', '.join(WEIGHT_FILES)} and "
                              f"their .index.json); found: {_fmt_keys(names) or 'nothing'}")

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def dtype(self, key: str) -> np.dtype:
        return self._where[key].dtype(key)

    def get(self, key: str) -> np.ndarray:
        return self._where[key].get(key)


class MultiFiles:
    """Several `TensorFiles` seen as one, each under a key prefix (e.g. a plugin file whose keys are its
    module's state dict: `dream_queries` -> `model.dream_embedding.dream_queries`)."""

    def __init__(self, parts: Sequence[tuple[str, TensorFiles]], what: str = "weights"):
        self._where: dict[str, tuple[TensorFiles, str]] = {}
        for prefix, files in parts:
            for key in files.keys():
                full = prefix + key
                if full in self._where:
                    raise ConversionError(f"{what}: {full} is in both {self._where[full][0].path} and "
                                          f"{files.path}")
                self._where[full] = (files, key)

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        files, k = self._where[key]
        return files.shape(k)

    def dtype(self, key: str) -> np.dtype:
        files, k = self._where[key]
        return files.dtype(k)

    def get(self, key: str) -> np.ndarray:
        files, k = self._where[key]
        return files.get(k)


@dataclasses.dataclass(frozen=True)
class SourceLeaf:
    """One Flax parameter as the files hold it, not read yet.

    shape: in Flax layout as the file has it (a grown leaf, see `may_grow`, is smaller than the model's);
    dtype: the file's; layers: the stacked (scanned) axis length, or None for a plain leaf.
    """

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    layers: int | None
    _read: Callable[[int | None], np.ndarray]

    def read(self) -> np.ndarray:
        """The whole leaf in Flax layout (a stacked leaf filled layer by layer, no list of pieces)."""
        if self.layers is None:
            return self._read(None)
        out = np.empty(self.shape, self.dtype)
        for i in range(self.layers):
            out[i] = self._read(i)
        return out

    def read_layer(self, i: int) -> np.ndarray:
        """Layer i of a stacked leaf, in Flax layout."""
        if self.layers is None:
            raise ValueError(f"{self.path} is not a stacked parameter")
        return self._read(i)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


def read_on_host(path: str, leaf: SourceLeaf) -> np.ndarray:
    """The simplest `place`: the leaf as a host numpy array."""
    return leaf.read()


def stream_to_flax(
    files: TensorFiles | MultiFiles,
    rules: Sequence[Rule],
    expected: Mapping[str, Any],
    place: Callable[[str, SourceLeaf], Any],
    *,
    ignore: Sequence[str] = (),
    may_grow: Mapping[str, int] | None = None,
    what: str = "weights",
) -> dict:
    """Map the tensors of `files` onto the Flax tree `expected` (nested, of arrays or ShapeDtypeStructs).

    place(path, leaf) -> value: called once per Flax parameter ("a/b/kernel") with a `SourceLeaf` to read;
    it returns what goes in the tree (e.g. a sharded jax.Array). ignore: regexes of torch keys dropped on
    purpose. may_grow: {flax path: axis} where the file's tensor may be smaller than the model's (token
    embeddings before the new special tokens); `place` then fills the rest.
    Raises ConversionError naming every unexpected, missing or misshapen key before reading any tensor.
    """
    plan = plan_keys(files.keys(), rules, ignore=ignore, what=what)

    exp = flatten(expected)
    missing = sorted(set(exp) - set(plan))
    if missing:
        raise ConversionError(f"{what}: missing keys: {_fmt_keys(_torch_name_for(p, rules) for p in missing)}")
    extra = sorted(set(plan) - set(exp))
    if extra:
        raise ConversionError(f"{what}: keys the model does not have: {_fmt_keys(extra)}")
    may_grow = dict(may_grow or {})
    bad, leaves = [], {}
    for path, entry in plan.items():
        want = tuple(exp[path].shape)
        kind = entry["kind"]
        if "stack" in entry:
            idx = sorted(entry["stack"])
            n = want[0] if want else 0
            if idx != list(range(n)):
                gaps = sorted(set(range(n)) - set(idx))
                bad.append(f"{_torch_name_for(path, rules)}: layers {gaps or idx} missing or extra "
                           f"(the model has {n})")
                continue
            first = entry["stack"][0]
            layer_shapes = {files.shape(k) for k in entry["stack"].values()}
            if len(layer_shapes) > 1:
                bad.append(f"{_torch_name_for(path, rules)}: layers differ in shape {sorted(layer_shapes)}")
                continue
            got = (len(idx),) + flax_shape(files.shape(first), kind)
            dtypes = {files.dtype(k) for k in entry["stack"].values()}
        else:
            first = entry["single"]
            got = flax_shape(files.shape(first), kind)
            dtypes = {files.dtype(first)}
        ok = got == want
        if not ok and path in may_grow and len(got) == len(want):
            ax = may_grow[path]
            ok = all(g == w for i, (g, w) in enumerate(zip(got, want)) if i != ax) and got[ax] <= want[ax]
        if not ok:
            stacked = "stack" in entry
            key = entry.get("single") or _torch_name_for(path, rules)
            file_shape = files.shape(first)
            model_shape = torch_shape(want[1:] if stacked else want, kind)
            bad.append(f"{key}: {file_shape} in the file, {model_shape} in the model")
            continue
        if len(dtypes) > 1:
            bad.append(f"{_torch_name_for(path, rules)}: layers differ in dtype {sorted(map(str, dtypes))}")
            continue
        leaves[path] = SourceLeaf(path, got, dtypes.pop(), len(idx) if "stack" in entry else None,
                                  _reader(files, entry))
    if bad:
        raise ConversionError(f"{what}: shape mismatch: {_fmt_keys(bad)}")
    return unflatten({path: place(path, leaves[path]) for path in exp})


def _reader(files, entry: dict) -> Callable[[int | None], np.ndarray]:
    kind = entry["kind"]

    def read(i: int | None) -> np.ndarray:
        key = entry["single"] if i is None else entry["stack"][i]
        return _to_flax_layout(files.get(key), kind)

    return read
