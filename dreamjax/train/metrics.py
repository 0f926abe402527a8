"""Metrics out: `metrics.jsonl` (one JSON object per logged step), TensorBoard scalars, a progress bar."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from tqdm.auto import tqdm

SHOWN = ("loss", "lm_loss", "vm_loss", "tokens_per_s")


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
