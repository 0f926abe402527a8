"""The evaluation metrics against hand-computed values: VQA accuracy (official normalisation and 10-choose-9
averaging), BLEU and CIDEr-D (pycocoevalcap definitions), the Fréchet distance and streamed statistics; and
against reference implementations on small hand-made sets: the official VQA evaluation
(`tests/torch_reference/vqa_eval_reference.py`) and pycocoevalcap's `Bleu` / `Cider` (skipped without it)."""

import json
import math

import numpy as np
import pytest

from dreamjax.eval import caption, fid, vqa
from tests.torch_reference import vqa_eval_reference as vqa_ref

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


# question_id -> (prediction, ten human answers, answer type), each probing one step of the official evaluation
VQA_SET = {
    1: ("yes", ["yes"] * 10, "yes/no"),  # unanimous humans: compared raw
    2: ("two", ["2"] * 3 + ["3"] * 7, "number"),  # number words, humans disagree: 0.9
    3: ("2", ["two", "2", "2", "3", "3", "3", "3", "3", "3", "three"], "number"),  # humans' words become digits
    4: ("none", ["0"] * 4 + ["zero"] * 2 + ["1"] * 4, "number"),  # "none" and "zero" are "0"
    5: ("t-shirt", ["t-shirt", "t shirt", "tshirt", "shirt", "t-shirt", "shirt", "tee", "shirt", "top", "t-shirt"],
        "other"),  # an inner hyphen becomes a space
    6: ("1,000", ["1000", "1,000", "1 000", "100", "1000", "one thousand", "1000", "many", "1,000", "10,000"],
        "number"),  # digit-comma-digit: every mark deleted
    7: ("3.5", ["3.5", "3.5", "3", "4", "3.50", "3.5.", "three", "3", "4", "3.5"], "number"),  # period before a digit
    8: ("The dog", ["dog", "dog", "a dog", "cat", "cat", "cat", "cat", "cat", "cat", "the cat"], "other"),  # articles
    9: ("dont know", ["don't know", "dont know", "no", "no", "no", "no", "no", "no", "no", "no"], "other"),
    10: ("red", ["red"] + ["blue"] * 9, "other"),  # one human: 0.3
    11: ("red car", ["red car", "red car", "car"] + ["truck"] * 7, "other"),  # two humans
    12: ("cat", ["dog"] * 10, "other"),  # nobody: 0
    13: ("hello , world!", ["hello world", "hello world", "hello, world", "hi", "hi", "hi", "hello", "hello",
                            "hello world!", "(hello world)"], "other"),  # marks touching a space are deleted
    14: (" Yes\n", ["yes"] * 8 + ["no"] * 2, "yes/no"),  # whitespace and case
    15: ("isnt", ["isn't", "isnt", "is not", "no", "isn't", "no", "no", "no", "no", "no"], "other"),  # contractions
    # Unanimous humans, a prediction not in normal form: the official script compares it raw (0), dreamjax
    # normalises every prediction first as EvalAI does to submissions (1), see the module doc of vqa.py.
    16: ("Yes.", ["yes"] * 10, "yes/no"),
    17: ("Two", ["2"] * 10, "number"),
}
PREPROCESSED_ONLY = {16, 17}  # where dreamjax and the raw official script differ, by design


def _official(predictions: dict) -> vqa_ref.VQAEval:
    ev = vqa_ref.VQAEval()
    ev.evaluate({q: vqa_ref.annotation(q, humans, t) for q, (_, humans, t) in VQA_SET.items()}, predictions)
    return ev


def test_vqa_tables_and_normalisation_match_official():
    ref = vqa_ref.VQAEval()
    assert vqa.CONTRACTIONS == ref.contractions and vqa.NUMBER_WORDS == ref.manualMap
    assert list(vqa.ARTICLES) == ref.articles and list(vqa.PUNCTUATION) == ref.punct
    texts = [t for pred, humans, _ in VQA_SET.values() for t in [pred, *humans]]
    texts += ["a man's hat?", "1,000-2,000 dollars", "what's that", "Im here", "3 . 5", "...", "@home <b>", "yes ."]
    for text in texts:
        assert vqa.process_punctuation(text) == ref.processPunctuation(text), text
        assert vqa.process_digit_article(text) == ref.processDigitArticle(text), text
        assert vqa.normalize_answer(text) == ref.processDigitArticle(ref.processPunctuation(text.strip())), text


