"""Logical-axis sharding rules (MaxText style): parameters and activations carry logical names,
a rule table maps them to mesh axes, so sharding experiments are a config edit.

The default table shards the batch over ('data', 'fsdp'), parameters' 'embed' dimension over 'fsdp'
(ZeRO-3 style) and heads / MLP / vocab over 'tensor'. A dimension that a mesh axis does not divide is
replicated instead of failing inside XLA (tiny demo models on big meshes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DEFAULT_RULES: Rules = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # LLM / ViT parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    # conv nets (UNet / VAE): shard output channels over fsdp
    ("conv_height", None),
    ("conv_width", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
)


def rules_from_config(rules: Any | None) -> tuple[tuple[str, Any], ...]:
    """Config rules are a list of [name, axis-or-list-or-None]; None means the defaults."""
    if rules is None:
        return tuple(DEFAULT_RULES)
    out = []
    for entry in rules:
        name, axes = entry
        out.append((str(name), tuple(axes) if isinstance(axes, list | tuple) else axes))
    return tuple(out)


def _fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Replicate any dimension that its mesh axes do not divide evenly."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            fitted.append(None)
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        size = math.prod(mesh.shape[a] for a in names)
        fitted.append(axes if dim % size == 0 else None)
    return PartitionSpec(*fitted)


def logical_sharding(abstract_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a tree of (possibly LogicallyPartitioned-boxed) abstract values, e.g. the
    output of `jax.eval_shape(model.init, ...)`. Leaves without names are replicated."""
    specs = nn.get_partition_spec(abstract_tree)
    shapes = nn.meta.unbox(abstract_tree)

    def one(spec, leaf):
        shape = getattr(leaf, "shape", ())
        if spec is None or not isinstance(spec, PartitionSpec):
            spec = PartitionSpec()
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules) if len(spec) else PartitionSpec()
        return NamedSharding(mesh, _fit_spec(mesh_spec, shape, mesh))

    return jax.tree.map(one, specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)


def batch_axes(rules: Rules) -> Any:
    """The mesh axes the 'batch' logical axis maps to."""
    return nn.logical_to_mesh_axes(("batch",), rules)[0]


def data_parallel_size(mesh: Mesh, rules: Rules) -> int:
    axes = batch_axes(rules)
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in names)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int) -> NamedSharding:
    """Leading (batch) dimension sharded over the batch axes, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(rules), *([None] * (ndim - 1))))


def check_batch_divides(global_batch: int, mesh: Mesh, rules: Rules) -> None:
    n = data_parallel_size(mesh, rules)
    if global_batch % n:
        raise ValueError(
            f"global batch size {global_batch} is not divisible by the {n}-way data parallelism of the mesh "
            f"({dict(mesh.shape)}, batch -> {batch_axes(rules)}); use a multiple of {n}"
        )
