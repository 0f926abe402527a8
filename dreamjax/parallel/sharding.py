"""Logical-axis sharding rules (MaxText style): parameters and activations carry logical names,
a rule table maps them to mesh axes, so sharding experiments are a config edit.

The default table shards the batch over ('data', 'fsdp'), parameters' 'embed' dimension over 'fsdp'
(ZeRO-3 style) and heads / MLP / vocab over 'tensor'. Every logical name a model uses is in the table
(a test checks it). A dimension that its mesh axes do not divide moves them to another dimension of the
same parameter that they divide, or is replicated (tiny demo models on big meshes); either is logged once
per parameter, never silent.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

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
    ("layers", None),  # the stacked (nn.scan) layer axis: every device holds its slice of every layer
    ("norm", "fsdp"),  # norm scales / biases: tiny, but ZeRO-3 shards them too (gathered with their layer)
    # DreamLLM's own parameters: their other dimension ('embed') already takes 'fsdp', and one mesh axis
    # cannot shard two dimensions of the same array.
    ("vision_embed", None),  # the CLIP width at the visual projector's input
    ("queries", None),  # the 64 dream queries
    ("cross_embed", None),  # the UNet's cross-attention width at the condition projector's output
    # conv nets (UNet / VAE): shard output channels over fsdp (input channels when those do not divide)
    ("conv_height", None),
    ("conv_width", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
)


# Pure FSDP: every parameter sharded over 'fsdp' only (heads / MLP / vocab not split): the layout that suits a
# 7B model on one TPU slice, and the one the mesh presets pick.
FSDP_RULES: Rules = tuple((name, None if axes == "tensor" else axes) for name, axes in DEFAULT_RULES)

RULE_SETS: dict[str, Rules] = {
    "fsdp_tp": DEFAULT_RULES,  # FSDP over 'fsdp' + tensor parallelism over 'tensor' (Megatron-style splits)
    "fsdp": FSDP_RULES,
    # Multi-slice: parameters sharded over 'fsdp' inside a slice (fast ICI) and replicated across slices, the
    # batch split over 'data' (the DCN axis of a hybrid mesh) and 'fsdp': the same table as "fsdp", named for
    # what the 'data' axis means there.
    "dcn_fsdp": FSDP_RULES,
}


def rules_from_config(rules: Any | None) -> tuple[tuple[str, Any], ...]:
    """Config rules: None (the defaults), the name of a rule set (`RULE_SETS`), or a list of
    [name, axis-or-list-or-None]."""
    if rules is None:
        return tuple(DEFAULT_RULES)
    if isinstance(rules, str):
        if rules not in RULE_SETS:
            raise ValueError(f"config.mesh.rules: unknown rule set {rules!r}; choose one of {sorted(RULE_SETS)} "
                             f"or give a list of [logical name, mesh axes]")
        return tuple(RULE_SETS[rules])
    out = []
    for entry in rules:
        name, axes = entry
        out.append((str(name), tuple(axes) if isinstance(axes, list | tuple) else axes))
    return tuple(out)


_REPORTED: set[tuple[str, str]] = set()


def _report(path: str, message: str) -> None:
    """Log a sharding fallback once per (parameter, reason): `logical_sharding` runs several times a run."""
    if (path, message) not in _REPORTED:
        _REPORTED.add((path, message))
        log.info("sharding %s: %s", path, message)


def _size(mesh: Mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else tuple(axes)))


def _fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh, path: str = "",
              logical: Sequence[str | None] = ()) -> PartitionSpec:
    """`spec` with each dimension that its mesh axes do not divide fixed: the axes move to the largest other
    dimension of the parameter that is unsharded and that they divide (e.g. a UNet conv_out kernel [3, 3, 320, 4]
    shards its 320 input channels), else the dimension is replicated. Each fix is logged once."""
    fitted = list(tuple(spec) + (None,) * (len(shape) - len(spec)))
    for i, (dim, axes) in enumerate(zip(shape, list(fitted))):
        if axes is None or dim % _size(mesh, axes) == 0:
            continue
        fitted[i] = None
        free = [j for j in range(len(shape)) if fitted[j] is None and j != i and shape[j] % _size(mesh, axes) == 0
                and shape[j] > 1]
        why = (f"dim {i} ({logical[i] if i < len(logical) else '?'}) of shape {tuple(shape)} is not divisible by "
               f"mesh axes {axes} (size {_size(mesh, axes)})")
        if free:
            j = max(free, key=lambda j: shape[j])
            fitted[j] = axes
            _report(path, f"{why}; sharding dim {j} ({shape[j]}) over {axes} instead")
        else:
            _report(path, f"{why}; no other dim is, so it is replicated over {axes}")
    return PartitionSpec(*fitted)


def logical_sharding(abstract_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a tree of (possibly LogicallyPartitioned-boxed) abstract values, e.g. the
    output of `jax.eval_shape(model.init, ...)`. Leaves without names are replicated."""
    specs = nn.get_partition_spec(abstract_tree)
    shapes = nn.meta.unbox(abstract_tree)

    def one(key_path, spec, leaf):
        shape = getattr(leaf, "shape", ())
        if spec is None or not isinstance(spec, PartitionSpec):
            spec = PartitionSpec()
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules) if len(spec) else PartitionSpec()
        path = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path)
        return NamedSharding(mesh, _fit_spec(mesh_spec, shape, mesh, path, tuple(spec)))

    return jax.tree_util.tree_map_with_path(
        one, specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)


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
