"""The train state in and out of the workdir's checkpoints (the layout, the fallback to an older checkpoint
and the partial restores live in `dreamjax/run/checkpoints.py`; this file only maps `TrainState` onto its
items). Restores onto any mesh: the targets carry the shardings.
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp

from dreamjax.run import checkpoints
from dreamjax.run.checkpoints import STATE_ITEMS
from dreamjax.train.state import TrainState


def _meta(state: TrainState) -> dict:
    return {"step": state.step, "rng": state.rng, "dropped_lm": state.dropped_lm, "dropped_vm": state.dropped_vm,
            "skipped_updates": state.skipped_updates}


def save(mngr: ocp.CheckpointManager, state: TrainState, data_iter: Any | None = None, *,
         force: bool = False) -> bool:
    trees = {"trainable": state.trainable, "frozen": state.frozen, "opt_state": state.opt_state,
             "meta": _meta(state)}
    return checkpoints.save(mngr, int(jax.device_get(state.step)), trees, data_iter, force=force)


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def restore_latest(mngr: ocp.CheckpointManager, target: TrainState, shardings: TrainState,
                   data_iter: Any | None = None) -> tuple[TrainState, int]:
    """Restore the newest checkpoint that reads back onto `target`'s structure and `shardings`' mesh
    (and the Grain iterator in place). Returns (state, step)."""

    def make_args(_step: int) -> dict:
        args = {}
        for name in STATE_ITEMS:
            if name == "meta":
                sub, sh = _meta(target), _meta(shardings)
            else:
                sub, sh = getattr(target, name), getattr(shardings, name)
                if not jax.tree.leaves(sub):  # empty parts are not saved
                    continue
            args[name] = ocp.args.StandardRestore(_abstract(sub, sh))
        if data_iter is not None:
            args[checkpoints.DATA_ITEM] = checkpoints.DataRestore(data_iter)
        return args

    out, step = checkpoints.restore(mngr, make_args)
    replace = {name: out[name] for name in ("trainable", "frozen", "opt_state") if name in out}
    replace.update(out["meta"])
    return target.replace(**replace), step

