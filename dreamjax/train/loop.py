"""`dreamjax train`: build everything from a config, run the sharded step, log, checkpoint.

Every process of a multi-host job runs this same program (JAX multi-controller); `jax.distributed` is
initialised by the CLI before we get here. Each host feeds its own shard of the global batch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from dreamjax.data.images import to_uint8
from dreamjax.data.packing import DEFAULT_OPEN_ROWS, open_rows_of
from dreamjax.data.pipeline import SKIPS_KEY, PipelineConfig, make_dataset
from dreamjax.data.prepared import open_mixture
from dreamjax.data.synthetic import world_from_config
from dreamjax.data.tokenize import LayoutConfig
from dreamjax.models.dreamllm import DreamLLMConfig
from dreamjax.parallel.mesh import describe
from dreamjax.parallel.sharding import check_batch_divides
from dreamjax.run import checkpoints
from dreamjax.run.assembly import Run, new_run
from dreamjax.run.model import precision
from dreamjax.train import checkpoint
from dreamjax.train.metrics import MetricsWriter, Progress, compiled_flops, mfu, peak_flops_per_device
from dreamjax.train.optimizer import make_optimizer
from dreamjax.train.stages import check_model_parts, get_stage
from dreamjax.train.state import state_from_params, state_shardings_for
from dreamjax.train.step import StepConfig, image_budget, make_train_step, shard_batch

log = logging.getLogger(__name__)


def build_sources(config: ConfigDict) -> tuple[dict, dict]:
    """(sources, weights) of `config.data`: the synthetic shapes world, or directories written by `dreamjax
    prepare` (`data.paths` name -> directory, `data.mixture` name -> weight). Every problem is a one-line
    ValueError, raised before anything is built or compiled."""
    if config.data.source == "prepared":
        return open_mixture(config.data.get("paths"), config.data.get("mixture"))
    if config.data.source != "synthetic":
        raise ValueError(f"config.data.source {config.data.source!r} is not supported; use 'synthetic' or 'prepared'")
    world = world_from_config(config.data)
    n = 1_000_000  # records are generated on the fly from their index
    sources = {"pairs": world.pairs("train", n), "conversations": world.conversations("train", n),
               "documents": world.documents("train", n)}
    weights = dict(config.data.mixture)
    unknown = set(weights) - set(sources)
    if unknown:
        raise ValueError(f"config.data.mixture: unknown sources {sorted(unknown)}; known: {sorted(sources)}")
    return sources, weights


def pipeline_config(config: ConfigDict, model_cfg: DreamLLMConfig, per_host_batch: int) -> PipelineConfig:
    d = config.data
    return PipelineConfig(
        layout=LayoutConfig(num_image_tokens=model_cfg.num_image_tokens, num_dream_queries=model_cfg.num_dream_queries,
                            max_length=int(d.max_length), mode=d.mode),
        per_host_batch=per_host_batch, max_images_in=int(d.max_images_in), max_images_out=int(d.max_images_out),
        resolution_in=model_cfg.vision.image_size, resolution_out=int(d.resolution_out),
        random_flip=bool(d.random_flip), seed=int(d.seed), num_workers=int(d.num_workers),
        read_threads=int(d.get("read_threads", 2)), prefetch_batches=int(d.get("prefetch_batches", 4)),
        packing=open_rows_of(d.get("packing", False), d.get("packing_rows", DEFAULT_OPEN_ROWS)),
        jpeg_draft=bool(d.get("jpeg_draft", True)),
    )


def train(config: ConfigDict, workdir: str, *, progress: bool = True, sampler: Sampler | None = None) -> dict[str, Any]:
    """Train per `config`; returns the last logged metrics.

    sampler: `dreamjax.infer.text_to_image.text_to_image` (or any function with its signature), for the sample
    images `train.sample_every` logs to TensorBoard. It is passed in because `train/` must not import
    `infer/` (DESIGN.md section 1); without it those images are off.
    """
    t_start = time.time()
    sources, weights = build_sources(config)  # data errors first: before a model is built or compiled
    run = new_run(config)
    config, mesh, rules, mcfg = run.config, run.mesh, run.rules, run.model_config
    stage = get_stage(config.train.stage, config.train.trainable, config.train.loss_weights)
    check_model_parts(mcfg.parts)
    global_batch = int(config.train.global_batch_size)
    check_batch_divides(global_batch, mesh, rules)
    if global_batch % jax.process_count():
        raise ValueError(f"global batch {global_batch} does not divide over {jax.process_count()} processes")
    accum = int(config.train.grad_accum_steps)
    if accum < 1 or global_batch % accum:
        raise ValueError(f"grad_accum_steps {accum} must be >= 1 and divide the global batch {global_batch}")
    steps = int(config.train.steps)
    if steps < 1:
        raise ValueError(f"config.train.steps must be >= 1, got {steps}")
    log.info("mesh %s, stage %s (trainable: %s)", describe(mesh), config.train.stage, ", ".join(stage.trainable))

    tx, lr_schedule = make_optimizer(
        learning_rate=float(config.train.learning_rate), total_steps=steps,
        warmup_steps=int(config.train.warmup_steps), weight_decay=float(config.train.weight_decay),
        grad_clip_norm=config.train.grad_clip_norm,
    )
    per_host = global_batch // jax.process_count()
    data = make_dataset(sources, weights, run.tokenizer, pipeline_config(config, mcfg, per_host),
                        process_index=jax.process_index(), process_count=jax.process_count())
    data_iter = iter(data)

    run.save_files(workdir)
    mngr = checkpoints.manager(checkpoints.checkpoints_dir(workdir), max_to_keep=int(config.train.keep_checkpoints),
                               with_data=True)
    state, shardings, start = _initial_state(run, tx, stage.trainable, mngr, data_iter)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.trainable))
    n_frozen = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.frozen))
    log.info("parameters: %s trainable, %s frozen", f"{n_params:,}", f"{n_frozen:,}")

    step_fn = make_train_step(
        run.model, tx, run.schedule,
        StepConfig(stage.loss_weight_lm, stage.loss_weight_vm, accum, float(config.train.condition_dropout),
                   int(config.train.noise_draws), image_budget=image_budget(config)),
        mesh, rules, shardings,
    )
    stop = {"signal": None}

    def on_sigterm(signum, _frame):  # preemption: save and leave cleanly
        stop["signal"] = signum

    old_handler = signal.signal(signal.SIGTERM, on_sigterm)
    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
    bar = Progress(total=steps, initial=start, enabled=progress and jax.process_index() == 0)
    samples = _SampleLogger(run, config, writer, sampler)
    perf = _StepPerf()
    skips_total: dict[str, int] = {}
    last: dict[str, Any] = {}
    interval = _Interval()
    try:
        for step in range(start, steps):
            batch = next(data_iter)
            for k, v in batch.pop(SKIPS_KEY).items():
                skips_total[k] = skips_total.get(k, 0) + v
            interval.count(batch)
            sharded = shard_batch(batch, mesh, rules)
            if step == start:  # compiled here, timed apart from the steps, and its FLOPs read for the MFU
                interval.excluded_s += perf.compile(step_fn, state, sharded)
            state, metrics = step_fn(state, sharded)
            done = step + 1
            interval.steps += 1
            scheduled = done % int(config.train.checkpoint_every) == 0 or done == steps
            if scheduled:  # before the log line, so the line reports how long this save blocked the loop
                interval.checkpoint(_save_checkpoint(mngr, state, data_iter, force=done == steps))
            if samples.due(done):
                interval.excluded_s += samples.log(state, done)
            if done % int(config.train.log_every) == 0 or done == steps:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                m.update(step=done, learning_rate=float(lr_schedule(done - 1)), data_skips=sum(skips_total.values()))
                m.update(interval.rates(perf))
                writer.write(done, m)
                bar.update(done, m)
                last, interval = m, _Interval()
            # Read the flag once, after the log: the save and the break below must agree, or a SIGTERM landing
            # between them would stop the run without a checkpoint at `done` (a later one is seen next step).
            stopping = stop["signal"]
            if stopping:
                if not scheduled:
                    _save_checkpoint(mngr, state, data_iter, force=True)
                log.warning("received signal %s: checkpoint saved at step %d, stopping", stopping, done)
                break
        mngr.wait_until_finished()
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        bar.close()
        writer.close()
        mngr.close()
    if skips_total and jax.process_index() == 0:
        with open(os.path.join(workdir, "data_skips.json"), "w") as f:
            json.dump(skips_total, f, indent=2, sort_keys=True)
    last["train_seconds"] = time.time() - t_start
    return last


def _initial_state(run: Run, tx, trainable: tuple[str, ...], mngr, data_iter):
    """(state, shardings, start step): the newest readable checkpoint of this workdir when there is one
    (then nothing is initialised and `config.init`'s weights are not read), else fresh params with
    `config.init`'s weights over them."""
    _, train_dtype, frozen_dtype = precision(run.config)
    dtypes = dict(frozen_dtype=None if frozen_dtype == jnp.float32 else frozen_dtype,
                  trainable_dtype=None if train_dtype == jnp.float32 else train_dtype)
    init_key, state_key = jax.random.split(jax.random.PRNGKey(int(run.config.seed)))
    build = lambda p: state_from_params(p, run.param_shardings, tx, trainable, run.mesh, state_key, **dtypes)
    if mngr.latest_step() is not None:
        abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                nn.meta.unbox(run.abstract_params), run.param_shardings)
        target = jax.eval_shape(lambda p: build(p)[0], abstract)
        shardings, _ = state_shardings_for(run.param_shardings, abstract, tx, trainable, run.mesh)
        state, start = checkpoint.restore_latest(mngr, target, shardings, data_iter)
        log.info("resumed from step %d", start)
        return state, shardings, start
    state, shardings = build(run.init_params(init_key))
    return state, shardings, 0


