"""Caption metrics as pycocoevalcap computes them: BLEU-1..4 (`bleu_scorer.py`, option "closest") and CIDEr-D
(`cider_scorer.py`), in plain Python, plus the COCO captions data the `caption` eval reads.

Tokenisation: pycocoevalcap runs the Stanford PTB tokenizer (Java) and drops punctuation tokens. Here `tokenize`
approximates it without Java: lower case, clitics split as PTB does ("don't" -> "do n't", "man's" -> "man 's"),
punctuation removed (a hyphen inside a word stays, "t-shirt", as PTB keeps it). Scores can differ slightly
from the official toolkit's on text with unusual punctuation.

- BLEU: clipped n-gram precisions and lengths summed over the corpus, a brevity penalty against the
  reference length closest to each candidate (ties: the shorter), and pycocoevalcap's smoothing constants.
- CIDEr-D: tf-idf n-gram vectors (n = 1..4) with document frequencies over the references of the evaluated
  images, the candidate's tf-idf clipped by the reference's, a gaussian length penalty (sigma 6), averaged over
  n and over the references, x10.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence

CLITICS = ("n't", "'s", "'re", "'ve", "'ll", "'d", "'m")
_CLITICS = re.compile(r"(\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_PUNCT = re.compile(r"[^\w\s'-]")  # every punctuation mark but ' and - (those only go at a word's edges)


def tokenize(text: str) -> list[str]:
    """PTB-like tokens (see the module doc)."""
    text = text.lower().replace("\n", " ").replace("\t", " ")
    text = _CLITICS.sub(r"\1 \2", text)
    words = (w if w in CLITICS else w.strip("'-") for w in _PUNCT.sub(" ", text).split())
    return [w for w in words if w]


def ngrams(words: Sequence[str], n: int) -> Counter:
    """Counts of every k-gram, k = 1..n."""
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


# ------------------------------------------------------------------------------------------------ BLEU


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4) -> tuple[list[float], list]:
    """Corpus BLEU-1..n (pycocoevalcap `Bleu(4)`, option "closest"), and the per-candidate BLEU-1..n.

    candidates [M] strings; references [M] lists of strings. Returns ([BLEU-1 .. BLEU-n], per-item lists)."""
    small, tiny = 1e-9, 1e-15
    total = {"testlen": 0, "reflen": 0, "guess": [0] * n, "correct": [0] * n}
    per_item = []
    for cand, refs in zip(candidates, references, strict=True):
        if not refs:
            raise ValueError("every caption needs at least one reference")
        ref_words = [tokenize(r) for r in refs]
        max_counts: Counter = Counter()
        for words in ref_words:
            for g, c in ngrams(words, n).items():
                max_counts[g] = max(max_counts[g], c)
        words = tokenize(cand)
        testlen = len(words)
        reflen = min((abs(len(r) - testlen), len(r)) for r in ref_words)[1]
        guess = [max(testlen - k, 0) for k in range(n)]
        correct = [0] * n
        for g, c in ngrams(words, n).items():
            correct[len(g) - 1] += min(max_counts.get(g, 0), c)
        per_item.append(_bleu_scores(testlen, reflen, guess, correct, n, small, tiny))
        total["testlen"] += testlen
        total["reflen"] += reflen
        for k in range(n):
            total["guess"][k] += guess[k]
            total["correct"][k] += correct[k]
    corpus = _bleu_scores(total["testlen"], total["reflen"], total["guess"], total["correct"], n, small, tiny)
    return corpus, per_item


def _bleu_scores(testlen, reflen, guess, correct, n, small, tiny) -> list[float]:
    out, prod = [], 1.0
    for k in range(n):
        prod *= (correct[k] + tiny) / (guess[k] + small)
        out.append(prod ** (1.0 / (k + 1)))
    ratio = (testlen + tiny) / (reflen + small)
    if ratio < 1:
        out = [b * math.exp(1 - 1 / ratio) for b in out]
    return out


# ------------------------------------------------------------------------------------------------ CIDEr-D


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4,
            sigma: float = 6.0) -> tuple[float, list[float]]:
    """Corpus CIDEr-D (pycocoevalcap `Cider`, the mean of the per-item scores) and the per-item scores."""
    refs_counts = [[ngrams(tokenize(r), n) for r in refs] for refs in references]
    cand_counts = [ngrams(tokenize(c), n) for c in candidates]
    if len(cand_counts) != len(refs_counts):
        raise ValueError(f"{len(cand_counts)} candidates but {len(refs_counts)} reference lists")
    df: Counter = Counter()
    for refs in refs_counts:
        for g in set(g for counts in refs for g in counts):
            df[g] += 1
    log_images = math.log(float(len(refs_counts))) if refs_counts else 0.0

    def vec(counts):
        v = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, tf in counts.items():
            k = len(g) - 1
            v[k][g] = float(tf) * (log_images - math.log(max(1.0, df[g])))
            norm[k] += v[k][g] ** 2
            if k == 1:
                length += tf  # pycocoevalcap counts the bigrams as the length (its `n == 1` test)
        return v, [math.sqrt(x) for x in norm], length

    def sim(hyp, ref):
        (vh, nh, lh), (vr, nr, lr) = hyp, ref
        delta = float(lh - lr)
        val = [0.0] * n
        for k in range(n):
            for g in vh[k]:
                val[k] += min(vh[k][g], vr[k].get(g, 0.0)) * vr[k].get(g, 0.0)
            if nh[k] != 0 and nr[k] != 0:
                val[k] /= nh[k] * nr[k]
            val[k] *= math.e ** (-(delta ** 2) / (2 * sigma ** 2))
        return val

    scores = []
    for cand, refs in zip(cand_counts, refs_counts):
        if not refs:
            raise ValueError("every caption needs at least one reference")
        hyp = vec(cand)
        total = [0.0] * n
        for r in refs:
            total = [a + b for a, b in zip(total, sim(hyp, vec(r)))]
        scores.append(sum(total) / n / len(refs) * 10.0)
    return (sum(scores) / len(scores) if scores else 0.0), scores


def caption_scores(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """BLEU-1..4 and CIDEr-D (x100, as papers report them) and the per-item scores."""
    b, b_items = bleu(candidates, references)
    c, c_items = cider_d(candidates, references)
    return {"corpus": {**{f"bleu_{k + 1}": 100.0 * v for k, v in enumerate(b)}, "cider_d": 100.0 * c},
            "items": [{"bleu_4": 100.0 * bi[3], "cider_d": 100.0 * ci} for bi, ci in zip(b_items, c_items)]}


# ------------------------------------------------------------------------------------------------ data

# spec 4.2: upstream's COCO caption prompt and the reply's primer
UPSTREAM_PROMPT = "Please summarize object in one sentence within 10 words."
UPSTREAM_POST = "The image depicts"


def load_coco_captions(path: str) -> list[dict]:
    """Images with their reference captions from a COCO captions JSON (`{"images": [{"id", "file_name"}],
    "annotations": [{"image_id", "caption"}]}`, e.g. captions_val2014.json or the Karpathy-split test file).
    Returns [{"image_id", "file_name", "references": [...]}] sorted by image id (images without captions are
    left out)."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or "annotations" not in data:
        raise ValueError(f"{path} is not a COCO captions JSON (no 'annotations')")
    refs: dict = {}
    for a in data["annotations"]:
        refs.setdefault(a["image_id"], []).append(a["caption"])
    files = {im["id"]: im.get("file_name") for im in data.get("images", [])}
    return [{"image_id": i, "file_name": files.get(i), "references": refs[i]} for i in sorted(refs)]
