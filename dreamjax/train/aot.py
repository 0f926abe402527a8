"""`dreamjax aot`: compile the real train step for a TPU pod on a CPU machine and report what it needs.

    dreamjax aot --config configs/dreamllm_7b.py:stage2 --topology v5p-128

JAX can describe a TPU slice it does not have (`jax.experimental.topologies.get_topology_desc`, which needs
the TPU compiler, `libtpu`, installed: the `tpu` extra, or `make aot`). The step is lowered exactly as
`dreamjax train` builds it (model, mesh preset, sharding rules, optimizer, precision, gradient
accumulation), over abstract values only, so nothing is allocated and no weights are read. The compiled
program then tells the per-chip memory and FLOPs; we compare the FLOPs with the analytic count and, from
the chip's peak FLOP/s, estimate a step time and the MFU.

FLOP counting (all per training step, whole job):
- LLM: 6 N T for trainable weights (forward 2 N T, backward 4 N T), 4 N T when the LLM is frozen but
  gradients still flow through it to the dream queries (stage I); N excludes the input embedding (a
  lookup); attention 12 L T S d (QK^T and AV, forward and backward, full S x S as the kernels compute it).
- CLIP: frozen and upstream of the trainable projector, forward only: 2 N P + 4 L P^2 d per image (P patches);
  three times that when it trains (the demo stage trains every part).
- UNet and VAE: their forward FLOPs for one image are counted once by XLA's cost analysis of the unsharded
  forward on the host (convolutions make a closed form long); the UNet runs forward and backward (the
  gradient reaches the condition through every cross-attention), about 2x its forward, on every
  output-image slot and noise draw (3x when the UNet trains); the VAE encoder forward once per slot (3x when
  trained).
XLA's count is taken from the step with its loops written out (layers unrolled, micro-batches merged: XLA's cost
analysis counts a loop body once), lowered but not compiled; it is larger than the analytic count by what remat
recomputes (the 7B configs use `nothing_saveable`: one more LLM forward, so about 8/6 of the LLM's FLOPs). Memory
comes from the compiled real step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from dreamjax.data.tokenizer import BOS_TOKEN, EOS_TOKEN, INSERTION_SPECIAL_TOKEN_ORDER, PAD_TOKEN, UNK_TOKEN
from dreamjax.models.dreamllm import DreamLLM, init_params
from dreamjax.parallel import presets
from dreamjax.parallel.mesh import MESH_AXES, describe, make_mesh
from dreamjax.parallel.sharding import batch_sharding, logical_sharding, rules_from_config
from dreamjax.run.model import build_model, build_tokenizer, precision, resolve_config
from dreamjax.train.metrics import spec_peak_flops
from dreamjax.train.optimizer import make_optimizer
from dreamjax.train.stages import get_stage
from dreamjax.train.state import init_state, state_shardings_for
from dreamjax.train.step import BATCH_NDIM, StepConfig, image_budget, make_train_step

log = logging.getLogger(__name__)

GIB = 2**30

TPU_GENERATIONS = ("v4", "v5p", "v5e", "v6e")  # their peak FLOP/s: `metrics.PEAK_FLOPS` (the spec sheets)
# Chips of a slice -> its physical shape. v4 / v5p: 3-D tori (slice names count TensorCores, two per chip);
# v5e / v6e: 2-D (slice names count chips).
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 3072: "8x16x24", 4096: "16x16x16",
              6144: "16x16x24"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
TPU_EXTRA_HINT = ("the TPU compiler (libtpu) is not installed: run `make aot` (installs it into .tpu/), or "
                  "`pip install 'dreamjax[tpu]'`")


# ------------------------------------------------------------------------------------------------ topology


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # the slice name, e.g. "v5p-128" or "2xv5p-128"
    generation: str  # v4, v5p, v5e, v6e
    shape: str  # physical chip grid per slice, e.g. "4x4x4"
    slices: int
    preset: presets.Preset

    @property
    def chips(self) -> int:
        return self.preset.chips

    @property
    def peak_flops(self) -> float:
        return spec_peak_flops(self.generation)


def parse_topology(name: str) -> Topology:
    """A Cloud TPU slice name (v4-N, v5p-N count TensorCores; v5e-N, v6e-N chips; 2xv5p-128 for two slices)."""
    p = presets.preset(name)  # validates the name, knows chips and slices
    gen = name.split("x", 1)[1].split("-")[0] if name[0].isdigit() else name.split("-")[0]
    if gen not in TPU_GENERATIONS:
        raise ValueError(f"--topology {name!r} is not a TPU slice (GPU presets cannot be compiled here); use e.g. "
                         f"v5p-128, v5e-256, v4-256 or 2xv5p-128")
    per_slice = p.chips // p.slices
    shapes = _SHAPES_3D if gen in ("v4", "v5p") else _SHAPES_2D
    if per_slice not in shapes:
        raise ValueError(f"--topology {name!r}: no known physical shape for {per_slice} chips of {gen}")
    return Topology(name, gen, shapes[per_slice], p.slices, p)


def _ensure_libtpu() -> None:
    """Make `make aot`'s .tpu/ (libtpu installed beside the project, not in the venv: with libtpu in the
    venv, every CPU-only JAX process would first probe for TPU chips) importable, or fail in one line."""
    local = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), ".tpu")
    if os.path.isdir(local) and local not in sys.path:
        sys.path.append(local)
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise OSError(TPU_EXTRA_HINT) from None


def topology_devices(topo: Topology) -> list:
    """The abstract devices of the slice(s): compile targets, no memory behind them."""
    _ensure_libtpu()
    from jax.experimental import topologies

    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server on a CPU machine: don't wait for one
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile only: other processes may compile too
    kwargs = {"chip_config_name": "megacore"} if topo.generation == "v4" else {}  # v4 chips as one device each
    if topo.slices > 1:
        kwargs["num_slices"] = topo.slices
    desc = topologies.get_topology_desc(platform="tpu", topology_name=f"{topo.generation}:{topo.shape}", **kwargs)
    devices = list(desc.devices)
    if len(devices) != topo.chips:
        raise RuntimeError(f"{topo.name}: the TPU compiler describes {len(devices)} devices, expected {topo.chips}")
    return devices


# ------------------------------------------------------------------------------------------------ tokenizer


class PlannedVocab:
    """What `build_model` reads of a tokenizer, for a config whose tokenizer files are not on this machine (the
    7B configs take it from `init.llm`): the LLM's vocabulary plus DreamLLM's 8 tokens in insertion order. Only
    the vocabulary size shapes the step; the ids are data."""

    unk_token, bos_token, eos_token, pad_token = UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN
    unk_token_id = 0

    def __init__(self, base_vocab: int):
        self._ids = {UNK_TOKEN: 0, BOS_TOKEN: 1, EOS_TOKEN: 2}
        self._ids.update({t: base_vocab + i for i, t in enumerate(INSERTION_SPECIAL_TOKEN_ORDER)})
        self._len = base_vocab + len(INSERTION_SPECIAL_TOKEN_ORDER)

    def __len__(self) -> int:
        return self._len

    def convert_tokens_to_ids(self, token: str) -> int:
        return self._ids.get(token, 0)


def _tokenizer(config: ConfigDict):
    if config.tokenizer is not None or any(v for v in dict(config.get("init") or {}).values()):
        return build_tokenizer(config)
    vocab = config.model.llm.get("vocab_size") if config.model.get("llm") else None
    if not vocab:
        raise ValueError("config.tokenizer is None and config.model.llm.vocab_size is not set: the compile needs "
                         "the vocabulary size")
    return PlannedVocab(int(vocab))


# ------------------------------------------------------------------------------------------------ FLOPs


def _size(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _forward_flops(fn, *args) -> float:
    """XLA's FLOP count of `fn(*args)` compiled for the host (abstract args: nothing runs)."""
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0))


