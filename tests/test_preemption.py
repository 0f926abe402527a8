"""Preemption: `kill -9` in the middle of a run, then the same command again, gives bit for bit the losses of an
uninterrupted run (params, optimizer, RNG and the Grain iterator all come back from the checkpoint), and SIGTERM
leaves a checkpoint at the step the run had reached."""

import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
STEPS = 12


def _command(workdir):
    return [sys.executable, "-m", "dreamjax.cli", "train", "--config", TINY + ":smoke", "--workdir", workdir,
            "--no-progress", f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=2",
            "--config.train.log_every=1"]


def _env():
    env = dict(os.environ)
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=os.environ.get("DREAMJAX_TEST_JAX_CACHE", os.path.join(ROOT, ".jax_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
    return env


def _logged(workdir) -> dict[int, float]:
    path = os.path.join(workdir, "metrics.jsonl")
    out = {}
    if os.path.exists(path):
        for line in open(path):
            if line.endswith("\n"):
                m = json.loads(line)
                out[m["step"]] = m["loss"]  # the last value logged for a step
    return out


def _run_until(workdir, step: int, sig: int, timeout: float = 300.0) -> int:
    """Start training, send `sig` once step `step` is logged; returns the exit code."""
    proc = subprocess.Popen(_command(workdir), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    try:
        while max(_logged(workdir), default=0) < step:
            assert proc.poll() is None, f"training ended before step {step}: {proc.stderr.read()[-2000:]}"
            assert time.time() < deadline, "training did not reach the step in time"
            time.sleep(0.02)
        proc.send_signal(sig)
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()


def _run(workdir) -> None:
    done = subprocess.run(_command(workdir), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def test_kill_9_then_resume_gives_the_uninterrupted_losses(tmp_path):
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    _run(straight)
    assert _run_until(killed, 3, signal.SIGKILL) == -signal.SIGKILL
    assert max(_logged(killed)) < STEPS, "the kill came after the end: nothing was interrupted"
    _run(killed)
    want, got = _logged(straight), _logged(killed)
    assert sorted(want) == list(range(1, STEPS + 1)) and sorted(got) == sorted(want)
    assert got == want  # exact float equality, every step


def test_sigterm_saves_a_checkpoint_at_the_current_step(tmp_path):
    workdir = str(tmp_path / "run")
    assert _run_until(workdir, 3, signal.SIGTERM) == 0
    reached = max(_logged(workdir))
    assert reached < STEPS
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert steps[-1] == reached, (steps, reached)
