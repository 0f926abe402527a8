"""Metrics out: `metrics.jsonl` (one JSON object per logged step), TensorBoard scalars and sample images, a
progress bar; and the ingredients of the MFU (model FLOPs utilisation) the loop logs:

    mfu = FLOPs of one step of the compiled per-device program / (step time * peak FLOP/s of one device)

The FLOPs are XLA's cost analysis of the compiled train step (per device, as SPMD compiles one program per
device), so they count what the hardware runs (rematerialised forwards included) and are a *lower* bound
when a loop is rolled (`scan_layers`, gradient accumulation): XLA counts a while-loop body once. The peak is
the chip's published dense bf16 FLOP/s (`PEAK_FLOPS`); a CPU has no such figure, so there the peak is this
host's fp32 matmul rate, measured once per process (`peak_flops_source` says which was used).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

SHOWN = ("loss", "lm_loss", "vm_loss", "tokens_per_s", "images_per_s", "step_time_s", "mfu")

# Peak dense bf16 FLOP/s per chip (one JAX device per chip on these), matched as substrings of the lower-cased
# `device.device_kind`, first match wins (so "v5 lite" is tested before "v5"). Sources: the vendors' spec sheets.
PEAK_FLOPS = (
    ("v6 lite", 918e12),  # TPU v6e (Trillium): cloud.google.com/tpu/docs/v6e, 918 TFLOP/s bf16
    ("v6e", 918e12),
    ("v5 lite", 197e12),  # TPU v5e: cloud.google.com/tpu/docs/v5e, 197 TFLOP/s bf16
    ("v5e", 197e12),
    ("v5p", 459e12),  # TPU v5p: cloud.google.com/tpu/docs/v5p, 459 TFLOP/s bf16
    ("v5", 459e12),  # v5p reports device_kind "TPU v5"
    ("v4", 275e12),  # TPU v4: cloud.google.com/tpu/docs/v4, 275 TFLOP/s bf16
    ("h100 pcie", 756e12),  # NVIDIA H100 datasheet: PCIe 1513 TFLOP/s bf16 with sparsity, 756 dense
    ("h100", 989e12),  # NVIDIA H100 datasheet: SXM 1979 TFLOP/s bf16 with sparsity, 989 dense
    ("h200", 989e12),  # NVIDIA H200 datasheet: same Hopper tensor cores as H100 SXM, 989 dense bf16
    ("a100", 312e12),  # NVIDIA A100 datasheet: 312 TFLOP/s bf16 dense
)
MEASURED_CPU = "measured_cpu_matmul"


class MetricsWriter:
    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # TensorBoard is optional; metrics.jsonl always has everything
            self._tb = None

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, int | float):
                    self._tb.add_scalar(f"train/{k}", v, step)

    def write_images(self, step: int, tag: str, images: np.ndarray) -> None:
        """uint8 images [N, H, W, 3] as one TensorBoard image summary (a row of N); metrics.jsonl keeps
        scalars only, so without tensorboardX the images are not written anywhere."""
        if not self.enabled or self._tb is None or len(images) == 0:
            return
        self._tb.add_images(f"samples/{tag}", np.asarray(images, np.uint8), step, dataformats="NHWC")
        self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


class Progress:
    """A tqdm bar showing the main loss terms and throughput (stderr; off on non-zero processes)."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                        desc="train")

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        self.bar.n = step
        self.bar.set_postfix({k: f"{metrics[k]:.4g}" for k in SHOWN if k in metrics}, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


# ------------------------------------------------------------------------------------------------ MFU


def compiled_flops(compiled: Any) -> float | None:
    """FLOPs of one call of a compiled program (per device) from XLA's cost analysis, or None when the
    backend gives none: `cost_analysis()` is a dict on current JAX, a list of one dict per program on some
    older versions, and may be None or lack 'flops' (some plugins)."""
    try:
        cost = compiled.cost_analysis()
    except Exception as e:  # noqa: BLE001 - an optional metric must never stop training
        log.warning("no cost analysis from the compiled train step (%s): MFU is not logged", e)
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    flops = cost.get("flops") if isinstance(cost, dict) else None
    if flops is None or not np.isfinite(flops) or flops <= 0:
        log.warning("the compiled train step's cost analysis has no FLOP count: MFU is not logged")
        return None
    return float(flops)


def peak_flops_per_device(device: jax.Device | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, where the figure comes from): the spec-sheet table for a known TPU/GPU,
    this host's measured matmul rate shared by its local CPU devices on CPU, else (None, reason)."""
    device = device or jax.local_devices()[0]
    if device.platform == "cpu":
        return measured_cpu_matmul_flops() / jax.local_device_count(), MEASURED_CPU
    flops = spec_peak_flops(device.device_kind)
    if flops is not None:
        return flops, f"spec_sheet_bf16:{device.device_kind}"
    return None, f"unknown device kind {device.device_kind!r}"


def spec_peak_flops(kind: str) -> float | None:
    """The spec-sheet dense bf16 FLOP/s of a device kind ("TPU v5 lite") or TPU generation ("v5e"), else None."""
    kind = kind.lower()
    return next((flops for pattern, flops in PEAK_FLOPS if pattern in kind), None)


@functools.cache
def measured_cpu_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """This host's fp32 matmul FLOP/s: the best of a few timed jitted [n, n] @ [n, n] products on one CPU
    device (which uses the host's intra-op thread pool, shared by all its CPU devices). Measured once per
    process (~0.5 s): a CPU has no spec-sheet peak, and the measured rate makes CPU MFUs comparable."""
    device = jax.local_devices(backend="cpu")[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()  # compile
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / max(best, 1e-9)


def mfu(flops_per_device: float | None, step_time_s: float, peak_per_device: float | None) -> float | None:
    """Model FLOPs utilisation of one step, or None when either figure is missing."""
    if not flops_per_device or not peak_per_device or step_time_s <= 0:
        return None
    return flops_per_device / (step_time_s * peak_per_device)