# ------------------------------------------------------------------------------------------------ metrics

# text_to_image(run, prompts, settings, *, seed) -> images in [-1, 1] [N, R, R, 3]
Sampler = Callable[..., np.ndarray]
SAMPLE_STEPS = 25  # at most: sample images show progress, not the final quality `config.sample.steps` buys


class _Interval:
    """What one logging interval trained (steps, tokens, images) and the time it spent not training: the
    first step's compile, checkpoint saves blocking the loop and sample images. The rates exclude that time
    (so they and the MFU measure the step itself); the checkpoint's share is logged as `checkpoint_block_s`."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.steps = 0
        self.tokens = 0.0
        self.images = 0.0
        self.excluded_s = 0.0
        self.checkpoint_s: float | None = None

    def count(self, batch: dict) -> None:
        """This process's rows of a host batch: tokens (non-padding) and images present, in and out."""
        self.tokens += float(batch["segment_ids"].astype(bool).sum())
        self.images += float(batch["images_in_mask"].sum() + batch["images_out_mask"].sum())

    def checkpoint(self, seconds: float) -> None:
        self.checkpoint_s = (self.checkpoint_s or 0.0) + seconds

    def rates(self, perf: _StepPerf) -> dict[str, Any]:
        """tokens_per_s, images_per_s (whole job), step_time_s, mfu and checkpoint_block_s (when a save fell in
        this interval). Every process counts its own rows; the batch rows are split evenly over processes."""
        train_s = time.perf_counter() - self.t0 - self.excluded_s - (self.checkpoint_s or 0.0)
        train_s = max(train_s, 1e-9)
        out: dict[str, Any] = {"tokens_per_s": self.tokens * jax.process_count() / train_s,
                               "images_per_s": self.images * jax.process_count() / train_s,
                               "step_time_s": train_s / max(self.steps, 1)}
        util = mfu(perf.flops, out["step_time_s"], perf.peak)
        if util is not None:
            out.update(mfu=util, peak_flops_source=perf.peak_source)
        if self.checkpoint_s is not None:
            out["checkpoint_block_s"] = self.checkpoint_s
        return out


