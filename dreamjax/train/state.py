"""Train state: trainable params + optimizer state, frozen params apart (no grads, no optimizer state).

Everything is created directly with its NamedSharding (`jax.jit(..., out_shardings=...)`), so a 7B
model never materialises on one device.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dreamjax.parallel.sharding import Rules, logical_sharding
from dreamjax.train.stages import merge_params, split_params


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: Any
    frozen: Any
    opt_state: Any
    rng: jax.Array
    # Counters for non-finite events (spec 1.3: dropped for real and counted).
    dropped_lm: jax.Array
    dropped_vm: jax.Array
    skipped_updates: jax.Array

    @property
    def params(self) -> dict:
        return merge_params(self.trainable, self.frozen)


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def state_shardings(abstract_params: Any, tx: optax.GradientTransformation, trainable_parts, mesh: Mesh,
                    rules: Rules) -> tuple[TrainState, Any]:
    """(TrainState of NamedShardings, abstract TrainState) for boxed abstract params (eval_shape of init)."""
    param_sh = logical_sharding(abstract_params, mesh, rules)
    return state_shardings_for(param_sh, nn.meta.unbox(abstract_params), tx, trainable_parts, mesh)


def state_shardings_for(param_sh: Any, plain: Any, tx, trainable_parts, mesh: Mesh) -> tuple[TrainState, Any]:
    """(TrainState of NamedShardings, abstract optimizer state) for param shardings and plain abstract params."""
    train_sh, frozen_sh = split_params(param_sh, trainable_parts)
    train_abs, _ = split_params(plain, trainable_parts)
    opt_abs = jax.eval_shape(tx.init, train_abs)
    rep = _replicated(mesh)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abs, train_sh, transform_non_params=lambda _: rep)
    shardings = TrainState(
        step=rep, trainable=train_sh, frozen=frozen_sh, opt_state=opt_sh, rng=rep,
        dropped_lm=rep, dropped_vm=rep, skipped_updates=rep,
    )
    return shardings, opt_abs


def state_from_params(params: Any, param_shardings: Any, tx: optax.GradientTransformation, trainable_parts,
                      mesh: Mesh, rng: jax.Array, *, frozen_dtype=None,
                      trainable_dtype=None) -> tuple[TrainState, TrainState]:
    """The train state around already placed params (random init and/or pretrained weights): split into
    trainable and frozen parts, cast, optimizer state created sharded. `params` is donated.

    frozen_dtype: e.g. bf16 to store frozen parts (CLIP, UNet, VAE, a stage-I LLM) in half precision.
    trainable_dtype: bf16 for `pure_bf16` (upstream: bf16 params and AdamW states, no fp32 master).
    rng: the state's RNG key. Returns (state, shardings).
    """
    plain = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    shardings, _ = state_shardings_for(param_shardings, plain, tx, trainable_parts, mesh)
    build = functools.partial(init_state, tx=tx, trainable_parts=trainable_parts, frozen_dtype=frozen_dtype,
                              trainable_dtype=trainable_dtype)
    with mesh:
        state = jax.jit(build, out_shardings=shardings, donate_argnums=0)(params, rng)
    return state, shardings


def init_state(params: Any, rng: jax.Array, *, tx: optax.GradientTransformation, trainable_parts,
               frozen_dtype=None, trainable_dtype=None) -> TrainState:
    """The step-0 train state around `params` (traceable: `state_from_params` jits it, `dreamjax aot` traces it
    abstractly with `jax.eval_shape`)."""
    trainable, frozen = split_params(params, trainable_parts)
    if trainable_dtype is not None:
        trainable = _cast_floats(trainable, trainable_dtype)
    if frozen_dtype is not None:
        frozen = _cast_floats(frozen, frozen_dtype)
    return TrainState(
        step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen, opt_state=tx.init(trainable),
        rng=rng, dropped_lm=jnp.zeros((), jnp.int32), dropped_vm=jnp.zeros((), jnp.int32),
        skipped_updates=jnp.zeros((), jnp.int32),
    )


def create_state(init_fn, tx: optax.GradientTransformation, trainable_parts, mesh: Mesh, rules: Rules,
                 rng: jax.Array, *, frozen_dtype=None, trainable_dtype=None) -> tuple[TrainState, TrainState]:
    """Initialise params (init_fn(key) -> boxed variables['params']) sharded, then `state_from_params`.
    Returns (state, shardings)."""
    init_key, state_key = jax.random.split(rng)
    param_sh = logical_sharding(jax.eval_shape(init_fn, init_key), mesh, rules)
    with mesh:
        params = jax.jit(lambda k: nn.meta.unbox(init_fn(k)), out_shardings=param_sh)(init_key)
    return state_from_params(params, param_sh, tx, trainable_parts, mesh, state_key,
                             frozen_dtype=frozen_dtype, trainable_dtype=trainable_dtype)


def _cast_floats(tree: Any, dtype) -> Any:
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
