"""`dreamjax eval fid` and `eval clip-score` end to end on a tiny trained run, a tiny random CLIP and random
Inception weights (the numbers are meaningless; the plumbing is what is tested): best-of-N by CLIP, the kept
images at --resolution, reference statistics from a folder, resumption, and the reports."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from dreamjax.cli import main as cli_main
from dreamjax.eval.commands import cli
from tests.test_rerank import save_tiny_clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    wd = str(d / "run")
    assert cli_main(["train", "--config", TINY + ":smoke", "--workdir", wd, "--no-progress",
                     "--config.train.steps=1"]) == 0
    save_tiny_clip(d / "clip")
    (d / "captions.txt").write_text("a red circle\n\na blue square on white background\na large green circle\n")
    ref = d / "real"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(ref / f"{i}.jpg")
    return d, wd


@pytest.mark.slow  # ~160 s on 2 CPU cores: InceptionV3 at 299x299 compiles and runs on the CPU
def test_fid_best_of_n_and_clip_score(setup, tmp_path, capsys):
    d, wd = setup
    out = str(tmp_path / "fid")
    base = ["fid", "--checkpoint", wd, "--captions", str(d / "captions.txt"), "--out", out, "--steps", "2",
            "--num-candidates", "2", "--clip", str(d / "clip"), "--resolution", "32", "--batch", "4",
            "--inception", "random", "--reference-images", str(d / "real"), "--no-progress"]
    assert cli(base + ["--limit", "2"]) == 0  # interrupted after 2 captions
    assert cli(base) == 0  # resumes with the third
    records = [json.loads(x) for x in open(os.path.join(out, "results.jsonl"))]
    assert [r["index"] for r in records] == [0, 1, 2]
    assert [r["caption"] for r in records] == ["a red circle", "a blue square on white background",
                                               "a large green circle"]
    for r in records:
        assert len(r["candidate_cosines"]) == 2 and r["seed"] == 42 + int(np.argmax(r["candidate_cosines"]))
        assert np.asarray(Image.open(r["image"])).shape == (32, 32, 3)
    rep = json.load(open(os.path.join(out, "report.json")))
    assert rep["images"] == 3 and np.isfinite(rep["fid"]) and rep["settings"]["guidance"] == 2.0
    assert os.path.exists(os.path.join(out, "reference_stats.npz"))
    assert "fid=" in capsys.readouterr().out
    assert "a red circle" in open(os.path.join(out, "index.html")).read()

    # CLIP score of the kept images (no checkpoint needed)
    out2 = str(tmp_path / "clip")
    assert cli(["clip-score", "--generated", out, "--clip", str(d / "clip"), "--out", out2, "--no-progress"]) == 0
    rep2 = json.load(open(os.path.join(out2, "report.json")))
    want = np.mean([max(100 * r["clip_cosine"], 0) for r in records])
    assert rep2["images"] == 3 and rep2["clip_score"] == pytest.approx(want, abs=1e-3)


def test_clip_score_of_a_folder(tmp_path):
    """`eval clip-score --generated DIR` on images listed in a results.jsonl (no DreamLLM involved)."""
    save_tiny_clip(tmp_path / "clip")
    gen = tmp_path / "gen"
    gen.mkdir()
    rng = np.random.default_rng(1)
    lines = []
    for i, text in enumerate(["a red circle", "a blue square", "green"]):
        path = str(gen / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path)
        lines.append(json.dumps({"index": i, "caption": text, "image": path}))
    (gen / "results.jsonl").write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "out")
    assert cli(["clip-score", "--generated", str(gen), "--clip", str(tmp_path / "clip"), "--out", out,
                "--no-progress", "--batch", "2"]) == 0
    rep = json.load(open(os.path.join(out, "report.json")))
    records = [json.loads(x) for x in open(os.path.join(out, "results.jsonl"))]
    assert rep["images"] == 3 and [r["index"] for r in records] == [0, 1, 2]
    cos = np.array([r["clip_cosine"] for r in records])
    assert np.all(np.abs(cos) <= 1 + 1e-6)
    assert rep["clip_score"] == pytest.approx(np.mean(np.maximum(100 * cos, 0)), abs=1e-6)
    assert rep["clip_score_raw"] == pytest.approx(np.mean(100 * cos), abs=1e-6)


def test_protocol_needs_clip_for_candidates(tmp_path, capsys):
    (tmp_path / "c.txt").write_text("a red circle\n")
    assert cli(["fid", "--checkpoint", str(tmp_path / "wd"), "--captions", str(tmp_path / "c.txt"),
                "--out", str(tmp_path / "o"),
                "--inception", "random", "--reference-stats", str(tmp_path / "s.npz")]) == 2
    assert "--clip" in capsys.readouterr().err
