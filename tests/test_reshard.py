"""A checkpoint saved on one mesh restores onto another: resuming a (8, 1, 1) run on (1, 4, 2) gives the next
step's loss of the uninterrupted run (the run assembly restores onto the current mesh's shardings)."""

import json
import os
import shutil

import numpy as np

from dreamjax.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def _losses(workdir):
    out = {}
    for line in open(os.path.join(workdir, "metrics.jsonl")):
        m = json.loads(line)
        out[m["step"]] = m["loss"]  # the last value logged for a step (a resumed run logs it again)
    return out


def test_resume_on_another_mesh(tmp_path):
    straight = str(tmp_path / "straight")
    assert main(["train", "--config", TINY + ":smoke", "--workdir", straight, "--no-progress",
                 "--config.mesh.data=8", "--config.mesh.fsdp=1", "--config.mesh.tensor=1"]) == 0
    assert sorted(os.listdir(os.path.join(straight, "checkpoints"))) == ["2", "3"]
    resumed = str(tmp_path / "resumed")
    shutil.copytree(straight, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "3"))
    assert main(["train", "--config", TINY + ":smoke", "--workdir", resumed, "--no-progress",
                 "--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.tensor=2"]) == 0
    want, got = _losses(straight)[3], _losses(resumed)[3]
    assert np.isfinite(want) and abs(got - want) <= 1e-6 * abs(want), (got, want)
