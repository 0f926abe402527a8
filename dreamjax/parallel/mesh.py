"""Build the device Mesh from config, validated before anything compiles.

Mesh axes are ('data', 'fsdp', 'tensor'). A config gives a size per axis; at most one axis may be -1,
meaning "all remaining devices". Multi-slice TPU jobs add `dcn_*` sizes (the slow data-centre network
axis, normally data parallelism across slices) and get a hybrid mesh.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

MESH_AXES = ("data", "fsdp", "tensor")


class MeshError(ValueError):
    """A mesh config that cannot be laid out on the available devices."""


def resolve_axis_sizes(sizes: Mapping[str, int], num_devices: int, *, what: str = "mesh") -> tuple[int, ...]:
    """{'data': 2, 'fsdp': -1, 'tensor': 1} -> (2, num_devices // 2, 1), with clear errors."""
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise MeshError(f"{what}: unknown mesh axes {sorted(unknown)}; known axes are {MESH_AXES}")
    shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
    if any(s == 0 or s < -1 for s in shape):
        raise MeshError(f"{what}: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, shape))}")
    free = [i for i, s in enumerate(shape) if s == -1]
    if len(free) > 1:
        raise MeshError(f"{what}: at most one axis may be -1, got {dict(zip(MESH_AXES, shape))}")
    fixed = math.prod(s for s in shape if s != -1)
    if free:
        if num_devices % fixed:
            raise MeshError(
                f"{what}: the fixed axes {dict(zip(MESH_AXES, shape))} multiply to {fixed}, which does not "
                f"divide the {num_devices} devices"
            )
        shape[free[0]] = num_devices // fixed
    if math.prod(shape) != num_devices:
        raise MeshError(
            f"{what}: axis sizes {dict(zip(MESH_AXES, shape))} multiply to {math.prod(shape)} but there are "
            f"{num_devices} devices; make the product equal the device count (or use -1 for one axis)"
        )
    return tuple(shape)


def make_mesh(
    ici: Mapping[str, int] | Sequence[int],
    dcn: Mapping[str, int] | Sequence[int] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A Mesh over `devices` (default: all) with axes MESH_AXES.

    ici: per-slice axis sizes (mapping or a 3-tuple). dcn: across-slice sizes for multi-slice TPU;
    the mesh is then (dcn * ici) per axis and built by `create_hybrid_device_mesh`.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not isinstance(ici, Mapping):
        ici = dict(zip(MESH_AXES, ici))
    if dcn is not None and not isinstance(dcn, Mapping):
        dcn = dict(zip(MESH_AXES, dcn))
    if dcn:
        dcn_shape = resolve_axis_sizes(dcn, _num_slices(devices), what="dcn mesh")
        per_slice = len(devices) // math.prod(dcn_shape)
        ici_shape = resolve_axis_sizes(ici, per_slice, what="ici mesh (per slice)")
        grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices)
    else:
        ici_shape = resolve_axis_sizes(ici, len(devices))
        try:
            grid = mesh_utils.create_device_mesh(ici_shape, devices, allow_split_physical_axes=True)
        except (AssertionError, NotImplementedError, ValueError):
            # Device kinds without a topology model (e.g. host CPU): plain order is fine.
            grid = np.asarray(devices).reshape(ici_shape)
    return Mesh(grid, MESH_AXES)


def _num_slices(devices: Sequence[jax.Device]) -> int:
    return len({getattr(d, "slice_index", 0) for d in devices})


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{n}={s}" for n, s in mesh.shape.items()) + f" ({mesh.devices.size} devices)"
