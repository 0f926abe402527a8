"""The evaluation metrics against hand-computed values: VQA accuracy (official normalisation and 10-choose-9
averaging), BLEU and CIDEr-D (pycocoevalcap definitions), the Fréchet distance and streamed statistics."""

import json
import math

import numpy as np
import pytest

from dreamjax.eval import caption, fid, vqa

# ------------------------------------------------------------------------------------------------ VQA


@pytest.mark.parametrize("text, want", [
    ("yes.", "yes"),
    ("3.5", "3.5"),
    ("1,000", "1000"),
    ("t-shirt", "t shirt"),
    ("hello , world", "hello world"),
    ("dont", "don't"),
    ("none", "0"),
    ("The Two dogs", "2 dogs"),
    ("a man's hat?", "man's hat"),
])
def test_vqa_normalisation(text, want):
    assert vqa.normalize_answer(text) == want


@pytest.mark.parametrize("pred, humans, want", [
    ("yes", ["yes"] * 10, 1.0),
    ("Yes.", ["yes"] * 10, 1.0),  # the prediction is always normalised (EvalAI)
    ("two", ["2"] * 3 + ["3"] * 7, (3 * 2 / 3 + 7 * 1) / 10),  # 0.9
    ("Red.", ["red"] + ["blue"] * 9, 9 * (1 / 3) / 10),  # 0.3
    ("The dog", ["dog"] * 2 + ["cat"] * 8, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # 0.6
    ("cat", ["dog"] * 10, 0.0),
    ("2", ["2", "2", "two", "3", "3", "3", "3", "3", "3", "3"], (2 * (2 / 3) + 1 * (2 / 3) + 7 * 1) / 10),
])
def test_vqa_accuracy_hand_computed(pred, humans, want):
    assert vqa.vqa_accuracy(pred, humans) == pytest.approx(want)


def test_vqa_data_and_summary(tmp_path):
    q = {"questions": [{"image_id": 9, "question": "What?", "question_id": 91},
                       {"image_id": 7, "question": "Who?", "question_id": 70}]}
    a = {"annotations": [{"question_id": 70, "answers": [{"answer": "me"}] * 10, "answer_type": "other"},
                         {"question_id": 91, "answers": [{"answer": "yes"}] * 10, "answer_type": "yes/no"}]}
    (tmp_path / "q.json").write_text(json.dumps(q))
    (tmp_path / "a.json").write_text(json.dumps(a))
    items = vqa.load_questions(str(tmp_path / "q.json"), str(tmp_path / "a.json"))
    assert [i["question_id"] for i in items] == [70, 91]
    assert items[0]["answers"] == ["me"] * 10 and items[1]["answer_type"] == "yes/no"
    assert vqa.image_path("/d", 7) == "/d/COCO_val2014_000000000007.jpg"
    assert vqa.image_path("/d", 7, "img_%d.png") == "/d/img_7.png"
    s = vqa.summarize([{"accuracy": 1.0, "answer_type": "yes/no"}, {"accuracy": 0.5, "answer_type": "other"}])
    assert s["accuracy"] == pytest.approx(75.0) and s["accuracy_by_answer_type"] == {"other": 50.0, "yes/no": 100.0}
    user, post = vqa.vqa_prompt("What?")
    assert user == "Based on the image, please answer the question.<image>What? Please provide an accurate " \
                   "answer within one word." and post == "The short answer '(one word)' is:"
    from dreamjax.data.tokenizer import IMAGE_TOKEN

    assert vqa.IMAGE == IMAGE_TOKEN


# ------------------------------------------------------------------------------------------------ captions


def test_tokenize_approximates_ptb():
    assert caption.tokenize("A man's T-shirt, isn't it?") == ["a", "man", "'s", "t-shirt", "is", "n't", "it"]
    assert caption.tokenize("  Two dogs -- running.  ") == ["two", "dogs", "running"]


def test_bleu_identical_is_one():
    corpus, items = caption.bleu(["a cat sits on the mat"], [["a cat sits on the mat", "something else"]])
    assert corpus == pytest.approx([1.0] * 4, abs=1e-6) and items[0][3] == pytest.approx(1.0, abs=1e-6)


def test_bleu_hand_computed():
    (b1, b2, b3, b4), _ = caption.bleu(["the cat sat on the mat"], [["the cat is on the mat"]])
    assert b1 == pytest.approx(5 / 6) and b2 == pytest.approx(math.sqrt(0.5)) and b3 == pytest.approx(0.5)
    assert b4 < 1e-3  # no 4-gram matches: only pycocoevalcap's 1e-15 smoothing
    (b1, *_), _ = caption.bleu(["the cat"], [["the cat sat on the mat"]])
    assert b1 == pytest.approx(math.exp(1 - 6 / 2))  # brevity penalty
    (b1, *_), _ = caption.bleu(["a b c"], [["a b", "a b c d e"]])
    assert b1 == pytest.approx(1.0)  # the closest reference (2 words) is shorter: no penalty


def test_bleu_is_corpus_level():
    """Counts are summed over the corpus before the geometric mean (not an average of sentence BLEUs)."""
    (b1, b2, *_), _ = caption.bleu(["a b", "c d"], [["a b"], ["c x"]])
    assert b1 == pytest.approx(3 / 4) and b2 == pytest.approx(math.sqrt(3 / 4 * 1 / 2))


def test_cider_d_hand_computed():
    score, items = caption.cider_d(["a b", "c d"], [["a b"], ["c d"]])
    assert items == pytest.approx([5.0, 5.0]) and score == pytest.approx(5.0)  # n=1, 2 match; no 3-, 4-grams
    _, items = caption.cider_d(["a", "c d"], [["a b"], ["c d"]])
    assert items[0] == pytest.approx(10 / (4 * math.sqrt(2)) * math.exp(-1 / 72))
    score, _ = caption.cider_d(["a b"], [["a b"]])
    assert score == 0.0  # one image: every n-gram's idf is log(1) - log(1)


def test_caption_scores_and_coco_json(tmp_path):
    out = caption.caption_scores(["a b", "c d"], [["a b"], ["c d"]])
    assert out["corpus"]["cider_d"] == pytest.approx(500.0)
    data = {"images": [{"id": 3, "file_name": "x.jpg"}, {"id": 1, "file_name": "y.jpg"}],
            "annotations": [{"image_id": 3, "caption": "p"}, {"image_id": 1, "caption": "q"},
                            {"image_id": 3, "caption": "r"}]}
    (tmp_path / "c.json").write_text(json.dumps(data))
    items = caption.load_coco_captions(str(tmp_path / "c.json"))
    assert items == [{"image_id": 1, "file_name": "y.jpg", "references": ["q"]},
                     {"image_id": 3, "file_name": "x.jpg", "references": ["p", "r"]}]


# ------------------------------------------------------------------------------------------------ FID


def test_frechet_identical_is_zero():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16))
    mu, sigma = fid.statistics(x)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


