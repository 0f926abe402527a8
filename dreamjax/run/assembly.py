"""`Run`: everything a command needs, assembled once from a config (a new run) or a workdir (a trained run).

    run = new_run(config)              # resolved config, tokenizer, model, schedule, mesh, rules
    params = run.init_params(rng)      # random init + config.init weights, placed on the mesh
    run = load_run(workdir)            # ... and the newest readable checkpoint's params, on the mesh

`train/`, `infer/`, `eval/` and `cli.py` take a `Run` and assemble nothing themselves.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any

import flax.linen as nn
import jax
from flax import traverse_util
from jax.sharding import Mesh
from ml_collections import ConfigDict

from dreamjax.data.tokenize import LayoutConfig
from dreamjax.data.tokenizer import SpecialIds, load_tokenizer
from dreamjax.diffusion.schedule import Schedule
from dreamjax.models.dreamllm import DreamLLM, DreamLLMConfig, init_params, model_towers
from dreamjax.parallel import presets
from dreamjax.parallel.mesh import MESH_AXES, make_mesh
from dreamjax.parallel.sharding import Rules, logical_sharding, rules_from_config
from dreamjax.run import checkpoints, prompts, weights
from dreamjax.run.model import build_model, build_tokenizer, read_workdir_config, resolve_config

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
    config: ConfigDict  # resolved: the model sections carry the architecture of the weights it starts from
    tokenizer: Any  # None for a model without an LLM (`config.model.parts`)
    specials: SpecialIds | None
    model: DreamLLM
    schedule: Schedule
    mesh: Mesh
    rules: Rules
    workdir: str | None = None
    params: dict | None = None  # a loaded run's parameters, placed on `mesh`
    step: int | None = None  # the checkpoint step they come from

    @property
    def model_config(self) -> DreamLLMConfig:
        return self.model.config

    # ---------------------------------------------------------------- layout and prompts

    def layout(self) -> LayoutConfig:
        """The token layout the run trains with (block sizes, max length, mode, chat template)."""
        cfg = self.model.config
        return LayoutConfig(num_image_tokens=cfg.num_image_tokens, num_dream_queries=cfg.num_dream_queries,
                            max_length=int(self.config.data.max_length), mode=self.config.data.mode)

    def image_prompt(self, text: str, num_images: int = 0) -> list[int]:
        return prompts.image_prompt(text, self.tokenizer, self.layout(), self.specials, num_images)

    def text_prompt(self, text: str, num_images: int = 0) -> list[int]:
        return prompts.text_prompt(text, self.tokenizer, self.layout(), self.specials, num_images)

    def sample_settings(self, **overrides) -> prompts.SampleSettings:
        """The run's own sampler settings (`config.sample`), with the non-None overrides applied."""
        return prompts.SampleSettings.from_config(self.config.sample, **overrides)

    def require(self, *parts: str, for_what: str) -> None:
        """One clear error when a checkpoint without some parts (`config.model.parts`, e.g. an imported LLM)
        is asked for something that needs them."""
        missing = [p for p in parts if p not in self.model_config.parts]
        if missing:
            raise ValueError(f"{for_what} needs the model's {', '.join(missing)}, but this checkpoint has only "
                             f"{', '.join(self.model_config.parts)}")

    def check_generation(self, mode: str, with_images: bool) -> None:
        """`dreamjax generate`'s needs: the LLM always, input images the vision tower, images the UNet."""
        self.require("llm", for_what=f"generate --mode {mode}")
        if with_images:
            self.require("vision", "visual_projector", for_what="--image")
        if mode in ("image", "interleaved"):
            self.require("unet", "dream_queries", for_what=f"generate --mode {mode}")

    # ---------------------------------------------------------------- parameters

    @functools.cached_property
    def abstract_params(self) -> Any:
        """The boxed parameter tree as ShapeDtypeStructs with logical axis names (nothing allocated)."""
        return jax.eval_shape(lambda k: init_params(self.model, k), jax.random.key(0))

    @functools.cached_property
    def param_shardings(self) -> Any:
        return logical_sharding(self.abstract_params, self.mesh, self.rules)

    def init_params(self, rng: jax.Array, *, keep_file_dtype: bool = False) -> dict:
        """Random parameters, created sharded, with the `config.init` weights over them. A part `config.init`
        replaces whole is not randomly initialised at all (a leaf's random rows are computed only when a
        pretrained embedding lacks some), so the host never holds a second copy of it. keep_file_dtype: keep
        the pretrained files' dtypes (`dreamjax import`), instead of the model's parameter dtypes."""
        covered = weights.covered_parts(self.config, self.model.config)
        flat_sh = traverse_util.flatten_dict(self.param_shardings)

        def init_leaves(keep):
            # XLA drops the init of every leaf left out, so nothing of a covered part is allocated
            def init(k):
                flat = traverse_util.flatten_dict(nn.meta.unbox(init_params(self.model, k)))
                return traverse_util.unflatten_dict({p: v for p, v in flat.items() if keep(p)})

            out_sh = traverse_util.unflatten_dict({p: v for p, v in flat_sh.items() if keep(p)})
            with self.mesh:
                return jax.jit(init, out_shardings=out_sh)(rng)

        def random_leaf(path: str) -> jax.Array:
            key = tuple(path.split("/"))
            return traverse_util.flatten_dict(init_leaves(lambda p: p == key))[key]

        random = init_leaves(lambda p: p[0] not in covered)
        targets = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                               nn.meta.unbox(self.abstract_params), self.param_shardings)
        return weights.load_pretrained(self.config, self.model.config, dict(random), targets, random_leaf=random_leaf,
                                       keep_file_dtype=keep_file_dtype)

    def restore_params(self, step: int | None = None) -> tuple[dict, int]:
        """Parameters of the newest readable checkpoint (or `step`) in this run's workdir, on the mesh."""
        if self.workdir is None:
            raise ValueError("this run has no workdir to restore from")
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                              nn.meta.unbox(self.abstract_params), self.param_shardings)
        return checkpoints.restore_params(checkpoints.checkpoints_dir(self.workdir), target, step=step,
                                          what=f"run {self.workdir}")

    # ---------------------------------------------------------------- files

    def save_files(self, workdir: str) -> None:
        """The resolved config and the tokenizer, so a workdir is all `dreamjax generate` needs."""
        if jax.process_index() != 0:
            return
        os.makedirs(workdir, exist_ok=True)
        with open(checkpoints.config_path(workdir), "w") as f:
            f.write(self.config.to_json_best_effort(indent=2))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(checkpoints.tokenizer_dir(workdir))


