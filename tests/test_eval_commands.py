"""`dreamjax eval vqa` and `eval caption` end to end on a tiny trained run: report.json, results.jsonl,
index.html, resumption after an interruption, and one-line user errors."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from dreamjax.cli import main as cli_main
from dreamjax.eval.commands import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("run"))
    rc = cli_main(["train", "--config", TINY + ":smoke", "--workdir", wd, "--no-progress",
                   "--config.train.steps=1"])
    assert rc == 0
    return wd


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """5 images in COCO naming, VQAv2 questions / annotations, and a COCO captions JSON."""
    d = tmp_path_factory.mktemp("coco")
    rng = np.random.default_rng(0)
    ids = [3, 5, 8, 13, 21]
    for i in ids:
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(d / f"COCO_val2014_{i:012d}.jpg")
    questions = [{"image_id": i, "question": "What color is the shape?", "question_id": i * 10} for i in ids]
    annotations = [{"question_id": i * 10, "answers": [{"answer": "red"}] * 7 + [{"answer": "blue"}] * 3,
                    "answer_type": "other"} for i in ids]
    (d / "q.json").write_text(json.dumps({"questions": questions}))
    (d / "a.json").write_text(json.dumps({"annotations": annotations}))
    caps = {"images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in ids],
            "annotations": [{"image_id": i, "caption": c} for i in ids
                            for c in ("a red circle on white", "a large red circle")]}
    (d / "c.json").write_text(json.dumps(caps))
    return d


def _lines(path):
    return [json.loads(x) for x in open(path)]


def test_vqa_end_to_end_and_resume(workdir, coco, tmp_path, capsys):
    out = str(tmp_path / "vqa")
    base = ["vqa", "--checkpoint", workdir, "--questions", str(coco / "q.json"), "--annotations",
            str(coco / "a.json"), "--images", str(coco), "--out", out, "--batch", "2", "--max-new-tokens", "3",
            "--no-progress"]
    assert cli(base + ["--limit", "3"]) == 0  # an "interrupted" run: 3 of 5 done
    first = _lines(os.path.join(out, "results.jsonl"))
    assert [r["question_id"] for r in first] == [30, 50, 80]
    assert cli(base) == 0  # resumes: only the 2 missing are evaluated
    records = _lines(os.path.join(out, "results.jsonl"))
    assert [r["question_id"] for r in records] == [30, 50, 80, 130, 210]
    assert records[:3] == first
    rep = json.load(open(os.path.join(out, "report.json")))
    assert rep["questions"] == 5 and rep["scored"] == 5
    want = 100 * np.mean([r["accuracy"] for r in records])
    assert rep["accuracy"] == pytest.approx(want)
    for r in records:
        assert r["accuracy"] in (0.0, 1.0) or r["prediction"] in ("red", "blue")
    assert "accuracy=" in capsys.readouterr().out
    page = open(os.path.join(out, "index.html")).read()
    assert "What color is the shape?" in page and "<img" in page
    assert len(json.load(open(os.path.join(out, "answers.json")))) == 5
    # other settings in the same --out refuse to mix
    assert cli(base + ["--prompt-template", "plain"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_caption_end_to_end(workdir, coco, tmp_path):
    out = str(tmp_path / "cap")
    assert cli(["caption", "--checkpoint", workdir, "--captions", str(coco / "c.json"), "--images", str(coco),
                "--out", out, "--batch", "4", "--max-new-tokens", "4", "--no-progress"]) == 0
    rep = json.load(open(os.path.join(out, "report.json")))
    assert rep["images"] == 5
    for k in ("bleu_1", "bleu_4", "cider_d"):
        assert np.isfinite(rep[k]) and rep[k] >= 0
    records = _lines(os.path.join(out, "results.jsonl"))
    assert [r["image_id"] for r in records] == [3, 5, 8, 13, 21]
    assert all(isinstance(r["caption"], str) for r in records)
    assert "a large red circle" in open(os.path.join(out, "index.html")).read()


def test_user_errors(workdir, coco, tmp_path, capsys):
    assert cli(["vqa", "--checkpoint", workdir, "--questions", str(tmp_path / "nope.json"), "--images", str(coco),
                "--out", str(tmp_path / "o")]) == 2
    assert "nope.json" in capsys.readouterr().err
    assert cli(["vqa", "--checkpoint", workdir, "--questions", str(coco / "q.json"), "--images",
                str(tmp_path / "noimages"), "--out", str(tmp_path / "o2"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "image not found" in err[0]