def analytic_flops(model: DreamLLM, abstract_params: dict, config: ConfigDict, trainable: tuple[str, ...],
                   noise_draws: int) -> dict[str, float]:
    """Per-step FLOPs of the whole job by part (see the module docstring for the conventions)."""
    cfg, d = model.config, config.data
    b, seq = int(config.train.global_batch_size), int(d.max_length)
    out: dict[str, float] = {}
    if cfg.llm is not None:
        llm = cfg.llm
        n = _size(abstract_params["llm"]) - llm.vocab_size * llm.hidden_size  # the input embedding is a lookup
        tokens = b * seq
        out["llm"] = (6 if "llm" in trainable else 4) * n * tokens
        out["llm_attention"] = 12 * llm.num_layers * tokens * seq * llm.hidden_size
    if cfg.vision is not None:
        v = cfg.vision
        patches = (v.image_size // v.patch_size) ** 2 + 1
        images = b * int(d.max_images_in)
        passes = 3 if "vision" in trainable else 1  # trained (the demo stage): forward + backward
        out["clip"] = passes * images * (2 * _size(abstract_params["vision"]) * patches
                                         + 4 * v.num_layers * patches**2 * v.hidden_size)
    if cfg.unet is not None:
        slots = b * int(d.max_images_out)
        unet_fwd = _unet_forward_flops(model, abstract_params)
        out["unet"] = (3 if "unet" in trainable else 2) * unet_fwd * slots * noise_draws
        if cfg.vae is not None:
            passes = 3 if "vae" in trainable else 1
            out["vae_encode"] = passes * _vae_encode_flops(model, abstract_params, int(d.resolution_out)) * slots
    return out


def _unet_forward_flops(model: DreamLLM, params) -> float:
    cfg = model.config
    u = cfg.unet
    lat = jax.ShapeDtypeStruct((1, u.sample_size, u.sample_size, u.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    cond = jax.ShapeDtypeStruct((1, cfg.num_dream_queries, u.cross_attention_dim), jnp.float32)
    return _forward_flops(lambda p, x, t, c: model.apply({"params": p}, x, t, c, method=DreamLLM.denoise),
                          params, lat, t, cond)


def _vae_encode_flops(model: DreamLLM, params, resolution: int) -> float:
    x = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
    return _forward_flops(lambda p, x: model.apply({"params": p}, x, jax.random.PRNGKey(0), method=DreamLLM.to_latents),
                          params, x)


# ------------------------------------------------------------------------------------------------ compile


@dataclasses.dataclass
class AotReport:
    topology: Topology
    mesh: str
    memory: dict[str, float]  # bytes per chip: arguments, outputs, aliased, temporaries, code, peak
    compiled_flops: float  # whole job, per step: XLA's count of the step with its loops unrolled
    analytic: dict[str, float]  # whole job, per step, by part
    optimal_seconds: float | None  # the TPU cost model's roofline time for one step, loops scaled in
    parameters: int

    @property
    def analytic_flops(self) -> float:
        return sum(self.analytic.values())

    @property
    def flops_ratio(self) -> float:
        return self.compiled_flops / self.analytic_flops

    @property
    def hbm_bytes(self) -> float:
        return self.topology.preset.hbm_gib * GIB

    def at_peak_seconds(self) -> float:
        return self.compiled_flops / (self.topology.chips * self.topology.peak_flops)

    def step_seconds(self) -> float:
        """The cost model's roofline time, but never less than the compiled FLOPs at peak."""
        return max(self.optimal_seconds or 0.0, self.at_peak_seconds())

    def _step_source(self) -> str:
        if self.optimal_seconds and self.optimal_seconds >= self.at_peak_seconds():
            return "XLA's TPU cost model, a roofline lower bound"
        if self.optimal_seconds:  # say so rather than print a cost-model label on the FLOPs bound
            return (f"compiled FLOPs at peak; XLA's TPU cost model gave {self.optimal_seconds:.2f} s, below "
                    "that bound")
        return "compiled FLOPs at peak"

    def mfu(self) -> float:
        return self.analytic_flops / (self.step_seconds() * self.topology.chips * self.topology.peak_flops)

    def lines(self) -> list[str]:
        m, g = self.memory, GIB
        out = [f"topology {self.topology.name}: {self.topology.chips} chips ({self.topology.slices} x "
               f"{self.topology.generation}:{self.topology.shape}), {self.topology.preset.hbm_gib:g} GiB HBM and "
               f"{self.topology.peak_flops / 1e12:g} TFLOP/s bf16 per chip",
               f"mesh {self.mesh}; {self.parameters:,} parameters",
               "memory per chip (GiB): " + ", ".join(f"{k} {m[k] / g:.2f}" for k in
                                                    ("arguments", "outputs", "aliased", "temporaries", "code",
                                                     "peak")),
               f"XLA FLOPs per step {self.compiled_flops:.4g} (all chips; the step's HLO with layers unrolled and "
               f"micro-batches merged, remat recomputation included)",
               "analytic FLOPs per step " + f"{self.analytic_flops:.4g} = " +
               " + ".join(f"{k} {v:.3g}" for k, v in self.analytic.items()),
               f"estimated step time {self.step_seconds():.2f} s ("
               + self._step_source()
               + f"), MFU {self.mfu():.1%} (analytic FLOPs / peak; an upper bound)",
               f"peak_memory_per_chip_gib={m['peak'] / g:.2f} hbm_gib={self.topology.preset.hbm_gib:g} "
               f"flops_ratio={self.flops_ratio:.3f}"]
        return out


def _abstract_batch(config: ConfigDict, model: DreamLLM, mesh, rules) -> dict:
    d, cfg = config.data, model.config
    b, seq = int(config.train.global_batch_size), int(d.max_length)
    shapes = {"tokens": ((b, seq), jnp.int32), "labels": ((b, seq), jnp.int32),
              "positions": ((b, seq), jnp.int32), "segment_ids": ((b, seq), jnp.int32),
              "images_in_mask": ((b, int(d.max_images_in)), jnp.bool_),
              "images_out_mask": ((b, int(d.max_images_out)), jnp.bool_),
              "images_in": ((b, int(d.max_images_in), cfg.vision.image_size, cfg.vision.image_size, 3), jnp.float32),
              "images_out": ((b, int(d.max_images_out), int(d.resolution_out), int(d.resolution_out), 3),
                             jnp.float32)}
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, rules, BATCH_NDIM[k]))
            for k, (shape, dtype) in shapes.items()}


