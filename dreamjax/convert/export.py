"""Flax leaves -> PyTorch weight files, one leaf at a time: the mirror of `stream.py`.

A `Leaves` source knows every leaf's path, shape and dtype up front and hands over host arrays for the
paths it is asked for, in order (`TreeLeaves` gathers the leaves of a sharded parameter tree one at a
time; the run layer has one that restores them from a checkpoint a few at a time). `plan_export` works out
from the shapes alone which torch tensors each leaf makes (a stacked, scanned leaf makes one per layer),
so `write_safetensors` can write every header before it reads any data and then stream each leaf's
tensors straight into its shard file: the host holds one leaf and its torch-layout copy, never the model.

Shards follow the transformers / diffusers convention: one `<name>.safetensors`, or
`<name>-00001-of-0000N.safetensors` with a `<name>.safetensors.index.json` weight map when the tensors
exceed `max_shard_bytes` (a leaf is never split, so a shard may exceed it by one leaf).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from dreamjax.convert.core import (
    ConversionError,
    Rule,
    _to_torch_layout,
    flatten,
    flax_shape,
    plan_paths,
    to_torch,
    torch_shape,
)

DEFAULT_SHARD_BYTES = 5 << 30  # transformers' default max_shard_size ("5GB")

_SAFETENSORS_NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                      "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


class Leaves(Protocol):
    """Where exported parameters come from."""

    def specs(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """{flax path: (shape, dtype)} of every leaf, without reading any."""

    def fetch(self, paths: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
        """(path, host array) for each of `paths`, in that order, one at a time."""


class TreeLeaves:
    """The leaves of a parameter tree (sharded jax.Arrays or numpy), gathered to the host one at a time."""

    def __init__(self, params: Mapping[str, Any]):
        self._flat = flatten(params)

    def specs(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {p: (tuple(x.shape), np.dtype(x.dtype)) for p, x in self._flat.items()}

    def fetch(self, paths: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
        import jax

        for path in paths:
            x = self._flat[path]
            if isinstance(x, jax.Array) and not x.is_fully_addressable:  # multi-host: every host joins in
                from jax.experimental import multihost_utils

                yield path, np.asarray(multihost_utils.process_allgather(x, tiled=True))
            else:
                yield path, np.asarray(jax.device_get(x))


def sub_leaves(leaves: Leaves, prefix: str) -> Leaves:
    """The leaves under `prefix/` (one part of the model), paths relative to it."""
    return _SubLeaves(leaves, prefix.rstrip("/") + "/")


class _SubLeaves:
    def __init__(self, leaves: Leaves, prefix: str):
        self._leaves, self._prefix = leaves, prefix

    def specs(self):
        n = len(self._prefix)
        return {p[n:]: s for p, s in self._leaves.specs().items() if p.startswith(self._prefix)}

    def fetch(self, paths):
        n = len(self._prefix)
        for p, x in self._leaves.fetch([self._prefix + q for q in paths]):
            yield p[n:], x


# ----------------------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True)
class ExportLeaf:
    """One Flax leaf and the torch tensors it becomes: `keys[i]` is layer i of a stacked leaf."""

    path: str
    kind: str
    keys: tuple[str, ...]
    stacked: bool
    shape: tuple[int, ...]  # torch layout, of each key
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return len(self.keys) * int(np.prod(self.shape)) * self.dtype.itemsize

    def tensors(self, arr: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
        """(torch key, array in torch layout) for the leaf's host array."""
        if tuple(arr.shape) != self.flax_shape or arr.dtype != self.dtype:
            raise ConversionError(f"{self.path}: got {arr.dtype}{list(arr.shape)}, planned "
                                  f"{self.dtype}{list(self.flax_shape)}")
        if not self.stacked:
            yield self.keys[0], _to_torch_layout(arr, self.kind)
            return
        for i, key in enumerate(self.keys):
            yield key, _to_torch_layout(arr[i], self.kind)

    @property
    def flax_shape(self) -> tuple[int, ...]:
        inner = flax_shape(self.shape, self.kind)
        return (len(self.keys), *inner) if self.stacked else inner


