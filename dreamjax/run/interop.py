"""`dreamjax import` and `dreamjax export`: PyTorch checkpoints <-> dreamjax workdirs.

Import is the run assembly's own `config.init` path: a config whose `init` names the source (and whose
`model.parts` names the towers the source has) is resolved, its weights streamed onto the mesh one tensor
at a time in the dtypes the files hold, and written as an ordinary workdir that `load_run`,
`dreamjax generate` and `config.init.checkpoint` read:

    OUT/config.json          the resolved config (no `init`: the workdir stands alone)
    OUT/tokenizer/           the source's tokenizer with DreamLLM's special tokens (an LLM only)
    OUT/checkpoints/0/       the weights, every part in the `frozen` item, no optimizer state

Export reads a workdir's newest checkpoint a few leaves at a time (`checkpoints.ParamLeaves`) and writes
the `hf` directories (`convert/export_hf.py`) or the released DreamLLM layout (`convert/dreamllm_release.py`).
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from ml_collections import ConfigDict

from dreamjax.convert import dreamllm_release, export_hf
from dreamjax.convert.core import ConversionError, flatten
from dreamjax.convert.export import DEFAULT_SHARD_BYTES
from dreamjax.data.tokenizer import special_tokens2ids_dict
from dreamjax.models.dreamllm import PARTS
from dreamjax.models.unet import UNetConfig
from dreamjax.models.vae import VAEConfig
from dreamjax.run import checkpoints
from dreamjax.run.assembly import load_run, new_run
from dreamjax.run.model import LLM_ARCH, VISION_ARCH, resolve_config

log = logging.getLogger(__name__)

# format -> (config.init key, towers the source has; None: all)
IMPORT_FORMATS = {
    "hf-llama": ("llm", ("llm",)),
    "clip": ("clip", ("vision",)),
    "diffusers-sd": ("stable_diffusion", ("unet",)),
    "dreamllm": ("dreamllm", None),
}
EXPORT_FORMATS = ("hf", "dreamllm")


def _empty_out(path: str, flag: str) -> str:
    path = os.path.abspath(path)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ValueError(f"{flag} {path} exists and is not an empty directory")
    return path


def import_config(fmt: str, src: str, base: ConfigDict) -> ConfigDict:
    """`base` (e.g. configs/common.py's) set up to start from `src`: `init` names it alone, `model.parts`
    the towers it has, and the architecture fields of those towers are left to the weights' config files
    (the JAX-only ones, scan_layers and the like, stay the base's)."""
    if fmt not in IMPORT_FORMATS:
        raise ValueError(f"unknown import format {fmt!r}; choose one of {sorted(IMPORT_FORMATS)}")
    key, towers = IMPORT_FORMATS[fmt]
    if not os.path.isdir(src):
        raise FileNotFoundError(f"--src {src} is not a directory")
    c = ConfigDict(base.to_dict())
    c.init = ConfigDict({k: None for k in base.init})
    c.init[key] = os.path.abspath(src)
    c.tokenizer = None
    m = c.model
    m.parts = None if towers is None else list(towers)
    everything = towers is None
    if everything or "llm" in towers:
        m.llm = ConfigDict({k: v for k, v in dict(m.llm).items() if k not in LLM_ARCH + ("vocab_size",)})
    else:
        m.llm = None
    if everything or "vision" in towers:
        m.vision = ConfigDict({k: v for k, v in dict(m.vision or {}).items() if k not in VISION_ARCH})
    else:
        m.vision = None
    if everything or "unet" in towers:
        m.unet, m.vae, m.schedule = ConfigDict(), ConfigDict(), ConfigDict()
    else:
        m.unet = m.vae = None
    if everything:
        m.num_dream_queries = m.select_layer = None
        c.train.stage = "stage3"  # ready for instruction tuning, as upstream's release
    return c


def _fit_data(config: ConfigDict) -> None:
    """The data sizes that go with the resolved architecture (so `build_model`'s checks hold)."""
    m = config.model
    if m.get("vision"):
        config.data.resolution_in = int(m.vision.image_size)
    if m.get("unet"):
        factor = VAEConfig.from_diffusers(m.vae.to_dict()).downsample_factor if m.get("vae") else 1
        config.data.resolution_out = UNetConfig.from_diffusers(m.unet.to_dict()).sample_size * factor
    if m.get("llm"):
        config.data.max_length = min(int(config.data.max_length), int(m.llm.max_position_embeddings))


def _precision_of(params) -> str:
    """fp32 weights compute in fp32; anything else (the bf16 releases) in bf16 with fp32 masters."""
    floats = {np.dtype(x.dtype) for x in jax.tree.leaves(params) if np.issubdtype(np.dtype(x.dtype), np.floating)}
    return "fp32" if floats == {np.dtype(np.float32)} else "bf16"


def import_checkpoint(fmt: str, src: str, out: str, base: ConfigDict, *, seed: int = 0) -> dict:
    """Import `src` (a directory of `fmt`) into a new workdir `out`. Returns a summary."""
    out = _empty_out(out, "--out")
    config = resolve_config(import_config(fmt, src, base))  # the architecture, from the source's config files
    _fit_data(config)
    run = new_run(config)
    params = run.init_params(jax.random.PRNGKey(seed), keep_file_dtype=True)
    stored = ConfigDict(run.config.to_dict())
    stored.init = ConfigDict({k: None for k in stored.init})
    stored.train.precision = _precision_of(params)
    run.config = stored
    run.save_files(out)
    checkpoints.save_params(checkpoints.checkpoints_dir(out), 0, {"frozen": params})
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    summary = {"format": fmt, "src": os.path.abspath(src), "out": out, "parts": list(params),
               "parameters": n, "precision": stored.train.precision}
    log.info("imported %s: %s parameters (%s) into %s", fmt, f"{n:,}", ", ".join(params), out)
    return summary


def export_checkpoint(fmt: str, workdir: str, out: str, *, step: int | None = None,
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """Write `workdir`'s newest (or `step`'s) parameters as `fmt` into the new directory `out`."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {list(EXPORT_FORMATS)}")
    run = load_run(workdir, with_params=False)
    out = _empty_out(out, "--out")
    cfg = run.model_config
    leaves = checkpoints.ParamLeaves(checkpoints.checkpoints_dir(run.workdir), step)
    have = {p.split("/")[0] for p in leaves.specs()}
    if have != set(cfg.parts):
        raise ConversionError(f"{run.workdir} step {leaves.step} holds the parts {sorted(have, key=PARTS.index)}, "
                              f"its config.json describes {list(cfg.parts)}")
    _check_shapes(run, leaves)
    ids = None if run.specials is None else {"bos": run.specials.bos, "eos": run.specials.eos,
                                              "pad": run.specials.pad}
    schedule = run.config.model.schedule.to_dict() if run.config.model.get("schedule") else None
    if fmt == "hf":
        result = export_hf.export_hf(cfg, leaves, out, tokenizer=run.tokenizer, special_ids=ids, schedule=schedule,
                                     max_shard_bytes=max_shard_bytes)
        files, notes = result["files"], result["notes"]
    else:
        files = dreamllm_release.export_release(
            cfg, leaves, out, tokenizer=run.tokenizer, special_tokens2ids=special_tokens2ids_dict(run.tokenizer),
            special_ids=ids, schedule=schedule, max_shard_bytes=max_shard_bytes)
        notes = []
    for note in notes:
        log.info("left out %s", note)
    log.info("exported step %d of %s as %s into %s (%d files)", leaves.step, run.workdir, fmt, out, len(files))
    return {"format": fmt, "step": leaves.step, "out": out, "files": files, "notes": notes}


def _check_shapes(run, leaves: checkpoints.ParamLeaves) -> None:
    """The saved shapes are the model's (a checkpoint from another config fails here, naming the leaves)."""
    import flax.linen as nn

    want = {p: tuple(s.shape) for p, s in flatten(nn.meta.unbox(run.abstract_params)).items()}
    got = {p: s for p, (s, _) in leaves.specs().items()}
    bad = sorted(p for p in set(want) | set(got) if want.get(p) != got.get(p))
    if bad:
        shown = ", ".join(f"{p} {got.get(p)} saved, {want.get(p)} in the model" for p in bad[:6])
        raise ConversionError(f"{run.workdir} step {leaves.step} does not match its config.json: {shown}")
