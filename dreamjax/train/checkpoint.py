"""Orbax checkpoints: the train state in separate items (so inference restores params alone), the
Grain iterator state, and metadata. Restores onto any mesh (targets carry shardings); a checkpoint that
fails to restore falls back to the previous one, loudly.

Layout of `workdir/checkpoints/<step>/`: trainable/, frozen/, opt_state/, meta/ (step, rng, counters),
data/ (Grain iterator, when given).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from dreamjax.train.state import TrainState

log = logging.getLogger(__name__)

STATE_ITEMS = ("trainable", "frozen", "opt_state", "meta")


class CheckpointNotFoundError(FileNotFoundError):
    pass


def _meta(state: TrainState) -> dict:
    return {"step": state.step, "rng": state.rng, "dropped_lm": state.dropped_lm, "dropped_vm": state.dropped_vm,
            "skipped_updates": state.skipped_updates}


def manager(directory: str, *, max_to_keep: int | None = 3, save_interval_steps: int = 1,
            read_only: bool = False, with_data: bool = False) -> ocp.CheckpointManager:
    directory = os.path.abspath(directory)
    handlers = {name: ocp.StandardCheckpointHandler() for name in STATE_ITEMS}
    if with_data:
        handlers["data"] = grain.checkpoint.CheckpointHandler()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                           create=not read_only, read_only=read_only)
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def save(mngr: ocp.CheckpointManager, state: TrainState, data_iter: Any | None = None, *,
         force: bool = False) -> bool:
    step = int(jax.device_get(state.step))
    trees = {"trainable": state.trainable, "frozen": state.frozen, "opt_state": state.opt_state,
             "meta": _meta(state)}
    # Orbax refuses empty trees (e.g. nothing frozen in the demo stage): such items are simply absent.
    items = {k: ocp.args.StandardSave(v) for k, v in trees.items() if jax.tree.leaves(v)}
    if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return mngr.save(step, args=ocp.args.Composite(**items), force=force)


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def restore_latest(mngr: ocp.CheckpointManager, target: TrainState, shardings: TrainState,
                   data_iter: Any | None = None, *, items: tuple[str, ...] = STATE_ITEMS) -> tuple[TrainState, int]:
    """Restore the newest checkpoint that reads back; the target (arrays or ShapeDtypeStructs) and its
    shardings give the structure and the mesh to restore onto. Returns (state, step)."""
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
        raise CheckpointNotFoundError(f"no checkpoint in {mngr.directory}")
    errors = []
    for step in steps:
        try:
            args = {}
            for name in items:
                if name == "meta":
                    sub, sh = _meta(target), _meta(shardings)
                else:
                    sub, sh = getattr(target, name), getattr(shardings, name)
                    if not jax.tree.leaves(sub):  # empty parts are not saved
                        continue
                args[name] = ocp.args.StandardRestore(_abstract(sub, sh))
            if data_iter is not None:
                args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
            out = mngr.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: try the previous one
            log.warning("checkpoint %d in %s failed to restore (%s: %s); falling back to the previous one",
                        step, mngr.directory, type(e).__name__, e)
            errors.append(f"step {step}: {type(e).__name__}: {e}")
            continue
        if errors:
            log.warning("restored checkpoint %d after %d newer one(s) failed", step, len(errors))
        replace = {name: out[name] for name in items if name != "meta" and name in args}
        if "meta" in items:
            replace.update(out["meta"])
        return target.replace(**replace), step
    raise CheckpointNotFoundError(f"no checkpoint in {mngr.directory} could be restored: " + "; ".join(errors))
