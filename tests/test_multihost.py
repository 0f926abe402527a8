"""Two processes on JAX's own multi-controller runtime (4 CPU devices each, localhost coordinator) train the
same losses as one process with 8 devices, and their checkpoint restores in one process. Slow (two processes
compile the step side by side on the 2-core machine): `make test-slow`."""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dreamjax.cli import main
from dreamjax.convert.core import flatten
from dreamjax.run.assembly import load_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
STEPS = 3
TIMEOUT = 900.0  # seconds for both processes together; then both are killed and the test fails


def _losses(workdir):
    return [json.loads(line)["loss"] for line in open(os.path.join(workdir, "metrics.jsonl"))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_two_processes(workdir: str, logs: str) -> None:
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": os.environ.get("DREAMJAX_TEST_JAX_CACHE", os.path.join(ROOT, ".jax_cache")),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1", "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    os.makedirs(logs, exist_ok=True)
    procs, files = [], []
    try:
        for k in range(2):
            # stderr to a file, not a pipe: a full pipe nobody reads would block the process
            files.append(open(os.path.join(logs, f"process_{k}.log"), "w+"))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "dreamjax.cli", "train", "--config", TINY + ":smoke", "--workdir", workdir,
                 "--no-progress", "--coordinator", f"localhost:{port}", "--num-processes", "2",
                 "--process-id", str(k), f"--config.train.steps={STEPS}"],
                cwd=ROOT, env=env, stdout=files[k], stderr=subprocess.STDOUT))
        deadline = time.time() + TIMEOUT
        while any(p.poll() is None for p in procs) and time.time() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):  # one failed: the other would wait for it
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        tails = []
        for f in files:
            f.seek(0)
            tails.append(f.read()[-3000:])
            f.close()
    codes = [p.returncode for p in procs]
    assert codes == [0, 0], (codes, tails)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    two = str(tmp_path / "two")
    _train_two_processes(two, str(tmp_path / "logs"))

    one = str(tmp_path / "one")
    assert main(["train", "--config", TINY + ":smoke", "--workdir", one, "--no-progress",
                 f"--config.train.steps={STEPS}"]) == 0
    got, want = _losses(two), _losses(one)
    assert len(got) == len(want) == STEPS
    np.testing.assert_allclose(got, want, rtol=1e-5)

    restored, reference = load_run(two), load_run(one)  # the 2-process checkpoint, read by one process
    assert restored.step == reference.step == STEPS
    for path, leaf in flatten(restored.params).items():
        want = np.asarray(jax.device_get(flatten(reference.params)[path]))
        np.testing.assert_allclose(np.asarray(jax.device_get(leaf)), want, rtol=1e-4, atol=1e-6, err_msg=path)

    # and a one-process run (8 devices) resumes training from it, with the data where the two processes left
    # it: its next loss is the one-process run's own next loss
    for workdir in (two, one):
        assert main(["train", "--config", TINY + ":smoke", "--workdir", workdir, "--no-progress",
                     f"--config.train.steps={STEPS + 1}"]) == 0
    resumed = [json.loads(line) for line in open(os.path.join(two, "metrics.jsonl"))]
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 2))
    np.testing.assert_allclose(_losses(two)[-1], _losses(one)[-1], rtol=1e-5)
