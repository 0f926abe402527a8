"""Named mesh presets for TPU slices and GPU nodes: `--config.mesh.preset=v5p-128`.

Slice names follow Cloud TPU's: v4 and v5p count TensorCores (v5p-128 is 64 chips, 4x4x4; v4-256 is 128
chips), v5e and v6e count chips (v5e-256 is 16x16). `2xv5p-128` is two slices joined over the data-centre
network (DCN). A preset fixes the device count, lays the chips out as pure FSDP (`fsdp` takes every chip of
a slice, the batch also goes over `data` across slices) and picks a rule set; any axis the config sets
(`--config.mesh.tensor=4`) overrides the preset's, and `fsdp` stays "the rest".
"""

from __future__ import annotations

import dataclasses
import re

# Chips per slice of the sizes Cloud TPU sells (TensorCore counts for v4 / v5p).
_TENSORCORE_SIZES = {
    "v4": (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
    "v5p": (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 6144, 8192, 12288),
}
_CHIP_SIZES = {"v5e": (1, 4, 8, 16, 32, 64, 128, 256), "v6e": (1, 4, 8, 16, 32, 64, 128, 256)}
GPU_NODES = {"h100x8": 8, "h200x8": 8, "a100x8": 8}
# HBM per chip, GiB (for memory plans): v4 32, v5p 95, v5e 16, v6e 32, H100 80, H200 141, A100 80.
HBM_GIB = {"v4": 32, "v5p": 95, "v5e": 16, "v6e": 32, "h100x8": 80, "h200x8": 141, "a100x8": 80}


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    chips: int  # devices in the whole job
    slices: int
    rules: str  # a name of `dreamjax.parallel.sharding.RULE_SETS`
    hbm_gib: float

    @property
    def ici(self) -> dict[str, int]:
        return {"data": 1, "fsdp": -1, "tensor": 1}

    @property
    def dcn(self) -> dict[str, int] | None:
        return {"data": self.slices, "fsdp": 1, "tensor": 1} if self.slices > 1 else None


def names() -> list[str]:
    out = [f"{g}-{n}" for g, sizes in _TENSORCORE_SIZES.items() for n in sizes]
    out += [f"{g}-{n}" for g, sizes in _CHIP_SIZES.items() for n in sizes]
    return out + list(GPU_NODES)


def preset(name: str) -> Preset:
    """The preset called `name` (e.g. "v5p-128", "v5e-256", "2xv5p-128", "h100x8"); ValueError otherwise."""
    m = re.fullmatch(r"(?:(\d+)x)?([a-z0-9]+)-(\d+)", name)
    if name in GPU_NODES:
        return Preset(name, GPU_NODES[name], 1, "fsdp", HBM_GIB[name])
    if m:
        slices, gen, size = int(m.group(1) or 1), m.group(2), int(m.group(3))
        if gen in _TENSORCORE_SIZES and size in _TENSORCORE_SIZES[gen]:
            return Preset(name, slices * size // 2, slices, "fsdp" if slices == 1 else "dcn_fsdp", HBM_GIB[gen])
        if gen in _CHIP_SIZES and size in _CHIP_SIZES[gen]:
            return Preset(name, slices * size, slices, "fsdp" if slices == 1 else "dcn_fsdp", HBM_GIB[gen])
    raise ValueError(f"unknown mesh preset {name!r}: use a Cloud TPU slice name (v4-N and v5p-N count TensorCores, "
                     f"v5e-N and v6e-N chips; e.g. v5p-128, v5e-256, 2xv5p-128 for two slices) or one of "
                     f"{sorted(GPU_NODES)}")