def test_vqa_accuracy_matches_official_evaluation():
    ours = {q: vqa.vqa_accuracy(pred, humans) for q, (pred, humans, _) in VQA_SET.items()}
    raw = _official({q: pred for q, (pred, _, _) in VQA_SET.items()})
    ref = vqa_ref.VQAEval()
    pre = _official({q: ref.processDigitArticle(ref.processPunctuation(pred.strip()))  # EvalAI's preprocessing
                     for q, (pred, _, _) in VQA_SET.items()})
    for q in VQA_SET:
        assert ours[q] == pytest.approx(pre.accQA[q], abs=1e-12), q
        if q in PREPROCESSED_ONLY:
            assert (raw.accQA[q], ours[q]) == (0.0, 1.0), q
        else:
            assert ours[q] == pytest.approx(raw.accQA[q], abs=1e-12), q
    # the set reaches every regime: full, partial (1 or 2 matching humans among 9), none
    assert {round(a, 6) for a in ours.values()} >= {1.0, 0.0, 0.3, 0.6, 0.9}
    summary = vqa.summarize([{"accuracy": ours[q], "answer_type": t} for q, (_, _, t) in VQA_SET.items()])
    assert round(summary["accuracy"], 2) == pre.accuracy["overall"]
    assert {k: round(v, 2) for k, v in summary["accuracy_by_answer_type"].items()} == pre.accuracy["perAnswerType"]


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


# Pre-tokenised captions (lower case, space separated, no punctuation): `caption.tokenize` leaves them as they are
# and pycocoevalcap (without its Java PTB tokenizer) splits them on spaces, so both score the same tokens.
CAPTION_SET = {
    "img1": ("a man riding a wave on top of a surfboard",
             ["a man riding a wave on a surfboard", "a surfer rides a large wave in the ocean",
              "a person on a surfboard riding a wave", "man surfing on a big wave",
              "a surfer is riding a wave on his board"]),
    "img2": ("two dogs playing with a frisbee in the grass",
             ["two dogs play with a frisbee on the grass", "a couple of dogs chasing a frisbee in a field",
              "two brown dogs running in the grass", "dogs playing in a grassy park with a toy"]),
    "img3": ("a plate of food with broccoli and rice",
             ["a plate with rice and broccoli on it", "a white plate topped with rice meat and broccoli",
              "a dish of chicken broccoli and rice", "a close up of a plate of food",
              "food on a plate with vegetables", "a meal of rice and broccoli is n't finished"]),
    "img4": ("a red bus",
             ["a red double decker bus driving down a street", "a red bus parked on the side of the road",
              "a big red bus on a city street"]),
    "img5": ("a cat sitting on a laptop keyboard on a desk next to a cup of coffee and a man 's phone",
             ["a cat sitting on a laptop keyboard", "a cat lying on top of a laptop computer",
              "a cat sits on the keyboard of a laptop on a desk", "a kitten on a laptop next to a mug"]),
    "img6": ("the train",
             ["a train pulling into a station", "a train on the tracks near a platform",
              "a long train traveling down the tracks"]),
}


def test_bleu_and_cider_d_match_pycocoevalcap():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    gts = {k: refs for k, (_, refs) in CAPTION_SET.items()}
    res = {k: [cand] for k, (cand, _) in CAPTION_SET.items()}
    cands = [cand for cand, _ in CAPTION_SET.values()]
    refs = [r for _, r in CAPTION_SET.values()]
    for words in [*cands, *(x for r in refs for x in r)]:
        assert caption.tokenize(words) == words.split()  # the text really is pre-tokenised

    want_bleu, want_bleu_items = Bleu(4).compute_score(gts, res, verbose=0)
    got_bleu, got_bleu_items = caption.bleu(cands, refs)
    np.testing.assert_allclose(got_bleu, want_bleu, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.array(got_bleu_items).T, np.array(want_bleu_items), rtol=0, atol=1e-6)
    assert 0.05 < want_bleu[3] < 0.95  # neither trivial nor perfect

    want_cider, want_cider_items = Cider().compute_score(gts, res)
    got_cider, got_cider_items = caption.cider_d(cands, refs)
    assert got_cider == pytest.approx(float(want_cider), abs=1e-6)
    np.testing.assert_allclose(got_cider_items, want_cider_items, rtol=0, atol=1e-6)
    assert len(set(np.round(want_cider_items, 3))) == len(CAPTION_SET) and want_cider > 0.1


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