DEFAULT_MESH = {"data": 1, "fsdp": -1, "tensor": 1}  # ZeRO-3 over every device


def mesh_from_config(config: ConfigDict, overrides: dict[str, int] | None = None) -> tuple[Mesh, Rules]:
    """The mesh and rules of `config.mesh`: a named preset (`preset`, see `parallel/presets.py`) or the
    defaults, then each axis the config sets (not None), then `overrides` (e.g. `generate --mesh`)."""
    m = config.mesh
    base, dcn, rules = dict(DEFAULT_MESH), m.get("dcn"), m.get("rules")
    if m.get("preset"):
        p = presets.preset(m.preset)
        if jax.device_count() != p.chips:
            raise ValueError(f"config.mesh.preset {p.name!r} is {p.chips} devices, but this job has "
                             f"{jax.device_count()}")
        base, dcn, rules = p.ici, dcn if dcn is not None else p.dcn, rules if rules is not None else p.rules
    sizes = {k: base[k] if m.get(k) is None else int(m[k]) for k in MESH_AXES}
    sizes.update(overrides or {})
    return make_mesh(sizes, dcn), rules_from_config(rules)


def new_run(config: ConfigDict, *, mesh_overrides: dict[str, int] | None = None) -> Run:
    """A run from an experiment config: the model sections resolved against `config.init`'s weights."""
    config = resolve_config(config)
    tokenizer = build_tokenizer(config)
    model, schedule = build_model(config, tokenizer)
    mesh, rules = mesh_from_config(config, mesh_overrides)
    return Run(config, tokenizer, _specials(tokenizer), model, schedule, mesh, rules)


def _specials(tokenizer) -> SpecialIds | None:
    return None if tokenizer is None else SpecialIds.from_tokenizer(tokenizer)


def load_run(workdir: str, *, step: int | None = None, mesh_overrides: dict[str, int] | None = None,
             with_params: bool = True) -> Run:
    """A trained run from its workdir: resolved config, tokenizer, model, and (by default) the params of the
    newest checkpoint that reads back, restored sharded onto the run's mesh (its `config.mesh`, with
    `mesh_overrides`), so a model too big for one device still loads."""
    workdir = os.path.abspath(workdir)
    checkpoints.require(workdir, "checkpoint directory")
    config = read_workdir_config(workdir)
    tokenizer = None
    if "llm" in model_towers(config.model.to_dict()):  # a checkpoint without an LLM has no tokenizer
        tokenizer = load_tokenizer(checkpoints.require(checkpoints.tokenizer_dir(workdir), "tokenizer"))
    model, schedule = build_model(config, tokenizer)
    mesh, rules = mesh_from_config(config, mesh_overrides)
    run = Run(config, tokenizer, _specials(tokenizer), model, schedule, mesh, rules, workdir)
    if with_params:
        run.params, run.step = run.restore_params(step)
    return run