def _memory(compiled) -> dict[str, float]:
    s = compiled.memory_analysis()
    mem = {"arguments": s.argument_size_in_bytes, "outputs": s.output_size_in_bytes,
           "aliased": s.alias_size_in_bytes, "temporaries": s.temp_size_in_bytes,
           "code": s.generated_code_size_in_bytes}
    # What the chip allocates: the arguments, the outputs that do not reuse a donated argument, the whole
    # temporary region and the code. XLA's own `peak_memory_in_bytes` (the heap's live peak) can be lower than
    # that region; the larger of the two is the one to plan with.
    allocated = mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"] + mem["code"]
    mem["peak"] = float(max(allocated, getattr(s, "peak_memory_in_bytes", 0) or 0))
    return {k: float(v) for k, v in mem.items()}


def _lower_step(config: ConfigDict, tokenizer, mesh, rules):
    """(lowered step, model, plain abstract params, stage, step config) of `dreamjax train`'s step, abstractly."""
    model, schedule = build_model(config, tokenizer)
    stage = get_stage(config.train.stage, config.train.trainable, config.train.loss_weights)
    tx, _ = make_optimizer(learning_rate=float(config.train.learning_rate), total_steps=int(config.train.steps),
                           warmup_steps=int(config.train.warmup_steps), weight_decay=float(config.train.weight_decay),
                           grad_clip_norm=config.train.grad_clip_norm)
    boxed = jax.eval_shape(lambda k: init_params(model, k), jax.random.key(0))
    param_sh = logical_sharding(boxed, mesh, rules)
    plain = nn.meta.unbox(boxed)
    state_sh, _ = state_shardings_for(param_sh, plain, tx, stage.trainable, mesh)
    _, train_dtype, frozen_dtype = precision(config)
    abstract_state = jax.eval_shape(
        lambda p, r: init_state(p, r, tx=tx, trainable_parts=stage.trainable,
                                frozen_dtype=None if frozen_dtype == jnp.float32 else frozen_dtype,
                                trainable_dtype=None if train_dtype == jnp.float32 else train_dtype),
        plain, jax.random.PRNGKey(0))
    abstract_state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                  abstract_state, state_sh)
    step_cfg = StepConfig(stage.loss_weight_lm, stage.loss_weight_vm, int(config.train.grad_accum_steps),
                          float(config.train.condition_dropout), int(config.train.noise_draws),
                          image_budget=image_budget(config))
    step_fn = make_train_step(model, tx, schedule, step_cfg, mesh, rules, state_sh)
    with mesh:
        lowered = step_fn.lower(abstract_state, _abstract_batch(config, model, mesh, rules))
    return lowered, model, plain, stage, step_cfg


