"""Logical-axis sharding rules (MaxText style): parameters and activations carry logical names,
a rule table maps them to mesh axes, so sharding experiments are a config edit.

The default table shards the batch over ('data', 'fsdp'), parameters' 'embed' dimension over 'fsdp'
(ZeRO-3 style) and heads / MLP / vocab over 'tensor', with 'fsdp' fallbacks for weights that have no
'embed'-like dimension, so on a mesh without tensor parallelism (or under the pure-FSDP rules) every weight with
a divisible dimension is still sharded. Every logical name a model uses is in the table (a test checks it).
A dimension that its mesh axes do not divide moves them to another dimension of the same parameter that they
divide, or is replicated (tiny demo models on big meshes); either is logged once per parameter and reason,
never silent.
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
    # Parameters. Order is priority: flax gives each dimension the first rule of its name whose mesh axes the
    # parameter does not use yet, so when two dimensions of one weight both want 'fsdp', the one listed first
    # takes it, and a name listed twice falls back to its second rule when its first is taken (or, see
    # `logical_sharding`, targets only size-1 mesh axes).
    ("vocab", "tensor"),  # vocabulary rows (embed_tokens, lm_head): Megatron-style vocab-parallel
    ("embed", "fsdp"),  # the model width, in (nearly) every weight: the ZeRO-3 dimension
    ("heads", "tensor"),  # attention heads * head_dim: column / row parallel attention
    ("kv_heads", "tensor"),  # GQA K/V heads: split with the query heads they serve
    ("head_dim", None),  # never split inside a head
    ("mlp", "tensor"),  # MLP hidden width: column / row parallel MLP
    ("layers", None),  # the stacked (nn.scan) layer axis: every device holds its slice of every layer
    ("norm", "fsdp"),  # norm scales / biases: tiny, but ZeRO-3 shards them too (gathered with their layer)
    # DreamLLM's own widths: 'fsdp' like 'embed', but after it, so in the projectors ([vision_embed, embed],
    # [embed, cross_embed]) and the dream queries ([queries, embed]) the LLM width takes 'fsdp' and these take it
    # only where 'embed' is absent.
    ("vision_embed", "fsdp"),  # the CLIP width at the visual projector's input
    ("cross_embed", "fsdp"),  # the UNet's cross-attention width at the condition projector's output
    ("queries", "fsdp"),  # the 64 dream queries
    # conv nets (UNet / VAE), kernels [kh, kw, in, out]: output channels over 'fsdp'; input channels only where
    # no output-channel or 'embed' dimension took it (the UNet's time-embedding linear_1 [conv_in, mlp]); the
    # kernel window is never split
    ("conv_height", None),
    ("conv_width", None),
    ("conv_out", "fsdp"),
    ("conv_in", "fsdp"),
    # Fallbacks for weights whose only big dimensions are tensor-parallel ones (biases [mlp] / [heads], CLIP's
    # stacked q/k/v biases [layers, heads]), used under the pure-FSDP rules and on meshes without a 'tensor' axis,
    # so no divisible weight stays whole on every device. A kernel's 'embed' has taken 'fsdp' before these.
    ("vocab", "fsdp"),
    ("heads", "fsdp"),
    ("kv_heads", "fsdp"),
    ("mlp", "fsdp"),
)


def _without_tensor_parallelism(rules: Rules) -> Rules:
    """`rules` with the parameter rules to 'tensor' dropped (so their 'fsdp' fallbacks apply) and the activation
    rules to 'tensor' mapped to None."""
    return tuple((name, None) if name.startswith("act_") and axes == "tensor" else (name, axes)
                 for name, axes in rules if axes != "tensor" or name.startswith("act_"))


# Pure FSDP: every parameter sharded over 'fsdp' only (heads / MLP / vocab not split): the layout that suits a
# 7B model on one TPU slice, and the one the mesh presets pick.
FSDP_RULES: Rules = _without_tensor_parallelism(DEFAULT_RULES)

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
    shards its 320 input channels), else the dimension is replicated. Each fix is logged (INFO) once per
    (parameter path, reason), with the shape, logical axes and mesh axes / sizes."""
    fitted = list(tuple(spec) + (None,) * (len(shape) - len(spec)))
    for i, (dim, axes) in enumerate(zip(shape, list(fitted))):
        if axes is None or dim % _size(mesh, axes) == 0:
            continue
        fitted[i] = None
        free = [j for j in range(len(shape)) if fitted[j] is None and j != i and shape[j] % _size(mesh, axes) == 0
                and shape[j] > 1]
        why = (f"dim {i} ({logical[i] if i < len(logical) else '?'}) of shape {tuple(shape)} (logical axes "
               f"{tuple(logical)}) is not divisible by mesh axes {axes} (size {_size(mesh, axes)} of mesh "
               f"{dict(mesh.shape)})")
        if free:
            j = max(free, key=lambda j: shape[j])
            fitted[j] = axes
            _report(path, f"{why}; sharding dim {j} ({shape[j]}) over {axes} instead")
        else:
            _report(path, f"{why}; no other dim is, so it is replicated over {axes}")
    return PartitionSpec(*fitted)


def _effective_rules(rules: Rules, mesh: Mesh) -> Rules:
    """`rules` without those whose mesh axes all have size 1 on `mesh`: such a rule shards nothing, and dropping it
    lets the name's next rule apply (e.g. on a mesh without tensor parallelism, 'mlp' -> 'tensor' gives way to
    'mlp' -> 'fsdp', so an MLP bias is sharded instead of sitting whole on every device)."""
    def trivial(axes) -> bool:
        names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        return bool(names) and all(mesh.shape.get(a, 0) == 1 for a in names)

    return tuple((name, axes) for name, axes in rules if not trivial(axes))


def _real(spec: PartitionSpec, ndim: int, mesh: Mesh) -> tuple:
    """What `spec` actually splits: per dimension, its mesh axes of size > 1 (None when there are none)."""
    out = []
    for axes in tuple(spec) + (None,) * (ndim - len(spec)):
        names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        out.append(tuple(a for a in names if mesh.shape.get(a, 0) != 1) or None)
    return tuple(out)


def logical_sharding(abstract_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a tree of (possibly LogicallyPartitioned-boxed) abstract values, e.g. the
    output of `jax.eval_shape(model.init, ...)`. Leaves without names are replicated.

    Each parameter's spec is the table's, unless skipping the rules to size-1 mesh axes (`_effective_rules`)
    splits it differently: then that (e.g. an MLP bias on a mesh with tensor=1 takes 'fsdp' instead of the
    size-1 'tensor'). Otherwise the table's spec stands as written, size-1 axes included, so a weight's spec reads
    the same on every mesh. Dimensions their mesh axes do not divide are then fixed by `_fit_spec`, which logs
    each fix with the parameter's path."""
    effective = _effective_rules(rules, mesh)
    specs = nn.get_partition_spec(abstract_tree)
    shapes = nn.meta.unbox(abstract_tree)

    def one(key_path, spec, leaf):
        shape = getattr(leaf, "shape", ())
        if spec is None or not isinstance(spec, PartitionSpec):
            spec = PartitionSpec()
        path = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path)
        if not len(spec):
            return NamedSharding(mesh, _fit_spec(PartitionSpec(), shape, mesh, path))
        as_written = nn.logical_to_mesh_axes(tuple(spec), rules)
        skipping = nn.logical_to_mesh_axes(tuple(spec), effective)
        mesh_spec = as_written if _real(as_written, len(shape), mesh) == _real(skipping, len(shape), mesh) \
            else skipping
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
