"""`dreamjax train`: build everything from a config, run the sharded step, log, checkpoint.

Every process of a multi-host job runs this same program (JAX multi-controller); `jax.distributed` is
initialised by the CLI before we get here. Each host feeds its own shard of the global batch.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

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
from dreamjax.train.metrics import MetricsWriter, Progress
from dreamjax.train.optimizer import make_optimizer
from dreamjax.train.stages import check_model_parts, get_stage
from dreamjax.train.state import state_from_params, state_shardings_for
from dreamjax.train.step import StepConfig, make_train_step, shard_batch

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
    )


def train(config: ConfigDict, workdir: str, *, progress: bool = True) -> dict[str, Any]:
    """Train per `config`; returns the last logged metrics."""
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
                   int(config.train.noise_draws)),
        mesh, rules, shardings,
    )
    stop = {"signal": None}

    def on_sigterm(signum, _frame):  # preemption: save and leave cleanly
        stop["signal"] = signum

    old_handler = signal.signal(signal.SIGTERM, on_sigterm)
    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
    bar = Progress(total=steps, initial=start, enabled=progress and jax.process_index() == 0)
    skips_total: dict[str, int] = {}
    last: dict[str, Any] = {}
    tokens_seen = 0.0
    t_log = time.time()
    try:
        for step in range(start, steps):
            batch = next(data_iter)
            for k, v in batch.pop(SKIPS_KEY).items():
                skips_total[k] = skips_total.get(k, 0) + v
            tokens_seen += float(batch["segment_ids"].astype(bool).sum())
            state, metrics = step_fn(state, shard_batch(batch, mesh, rules))
            done = step + 1
            if done % int(config.train.log_every) == 0 or done == steps:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                dt = time.time() - t_log
                m.update(step=done, learning_rate=float(lr_schedule(done - 1)),
                         tokens_per_s=tokens_seen * jax.process_count() / max(dt, 1e-9),
                         data_skips=sum(skips_total.values()))
                writer.write(done, m)
                bar.update(done, m)
                last, tokens_seen, t_log = m, 0.0, time.time()
            # Read the flag once: a SIGTERM landing between the save and the break must not stop the run
            # without a checkpoint at `done` (it is then seen, and saved, after the next step).
            stopping = stop["signal"]
            if done % int(config.train.checkpoint_every) == 0 or done == steps or stopping:
                checkpoint.save(mngr, state, data_iter, force=done == steps or bool(stopping))
            if stopping:
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