def _flops(cost) -> float:
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    return float(cost.get("flops", float("nan")))


def _unrolled(config: ConfigDict) -> ConfigDict:
    """The same step with its loops written out: layers unrolled, micro-batches merged (the same work: the
    accumulation sums the same global batch). XLA's cost analysis counts a loop body once, so this is the
    program whose count is the step's."""
    c = ConfigDict(config.to_dict())
    for tower in ("llm", "vision"):
        if c.model.get(tower) is not None:
            c.model[tower].scan_layers = False
    c.train.grad_accum_steps = 1
    return c


def compile_for_topology(config: ConfigDict, topology: str) -> AotReport:
    """Lower and compile `dreamjax train`'s step for `topology` over abstract values; nothing is allocated."""
    topo = parse_topology(topology)
    devices = topology_devices(topo)
    config = resolve_config(config)
    m = config.mesh
    if m.get("preset") and m.preset != topo.name:
        log.info("config.mesh.preset %s replaced by the topology %s", m.preset, topo.name)
    ici = {k: topo.preset.ici[k] if m.get(k) is None else int(m[k]) for k in MESH_AXES}
    dcn = m.get("dcn") if m.get("dcn") is not None else topo.preset.dcn
    mesh = make_mesh(ici, dcn, devices=devices)
    rules = rules_from_config(m.get("rules") if m.get("rules") is not None else topo.preset.rules)
    tokenizer = _tokenizer(config)

    lowered, model, plain, stage, step_cfg = _lower_step(config, tokenizer, mesh, rules)
    log.info("compiling the train step for %s (mesh %s)", topo.name, describe(mesh))
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        raise DoesNotFit.from_error(e, topo, describe(mesh)) from None
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    loop_counted = _flops(cost) * topo.chips  # per-chip program, loop bodies counted once
    # the whole job's count: the unrolled step lowered for one host CPU device (lowerings for the TPU
    # topology have no cost analysis before compiling; the count does not depend on the partitioning)
    host = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices("cpu")[:1])
    whole = _flops(_lower_step(_unrolled(config), tokenizer, host, rules)[0].cost_analysis())
    optimal = cost.get("optimal_seconds")
    # The cost model's roofline time has the same loops counted once: scale it by the FLOPs it missed.
    step_s = float(optimal) * whole / loop_counted if optimal and loop_counted > 0 else None
    analytic = analytic_flops(model, plain, config, stage.trainable, step_cfg.noise_draws)
    return AotReport(topo, describe(mesh), _memory(compiled), whole, analytic, step_s, _size(plain))