@pytest.mark.parametrize("m1, s1, m2, s2", [(0.0, 1.0, 0.0, 1.0), (1.0, 2.0, -1.0, 0.5), (3.0, 1.0, 0.0, 3.0)])
def test_frechet_1d_closed_form(m1, s1, m2, s2):
    got = fid.frechet_distance(np.array([m1]), np.array([[s1 ** 2]]), np.array([m2]), np.array([[s2 ** 2]]))
    assert got == pytest.approx((m1 - m2) ** 2 + (s1 - s2) ** 2, abs=1e-9)


def test_frechet_diagonal_and_singular():
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.0])  # v2 singular: the eps retry path
    got = fid.frechet_distance(np.zeros(3), np.diag(v1), np.ones(3), np.diag(v2))
    assert got == pytest.approx(3 + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2), abs=1e-4)


def test_running_stats_equal_np_cov(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(101, 8)) * 3 + 5
    stats = fid.RunningStats(8)
    for chunk in np.array_split(x, 7):
        stats.update(chunk)
    mu, sigma = stats.finalize()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
    path = fid.save_stats(str(tmp_path / "s.npz"), mu, sigma)
    mu2, sigma2 = fid.load_stats(path)
    assert fid.frechet_distance(mu, sigma, mu2, sigma2) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(FileNotFoundError):
        fid.load_stats(str(tmp_path / "nope.npz"))