class _StepPerf:
    """The compiled train step's FLOPs per device (XLA's cost analysis) and one device's peak FLOP/s: the
    two constants of the MFU (see `dreamjax.train.metrics`). None when either is unknown."""

    def __init__(self):
        self.flops: float | None = None
        self.peak: float | None = None
        self.peak_source: str | None = None

    def compile(self, step_fn, state, batch) -> float:
        """Compile the step ahead of its first call (the jit cache then serves that call: one compile, not
        two), read its FLOPs and the peak; returns the seconds this took, which no step time should count."""
        t = time.perf_counter()
        self.flops = compiled_flops(step_fn.lower(state, batch).compile())
        if self.flops is not None:
            self.peak, self.peak_source = peak_flops_per_device()
            if self.peak is None:
                log.warning("no peak FLOP/s for this device (%s): MFU is not logged", self.peak_source)
            else:
                log.info("train step: %.4g FLOPs per device, peak %.4g FLOP/s per device (%s)", self.flops,
                         self.peak, self.peak_source)
        return time.perf_counter() - t


def _save_checkpoint(mngr, state, data_iter, *, force: bool) -> float:
    """Start an (asynchronous) checkpoint save; returns how long it blocked the loop. The step that made
    `state` is waited for first: the save would wait for it anyway (it reads the step number and copies the
    arrays to the host), and that wait is the step's time, not the checkpoint's."""
    jax.block_until_ready(state.step)
    t = time.perf_counter()
    checkpoint.save(mngr, state, data_iter, force=force)
    return time.perf_counter() - t


