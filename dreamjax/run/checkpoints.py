"""The layout of a dreamjax workdir and its Orbax checkpoints, written once for training, inference,
`config.init` and (later) export.

    WORKDIR/config.json            the resolved config (model sections filled from the weights it started from)
    WORKDIR/tokenizer/             the tokenizer (HF files)
    WORKDIR/checkpoints/<step>/    trainable/ frozen/ opt_state/ meta/ data/

The parameters are split at the model's top-level parts (`llm`, `vision`, `unet`, ...) into the
`trainable` and `frozen` items, so inference and `config.init` restore parameters alone, or single parts,
without reading the optimizer state. An item whose tree is empty (nothing frozen in the demo) is absent.
Restores go straight onto the target's shardings (any mesh). A checkpoint that fails to restore falls
back to the previous one, loudly: `restore` is the one place that does this.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

PARAM_ITEMS = ("trainable", "frozen")
STATE_ITEMS = ("trainable", "frozen", "opt_state", "meta")
DATA_ITEM = "data"


class CheckpointNotFoundError(FileNotFoundError):
    """No checkpoint, or none that reads back, where one was asked for."""


class LayoutMismatch(ValueError):
    """The checkpoint reads, but does not hold what the model needs (a part, a key, a shape): the user's
    error, the same in every older checkpoint, so it is raised at once instead of falling back."""


# ------------------------------------------------------------------------------------------------ paths


def config_path(workdir: str) -> str:
    return os.path.join(workdir, "config.json")


def tokenizer_dir(workdir: str) -> str:
    return os.path.join(workdir, "tokenizer")


def checkpoints_dir(workdir: str) -> str:
    return os.path.join(workdir, "checkpoints")


def require(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"{what} not found: {path} (is this a `dreamjax train` workdir?)")
    return path


# ------------------------------------------------------------------------------------------------ data iterator


class DataStateMismatch(LayoutMismatch):
    """The saved data iterators cannot resume on this number of processes (their states differ by host)."""


_PROCESS_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


class DataIteratorHandler(grain.checkpoint.CheckpointHandler):
    """Grain's handler (each process saves `data/process_K-of-N.json`), restoring on another process count.

    Grain reads back only the file of the same process index *and count*. dreamjax's unpacked pipeline
    keeps its position independent of the host: every host reads its rows of each global batch
    (`data.pipeline.HostRows`), so each host's state is the index of the next global batch, the same on all
    of them, and any number of processes can resume from it. When this process's own file is absent, the
    state is taken from the files of the count that saved, provided there are all of them and they agree;
    states that differ by host (the packed pipeline's open rows) are a `DataStateMismatch`, not a guess.
    """

    def restore(self, directory, item=None, args=None):
        item = item or args.item
        index, count = jax.process_index(), jax.process_count()
        if (directory / f"process_{index}-of-{count}.json").exists():
            return super().restore(directory, item=item)
        item.set_state(host_independent_state(directory, index, count))
        item.start_prefetch()
        return item


def host_independent_state(directory, index: int = 0, count: int = 1) -> dict:
    """The one iterator state that every process file in `directory` holds (see `DataIteratorHandler`)."""
    saved: dict[int, dict[int, Any]] = {}
    for path in directory.iterdir():
        m = _PROCESS_FILE.fullmatch(path.name)
        if m:
            saved.setdefault(int(m.group(2)), {})[int(m.group(1))] = path
    where = f"the data iterator state in {directory}"
    if len(saved) != 1:
        raise DataStateMismatch(f"{where}: expected the files of one process count, found counts {sorted(saved)} "
                                f"(process {index} of {count} has no file of its own)")
    (n, files), = saved.items()
    if sorted(files) != list(range(n)):
        raise DataStateMismatch(f"{where}: saved by {n} processes but only processes {sorted(files)} have a file")
    states = [json.loads(files[k].read_text()) for k in range(n)]
    if any(s != states[0] for s in states[1:]):
        raise DataStateMismatch(
            f"{where}: the {n} processes that saved it stopped at host-specific positions (sequence packing keeps "
            f"each host's open rows), so {count} process(es) cannot resume it; resume with {n} processes, or "
            f"start afresh in a new workdir with `--config.init.checkpoint=<this workdir>` (weights only)")
    return states[0]


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
    item: Any


# ------------------------------------------------------------------------------------------------ managers


def manager(directory: str, *, max_to_keep: int | None = 3, read_only: bool = False,
            with_data: bool = False) -> ocp.CheckpointManager:
    """The manager training saves with (every state item, and the Grain iterator when `with_data`)."""
    handlers = {name: ocp.StandardCheckpointHandler() for name in STATE_ITEMS}
    if with_data:
        handlers[DATA_ITEM] = DataIteratorHandler()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only, read_only=read_only)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers=handlers)


def _param_reader(directory: str) -> ocp.CheckpointManager:
    """Read-only manager for the parameter items; the PyTree handler allows restoring a subset of parts."""
    require(directory, "checkpoints")
    handlers = {name: ocp.PyTreeCheckpointHandler() for name in PARAM_ITEMS}
    return ocp.CheckpointManager(os.path.abspath(directory), options=ocp.CheckpointManagerOptions(read_only=True),
                                 item_handlers=handlers)


# ------------------------------------------------------------------------------------------------ save


def save(mngr: ocp.CheckpointManager, step: int, trees: Mapping[str, Any], data_iter: Any | None = None, *,
         force: bool = False) -> bool:
    """Save the named trees (STATE_ITEMS) at `step`; Orbax refuses empty trees, so those are left out."""
    items = {k: ocp.args.StandardSave(v) for k, v in trees.items() if jax.tree.leaves(v)}
    if data_iter is not None:
        items[DATA_ITEM] = DataSave(data_iter)
    return mngr.save(step, args=ocp.args.Composite(**items), force=force)


# ------------------------------------------------------------------------------------------------ restore


def restore(mngr: ocp.CheckpointManager, make_args: Callable[[int], dict], *,
            step: int | None = None) -> tuple[dict, int]:
    """Restore the newest checkpoint that reads back (or exactly `step`).

    make_args(step) -> {item: orbax restore args}. A failure (unreadable files, a shape mismatch) logs a
    warning and tries the previous checkpoint; only when none reads back does it raise, with every reason.
    """
    steps = sorted(mngr.all_steps(), reverse=True) if step is None else [step]
    if not steps:
        raise CheckpointNotFoundError(f"no checkpoint in {mngr.directory}")
    errors = []
    for s in steps:
        try:
            out = mngr.restore(s, args=ocp.args.Composite(**make_args(s)))
        except LayoutMismatch:
            raise
        except Exception as e:  # noqa: BLE001 - an unreadable checkpoint: fall back to the previous one
            if step is not None:
                raise CheckpointNotFoundError(f"checkpoint {s} in {mngr.directory} does not restore: "
                                              f"{type(e).__name__}: {e}") from e
            log.warning("checkpoint %d in %s failed to restore (%s: %s); falling back to the previous one",
                        s, mngr.directory, type(e).__name__, e)
            errors.append(f"step {s}: {type(e).__name__}: {e}")
            continue
        if errors:
            log.warning("restored checkpoint %d after %d newer one(s) failed", s, len(errors))
        return dict(out), s
    raise CheckpointNotFoundError(f"no checkpoint in {mngr.directory} could be restored: " + "; ".join(errors))


def _tree_of(metadata: Any) -> Any:
    return getattr(metadata, "tree", metadata)


def saved_parts(directory: str, step: int | None = None) -> dict[str, str]:
    """{part: item} of the newest (or the given) checkpoint: which item holds each top-level part."""
    mngr = _param_reader(directory)
    s = mngr.latest_step() if step is None else step
    if s is None:
        raise CheckpointNotFoundError(f"no checkpoint in {directory}")
    meta = mngr.item_metadata(s)
    out = {}
    for item in PARAM_ITEMS:
        tree = _tree_of(meta[item]) if item in meta and meta[item] is not None else None
        for part in tree or {}:
            out[part] = item
    return out


def restore_params(directory: str, target: Mapping[str, Any], *, parts: Sequence[str] | None = None,
                   step: int | None = None, what: str = "checkpoint") -> tuple[dict, int]:
    """The parameters of `parts` (default: all of `target`'s) from a checkpoint directory, restored straight
    onto the shardings of `target` (a {part: tree of ShapeDtypeStruct with .sharding} dict).

    Each array keeps the dtype it was saved in (the caller casts). A part the checkpoint does not hold, or a
    parameter whose saved shape differs from the target's, is a `LayoutMismatch` naming the part and keys.
    """
    mngr = _param_reader(directory)
    parts = list(target) if parts is None else list(parts)

    def make_args(s: int) -> dict:
        meta = mngr.item_metadata(s)
        saved = {item: _tree_of(meta[item]) for item in PARAM_ITEMS if item in meta and meta[item] is not None}
        where = {part: item for item, tree in saved.items() for part in tree}
        missing = [p for p in parts if p not in where]
        if missing:
            raise LayoutMismatch(f"{what}: {directory} step {s} has no parameters for {missing} (it holds "
                             f"{sorted(where)})")
        args = {}
        for item in PARAM_ITEMS:
            want = {p: target[p] for p in parts if where.get(p) == item}
            if not want:
                continue
            _check_shapes(want, {p: saved[item][p] for p in want}, f"{what} ({directory} step {s})")
            wanted = jax.tree.map(lambda t, m: jax.ShapeDtypeStruct(t.shape, m.dtype, sharding=t.sharding),
                                  want, {p: saved[item][p] for p in want})
            restore_args = jax.tree.map(
                lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape, dtype=t.dtype), wanted)
            args[item] = ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args, partial_restore=True)
        return args

    out, s = restore(mngr, make_args, step=step)
    params: dict = {}
    for item in PARAM_ITEMS:
        params.update(dict(out.get(item) or {}))
    return params, s


def _check_shapes(target: Mapping[str, Any], saved: Mapping[str, Any], what: str) -> None:
    flat_t = dict(_flatten(target))
    flat_s = dict(_flatten(saved))
    missing = sorted(set(flat_t) - set(flat_s))
    extra = sorted(set(flat_s) - set(flat_t))
    bad = [f"{k} {tuple(flat_s[k].shape)} != {tuple(flat_t[k].shape)}" for k in flat_t
           if k in flat_s and tuple(flat_s[k].shape) != tuple(flat_t[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:8]}")
    if extra:
        problems.append(f"unexpected keys {extra[:8]}")
    if bad:
        problems.append(f"shape mismatch {bad[:8]} (saved != model)")
    if problems:
        raise LayoutMismatch(f"{what}: " + "; ".join(problems))


def _flatten(tree: Mapping[str, Any], prefix: str = ""):
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            yield from _flatten(v, path)
        else:
            yield path, v


# ------------------------------------------------------------------------------------------------ parameters alone


def save_params(directory: str, step: int, trees: Mapping[str, Any]) -> None:
    """Save parameter items (`PARAM_ITEMS`: an imported checkpoint) and wait for the write.

    Written uncompressed with about one GB (or the largest array) in flight: Orbax's zstd path buffers every
    array it compresses, which doubles the host memory of a model held on the host (a CPU mesh); these
    tensors hardly compress. Every reader (`restore_params`, `ParamLeaves`) reads the result like any other
    checkpoint.
    """
    largest = max((x.size * x.dtype.itemsize for x in jax.tree.leaves(dict(trees))), default=0)
    in_flight_gb = max(1, -(-largest // 10**9))  # Orbax refuses an array bigger than its budget
    handlers = {name: ocp.PyTreeCheckpointHandler(use_compression=False, save_concurrent_gb=in_flight_gb)
                for name in PARAM_ITEMS}
    mngr = ocp.CheckpointManager(os.path.abspath(directory), options=ocp.CheckpointManagerOptions(create=True),
                                 item_handlers=handlers)
    items = {k: ocp.args.PyTreeSave(v) for k, v in trees.items() if jax.tree.leaves(v)}
    mngr.save(step, args=ocp.args.Composite(**items), force=True)
    mngr.wait_until_finished()
    mngr.close()


class ParamLeaves:
    """The parameters of one checkpoint as host numpy arrays, read a few leaves at a time (at most
    `budget_bytes` per read, or one leaf when it is bigger): what `dreamjax export` converts, so exporting
    never holds the model (`convert.export.Leaves`). Paths are "part/.../leaf"; dtypes are as saved."""

    def __init__(self, directory: str, step: int | None = None, budget_bytes: int = 512 << 20):
        self._mngr = _param_reader(directory)
        self.step = self._mngr.latest_step() if step is None else step
        if self.step is None:
            raise CheckpointNotFoundError(f"no checkpoint in {directory}")
        meta = self._mngr.item_metadata(self.step)
        self._item: dict[str, str] = {}
        self._specs: dict[str, tuple[tuple[int, ...], Any]] = {}
        for item in PARAM_ITEMS:
            tree = _tree_of(meta[item]) if item in meta and meta[item] is not None else None
            for path, m in _flatten(tree or {}):
                self._item[path] = item
                self._specs[path] = (tuple(m.shape), np.dtype(m.dtype))
        self.budget = budget_bytes

    def specs(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        return dict(self._specs)

    def _nbytes(self, path: str) -> int:
        shape, dtype = self._specs[path]
        return int(np.prod(shape)) * dtype.itemsize

    def fetch(self, paths: Sequence[str]):
        batch: list[str] = []
        size = 0
        for path in paths:
            if batch and size + self._nbytes(path) > self.budget:
                yield from self._read(batch)
                batch, size = [], 0
            batch.append(path)
            size += self._nbytes(path)
        if batch:
            yield from self._read(batch)

    def _read(self, paths: Sequence[str]):
        wanted: dict[str, dict] = {}
        for path in paths:
            node = wanted.setdefault(self._item[path], {})
            *parents, leaf = path.split("/")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = 0
        args = {item: ocp.args.PyTreeRestore(
            item=tree, partial_restore=True,
            restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
            for item, tree in wanted.items()}
        out = self._mngr.restore(self.step, args=ocp.args.Composite(**args))
        flat = {p: v for item in wanted for p, v in _flatten(dict(out[item]))}
        del out
        for path in paths:
            yield path, flat.pop(path)
