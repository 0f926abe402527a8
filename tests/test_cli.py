"""End to end through the command line: train the tiny config for a few steps, resume, generate;
user errors exit 2 with one clear line."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from dreamjax.cli import load_config, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("run"))
    rc = main(["train", "--config", TINY + ":smoke", "--workdir", wd, "--no-progress"])
    assert rc == 0
    return wd


def test_train_writes_metrics_checkpoint_tokenizer_config(workdir):
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [m["step"] for m in lines] == [1, 2, 3]
    for m in lines:
        for k in ("loss", "lm_loss", "vm_loss", "grad_norm", "tokens_per_s"):
            assert np.isfinite(m[k]), (k, m)
        assert m["loss"] == pytest.approx(m["lm_loss"] + 10 * m["vm_loss"], rel=1e-5)  # demo weights (1, 10)
        for k in ("images_per_s", "step_time_s", "mfu"):  # tests/test_metrics.py tests them further
            assert np.isfinite(m[k]) and m[k] > 0, (k, m)
    assert [m["step"] for m in lines if "checkpoint_block_s" in m] == [2, 3]  # checkpoint_every=2, and the last
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == "3"
    assert os.path.exists(os.path.join(workdir, "tokenizer", "tokenizer.json"))
    cfg = json.load(open(os.path.join(workdir, "config.json")))
    assert cfg["train"]["steps"] == 3
    assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_resume_continues_from_the_checkpoint(workdir, caplog):
    caplog.set_level("INFO")
    rc = main(["train", "--config", TINY + ":smoke", "--workdir", workdir, "--no-progress", "--config.train.steps=4"])
    assert rc == 0
    steps = [json.loads(x)["step"] for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert steps == [1, 2, 3, 4]
    assert "resumed from step 3" in caplog.text


def test_generate_image_and_text(workdir, tmp_path, capsys):
    out = str(tmp_path / "img")
    rc = main(["generate", "--checkpoint", workdir, "--prompt", "a large red circle on a white background",
               "--mode", "image", "--steps", "3", "--out", out, "--num-images", "2"])
    assert rc == 0
    pngs = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    assert len(pngs) == 2
    assert json.load(open(os.path.join(out, "output.json")))["images"] == [os.path.join(out, p) for p in pngs]
    side = load_config(TINY).model.unet.sample_size
    assert np.asarray(Image.open(os.path.join(out, pngs[0]))).shape == (side, side, 3)

    src = tmp_path / "in.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(src)
    out = str(tmp_path / "txt")
    rc = main(["generate", "--checkpoint", workdir, "--prompt", "What color is the shape?", "--image", str(src),
               "--out", out, "--max-new-tokens", "3"])
    assert rc == 0
    record = json.load(open(os.path.join(out, "output.json")))
    assert record["mode"] == "text" and record["prompt"] == "What color is the shape?"
    assert record["text"] == capsys.readouterr().out.strip().splitlines()[-1].strip() or record["text"] == ""


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--config", "nope.py", "--workdir", "x"], "config file not found"),
        (["train", "--config", TINY, "--workdir", "x", "--config.train.nosuch=1"], "no such config key"),
        (["train", "--config", TINY, "--workdir", "x", "--config.mesh.data=3"], "multiply to 3 but there are 8"),
        (["train", "--config", TINY, "--workdir", "x", "--config.train.precision='fp8'"], "precision"),
        (["train", "--config", TINY, "--workdir", "x", "--config.train.global_batch_size=12"], "not divisible"),
        (["generate", "--checkpoint", "/nonexistent", "--prompt", "x", "--out", "y"], "not found"),
    ],
)
def test_user_errors_exit_2_with_one_line(argv, needle, capsys, tmp_path):
    argv = [str(tmp_path / "wd") if a == "x" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


@pytest.mark.parametrize("precision,stage", [("bf16", "demo"), ("pure_bf16", "stage2")])
def test_reduced_precision_modes_train(precision, stage, tmp_path):
    """bf16 compute with fp32 master weights, and upstream's pure bf16 (frozen parts stored in bf16 too)."""
    wd = str(tmp_path / precision)
    rc = main(["train", "--config", TINY + ":smoke", "--workdir", wd, "--no-progress", "--config.train.steps=2",
               f"--config.train.precision={precision}", f"--config.train.stage={stage}"])
    assert rc == 0
    lines = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))]
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        for k in ("loss", "lm_loss", "vm_loss", "grad_norm"):
            assert np.isfinite(m[k]) and m[k] > 0, (k, m)
        assert m["skipped_updates"] == 0 and m["dropped_lm"] == 0 and m["dropped_vm"] == 0
