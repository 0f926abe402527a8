"""Two processes on JAX's own multi-controller runtime (4 CPU devices each, localhost coordinator) train the
same losses as one process with 8 devices, and their checkpoint restores in one process. Slow (two processes
compile the step side by side on the 2-core machine): `make test-slow`."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from dreamjax.cli import main
from dreamjax.convert.core import flatten
from dreamjax.run.assembly import load_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def _losses(workdir):
    return [json.loads(line)["loss"] for line in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = str(tmp_path / "two")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-m", "dreamjax.cli", "train", "--config", TINY + ":smoke",
                               "--workdir", two, "--no-progress", "--coordinator", f"localhost:{port}",
                               "--num-processes", "2", "--process-id", str(k)],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for k in range(2)]
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0], [p.stderr.read()[-2000:] for p in procs]

    one = str(tmp_path / "one")
    assert main(["train", "--config", TINY + ":smoke", "--workdir", one, "--no-progress"]) == 0
    np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-5)

    restored, reference = load_run(two), load_run(one)  # the 2-process checkpoint, read by one process
    assert restored.step == reference.step == 3
    for path, leaf in flatten(restored.params).items():
        want = np.asarray(jax.device_get(flatten(reference.params)[path]))
        np.testing.assert_allclose(np.asarray(jax.device_get(leaf)), want, rtol=1e-4, atol=1e-6, err_msg=path)