class _SampleLogger:
    """Images of the fixed prompts `train.sample_prompts`, drawn from the current params with the run's sampler
    settings (at most SAMPLE_STEPS steps) and seed, to TensorBoard every `train.sample_every` steps: the same
    noise each time, so the images show what training changed."""

    def __init__(self, run: Run, config: ConfigDict, writer: MetricsWriter, sampler: Sampler | None):
        self.run, self.writer, self.sampler = run, writer, sampler
        self.every = int(config.train.get("sample_every", 0) or 0)
        self.prompts = [str(p) for p in (config.train.get("sample_prompts") or ())]
        self.seed = int(config.seed)
        off = self._why_off(run)
        if self.every > 0 and off:
            log.warning("train.sample_every=%d but no sample images: %s", self.every, off)
            self.every = 0
        if self.every > 0:
            self.settings = run.sample_settings(steps=min(int(config.sample.steps), SAMPLE_STEPS))

    def _why_off(self, run: Run) -> str | None:
        if self.sampler is None:
            return "train() was given no sampler (dreamjax.infer.text_to_image.text_to_image)"
        if not self.prompts:
            return "train.sample_prompts is empty"
        missing = [p for p in ("llm", "unet", "dream_queries") if p not in run.model_config.parts]
        if missing:
            return f"the model has no {', '.join(missing)}"
        if jax.process_count() > 1:
            # The sampler is a collective jit, but it fetches its batch-sharded images with `device_get`,
            # which needs every device addressable from this process.
            return "the sampler fetches its images to one host, which a multi-process job cannot do"
        return None

    def due(self, done: int) -> bool:
        return self.every > 0 and done % self.every == 0

    def log(self, state, done: int) -> float:
        """Draw and write the images; returns the seconds it took. A failure is logged and turns sampling
        off: sample images are a diagnostic and must not end a run."""
        t = time.perf_counter()
        try:
            run = dataclasses.replace(self.run, params=state.params)
            images = self.sampler(run, self.prompts, self.settings, seed=self.seed)
            self.writer.write_images(done, "text_to_image", to_uint8(np.asarray(images)))
        except Exception:  # noqa: BLE001
            log.exception("sample images failed at step %d; no more sample images this run", done)
            self.every = 0
        seconds = time.perf_counter() - t
        log.info("sample images at step %d: %.1f s (not counted in step_time_s)", done, seconds)
        return seconds