def plan_export(specs: Mapping[str, tuple[tuple[int, ...], np.dtype]], rules: Sequence[Rule], *,
                what: str = "params") -> list[ExportLeaf]:
    """Every leaf of `specs` ({flax path: (shape, dtype)}) with the torch tensors it becomes, in path
    order. A leaf no rule maps raises, naming it."""
    plan = plan_paths({p: tuple(shape) for p, (shape, _) in specs.items()}, rules, what=what)
    out = []
    for path, (rule, keys) in plan.items():
        shape, dtype = specs[path]
        stacked = rule.stacked_var is not None
        inner = tuple(shape[1:]) if stacked else tuple(shape)
        out.append(ExportLeaf(path, rule.kind, keys, stacked, torch_shape(inner, rule.kind), np.dtype(dtype)))
    return out


# ----------------------------------------------------------------------------- safetensors


def _dtype_name(dtype: np.dtype) -> str:
    name = np.dtype(dtype).name
    if name not in _SAFETENSORS_NAMES:
        raise ConversionError(f"cannot write dtype {name} to safetensors")
    return _SAFETENSORS_NAMES[name]


def _shards(leaves: Sequence[ExportLeaf], max_shard_bytes: int) -> list[list[ExportLeaf]]:
    shards: list[list[ExportLeaf]] = [[]]
    size = 0
    for leaf in leaves:
        if shards[-1] and size + leaf.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(leaf)
        size += leaf.nbytes
    return shards


def _header(leaves: Sequence[ExportLeaf], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for leaf in leaves:
        each = int(np.prod(leaf.shape)) * leaf.dtype.itemsize
        for key in leaf.keys:
            header[key] = {"dtype": _dtype_name(leaf.dtype), "shape": list(leaf.shape),
                           "data_offsets": [offset, offset + each]}
            offset += each
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the safetensors writer does


def _write_array(f, x: np.ndarray) -> None:
    x = np.ascontiguousarray(x)
    f.write(x.reshape(-1).view(np.uint8).data)


def write_safetensors(leaves: Sequence[ExportLeaf], source: Leaves, out_dir: str | os.PathLike, *,
                      name: str = "model", max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                      metadata: Mapping[str, str] | None = None) -> list[str]:
    """Write the tensors of `leaves` (from `source`) into `out_dir/<name>*.safetensors` shards, with an index
    when there is more than one. Returns the files written (index last)."""
    os.makedirs(out_dir, exist_ok=True)
    metadata = {"format": "pt", **(metadata or {})}
    shards = _shards(list(leaves), max_shard_bytes)
    n = len(shards)
    files = [f"{name}.safetensors"] if n == 1 else [f"{name}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for file, shard in zip(files, shards):
        by_path = {leaf.path: leaf for leaf in shard}
        with open(os.path.join(out_dir, file), "wb") as f:
            header = _header(shard, metadata)
            f.write(len(header).to_bytes(8, "little"))
            f.write(header)
            for path, arr in source.fetch([leaf.path for leaf in shard]):
                for key, x in by_path[path].tensors(arr):
                    _write_array(f, x)
                    weight_map[key] = file
                del arr
    written = [os.path.join(out_dir, f) for f in files]
    if n > 1:
        index = os.path.join(out_dir, f"{name}.safetensors.index.json")
        total = sum(leaf.nbytes for leaf in leaves)
        with open(index, "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f,
                      indent=2)
        written.append(index)
    return written


def write_torch_bin(leaves: Sequence[ExportLeaf], source: Leaves, path: str | os.PathLike, *,
                    strip_prefix: str = "") -> str:
    """`torch.save` of an OrderedDict of the tensors of `leaves` (keys without `strip_prefix`): the format
    upstream's plugins `torch.load`. A pickle is written in one go, so these tensors are all held at once:
    use it for files whose size the format fixes (the release's plugin files), not for the LLM."""
    from collections import OrderedDict

    import torch

    by_path = {leaf.path: leaf for leaf in leaves}
    state = OrderedDict()
    for p, arr in source.fetch([leaf.path for leaf in leaves]):
        for key, x in by_path[p].tensors(arr):
            if not key.startswith(strip_prefix):
                raise ConversionError(f"{key} does not start with {strip_prefix!r}")
            state[key[len(strip_prefix):]] = to_torch(x)
    torch.save(state, os.fspath(path))
    return os.fspath(path)