class DoesNotFit(Exception):
    """The TPU compiler refused the step: more memory per chip than the chip has."""

    def __init__(self, topo: Topology, mesh: str, required_gib: float, message: str):
        super().__init__(message)
        self.topo, self.mesh, self.required_gib = topo, mesh, required_gib

    @classmethod
    def from_error(cls, e: Exception, topo: Topology, mesh: str) -> DoesNotFit:
        text = str(e)
        m = re.search(r"RESOURCE_EXHAUSTED:.*?\(([\d.]+)([GM])\)", text)
        if not m:
            raise e
        required = float(m.group(1)) / (1024 if m.group(2) == "M" else 1)
        return cls(topo, mesh, required, text.split("\n")[0])

    def lines(self) -> list[str]:
        return [f"topology {self.topo.name}: {self.topo.chips} chips; mesh {self.mesh}",
                f"does not fit: {self}",
                "try: --config.train.grad_accum_steps=N (the same global batch in N micro-batches), "
                "--config.model.unet.remat=True, --config.model.llm.remat_policy=nothing_saveable",
                f"peak_memory_per_chip_gib={self.required_gib:.2f} hbm_gib={self.topo.preset.hbm_gib:g} "
                f"flops_ratio=nan"]


def main(config: ConfigDict, topology: str) -> int:
    """Print the report; exit code 1 when the step does not fit the slice."""
    try:
        report = compile_for_topology(config, topology)
    except DoesNotFit as e:
        for line in e.lines():
            print(line)
        return 1
    for line in report.lines():
        print(line)
    return 0 if report.memory["peak"] <= report.hbm_bytes else 1
