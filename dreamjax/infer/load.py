"""Load a training workdir for inference: resolved config, tokenizer, and the params of the newest
checkpoint that reads back (no optimizer state is read)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from ml_collections import ConfigDict

from dreamjax.data.tokenize import LayoutConfig
from dreamjax.data.tokenizer import SpecialIds, load_tokenizer
from dreamjax.diffusion.schedule import Schedule, ScheduleConfig
from dreamjax.models.dreamllm import DreamLLM, SpecialTokenIds, build_config

log = logging.getLogger(__name__)

PARAM_ITEMS = ("trainable", "frozen")


class RunLoadError(FileNotFoundError):
    """A workdir without what `dreamjax generate` needs."""


@dataclasses.dataclass
class Run:
    config: ConfigDict
    tokenizer: Any
    specials: SpecialIds
    model: DreamLLM
    schedule: Schedule
    params: dict
    step: int

    def layout(self) -> LayoutConfig:
        """The token layout the run was trained with (block sizes, max length) for building prompts."""
        cfg = self.model.config
        return LayoutConfig(num_image_tokens=cfg.num_image_tokens, num_dream_queries=cfg.num_dream_queries,
                            max_length=int(self.config.data.max_length))


def _require(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise RunLoadError(f"{what} not found: {path} (is this a `dreamjax train` workdir?)")
    return path


def load_run(workdir: str, step: int | None = None) -> Run:
    workdir = os.path.abspath(workdir)
    _require(workdir, "checkpoint directory")
    with open(_require(os.path.join(workdir, "config.json"), "resolved config")) as f:
        config = ConfigDict(json.load(f))
    tokenizer = load_tokenizer(_require(os.path.join(workdir, "tokenizer"), "tokenizer"))
    specials = SpecialIds.from_tokenizer(tokenizer)
    model_cfg = build_config(config.model.to_dict(), vocab_size=len(tokenizer),
                             tokens=SpecialTokenIds.from_ids(specials))
    schedule = Schedule.create(ScheduleConfig.from_diffusers(config.model.schedule.to_dict()))
    params, got = load_params(os.path.join(workdir, "checkpoints"), step)
    return Run(config, tokenizer, specials, DreamLLM(model_cfg), schedule, params, got)


def load_params(directory: str, step: int | None = None) -> tuple[dict, int]:
    """Merged params of the newest restorable checkpoint (or `step`), as single-device arrays."""
    _require(directory, "checkpoints")
    handlers = {name: ocp.StandardCheckpointHandler() for name in PARAM_ITEMS}
    mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                 item_handlers=handlers)
    steps = sorted(mngr.all_steps(), reverse=True) if step is None else [step]
    if not steps:
        raise RunLoadError(f"no checkpoint in {directory}")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    errors = []
    for s in steps:
        try:
            meta = mngr.item_metadata(s)
            args = {}
            for name in PARAM_ITEMS:
                tree = meta[name] if name in meta else None
                if tree is None:  # an empty part (e.g. nothing frozen) is not saved
                    continue
                target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
                args[name] = ocp.args.StandardRestore(target)
            out = mngr.restore(s, args=ocp.args.Composite(**args))
            params = {**dict(out.get("frozen") or {}), **dict(out.get("trainable") or {})}  # parts are top-level keys
            return params, s
        except Exception as e:  # noqa: BLE001 - unreadable checkpoint: fall back to the previous one, loudly
            log.warning("checkpoint %d in %s failed to restore (%s: %s); trying the previous one",
                        s, directory, type(e).__name__, e)
            errors.append(f"step {s}: {type(e).__name__}: {e}")
    raise RunLoadError(f"no checkpoint in {directory} could be restored: " + "; ".join(errors))
