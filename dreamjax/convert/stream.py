"""PyTorch weight files -> Flax leaves, one tensor at a time, placed straight onto their devices.

`TensorFiles` opens a weights directory (safetensors or torch `.bin`, sharded with an `*.index.json` or
not) lazily: shapes come from the headers, and a tensor is read only when asked for (safetensors through
a memory map, `.bin` through `torch.load(mmap=True)`). `stream_to_flax` plans the whole mapping from the
names and shapes alone (so a missing, unexpected or misshapen key fails before anything is read), then
builds each Flax leaf (transposed, stacked for scanned layers) and hands it to `place`, which puts it on
the mesh; the host holds one leaf at a time, never a second copy of the model.
"""

from __future__ import annotations

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
    plan_keys,
    to_numpy,
    unflatten,
)

WEIGHT_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin",
                "diffusion_pytorch_model.bin")
INDEX_FILES = tuple(f + ".index.json" for f in WEIGHT_FILES)

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _safetensors_dtype(name: str, file: str):
    if name == "BF16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    if name not in _SAFETENSORS_DTYPES:
        raise ConversionError(f"{file}: unsupported safetensors dtype {name}")
    return _SAFETENSORS_DTYPES[name]


class _Safetensors:
    """One .safetensors file: the JSON header read once, tensors as views of one read-only memory map."""

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
        self._map = None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def get(self, key: str) -> np.ndarray:
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        e = self.entries[key]
        start, end = e["data_offsets"]
        raw = self._map[self.data_start + start : self.data_start + end]
        return raw.view(_safetensors_dtype(e["dtype"], self.path)).reshape(e["shape"])


class _TorchBin:
    """One torch `.bin` / `.pt` file, memory-mapped (torch's zip format), tensors read on access."""

    def __init__(self, path: str):
        try:
            import torch
        except ImportError as e:
            raise ConversionError(f"reading {path} needs torch: pip install 'dreamjax[torch]'") from e
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise ConversionError(f"cannot read torch checkpoint {path}: {e}") from e
        if not isinstance(sd, Mapping):
            raise ConversionError(f"{path} does not hold a state dict (got {type(sd).__name__})")
        self.entries = dict(sd)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key].shape)

    def get(self, key: str) -> np.ndarray:
        return to_numpy(self.entries[key])


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

    def get(self, key: str) -> np.ndarray:
        return self._where[key].get(key)


def _flax_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    if kind == "kernel" and len(shape) == 2:
        return shape[::-1]
    if kind == "kernel" and len(shape) == 4:
        o, i, h, w = shape
        return (h, w, i, o)
    return shape


def stream_to_flax(
    files: TensorFiles,
    rules: Sequence[Rule],
    expected: Mapping[str, Any],
    place: Callable[[str, np.ndarray], Any],
    *,
    ignore: Sequence[str] = (),
    may_grow: Mapping[str, int] | None = None,
    what: str = "weights",
) -> dict:
    """Map the tensors of `files` onto the Flax tree `expected` (nested, of arrays or ShapeDtypeStructs).

    place(path, array) -> leaf: called once per Flax parameter ("a/b/kernel") with the host array in Flax
    layout; it returns what goes in the tree (e.g. a sharded jax.Array). ignore: regexes of torch keys
    dropped on purpose. may_grow: {flax path: axis} where the file's tensor may be smaller than the model's
    (token embeddings before the new special tokens); `place` then fills the rest.
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
    bad = []
    for path, entry in plan.items():
        want = tuple(exp[path].shape)
        if "stack" in entry:
            idx = sorted(entry["stack"])
            if idx != list(range(want[0] if want else 0)):
                gaps = sorted(set(range(want[0] if want else 0)) - set(idx))
                bad.append(f"{_torch_name_for(path, rules)}: layers {gaps or idx} missing or extra "
                           f"(the model has {want[0] if want else 0})")
                continue
            got = (len(idx),) + _flax_shape(files.shape(entry["stack"][0]), entry["kind"])
        else:
            got = _flax_shape(files.shape(entry["single"]), entry["kind"])
        ok = got == want
        if not ok and path in may_grow and len(got) == len(want):
            ax = may_grow[path]
            ok = all(g == w for i, (g, w) in enumerate(zip(got, want)) if i != ax) and got[ax] <= want[ax]
        if not ok:
            key = entry.get("single") or _torch_name_for(path, rules)
            bad.append(f"{key}: {got} in the file, {want} in the model")
    if bad:
        raise ConversionError(f"{what}: shape mismatch: {_fmt_keys(bad)}")

    out = {}
    for path in exp:
        entry = plan[path]
        if "stack" in entry:
            pieces = [_to_flax_layout(files.get(entry["stack"][i]), entry["kind"]) for i in sorted(entry["stack"])]
            arr = np.stack(pieces)
            del pieces
        else:
            arr = _to_flax_layout(files.get(entry["single"]), entry["kind"])
        out[path] = place(path, arr)
        del arr
    return unflatten(out)
