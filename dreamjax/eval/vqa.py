"""VQAv2 accuracy, as the official evaluation script computes it (`vqaEval.py` of GT-Vision-Lab/VQA), plus the
data it reads (a questions / annotations JSON pair and a COCO image folder). Pure Python: no JAX here.

Accuracy of one answer: for each of the (usually 10) human answers, leave it out and count the other humans
who gave the predicted answer; min(count / 3, 1), averaged over the 10 leave-one-out subsets (10 choose 9).

Normalisation follows the official script, quirks included, so numbers compare with published ones:
- `process_punctuation`: a punctuation mark is deleted when it touches a space (or the text has a digit
  comma digit), else replaced by a space; then periods not followed by a digit are removed (the script's
  look-behind is written `(?!<=\\d)`, a no-op, and `re.UNICODE` lands in the `count` argument: kept).
- `process_digit_article`: lower case, number words -> digits ("none" -> "0"), articles dropped, common
  contractions restored ("dont" -> "don't").
- The official script normalises the human answers (and the prediction) only when the humans disagree.
  The prediction is also always normalised first, as EvalAI's answer processor does to every submission
  (and as lmms-eval / LLaVA do), so "Yes." scores against ten "yes".
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't",
    "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")

# Upstream's VQAv2 prompt pieces (spec 4.2, `scripts/eval/vqa/eval_vqa.sh`): the system text opens the user
# turn, the prompt follows the question, and the assistant's reply is primed with the post prompt.
UPSTREAM_SYSTEM = "Based on the image, please answer the question."
UPSTREAM_PROMPT = "Please provide an accurate answer within one word."
UPSTREAM_POST = "The short answer '(one word)' is:"
IMAGE = "<image>"  # = data.tokenizer.IMAGE_TOKEN (kept literal: this module imports no tokenizer)
PROMPT_TEMPLATES = ("upstream", "llava", "plain")
LLAVA_SHORT_ANSWER = "Answer the question using a single word or phrase."  # LLaVA-1.5's, a common alternative


def process_punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, re.UNICODE)  # noqa: B034 - the official script passes re.UNICODE as count


def process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """What EvalAI's answer processor does to a prediction: lower case, then both official steps."""
    return process_digit_article(process_punctuation(clean(text).lower()))


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """The official per-question accuracy of `prediction` against the human answers (see the module doc)."""
    if not human_answers:
        raise ValueError("a VQA question needs at least one human answer")
    gts = [clean(a) for a in human_answers]
    pred = normalize_answer(prediction)
    if len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(a)) for a in gts]
        pred = process_digit_article(process_punctuation(pred))
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        accs.append(min(1.0, sum(a == pred for a in others) / 3.0))
    return sum(accs) / len(accs)


# ------------------------------------------------------------------------------------------------ data


def load_questions(questions_path: str, annotations_path: str | None = None) -> list[dict]:
    """VQAv2 questions (`{"questions": [{"image_id", "question", "question_id"}]}`), each with its human answers
    from the annotations file (`{"annotations": [{"question_id", "answers": [{"answer"}, ...]}]}`) when given,
    and the annotation's `answer_type` / `question_type` (for per-type accuracies). Sorted by question_id."""
    with open(questions_path) as f:
        questions = json.load(f)
    questions = questions["questions"] if isinstance(questions, dict) else questions
    answers = {}
    if annotations_path:
        with open(annotations_path) as f:
            ann = json.load(f)
        for a in ann["annotations"] if isinstance(ann, dict) else ann:
            answers[a["question_id"]] = a
    out = []
    for q in questions:
        for key in ("image_id", "question", "question_id"):
            if key not in q:
                raise ValueError(f"{questions_path}: a question lacks {key!r}: {q}")
        item = {"question_id": q["question_id"], "image_id": q["image_id"], "question": q["question"]}
        a = answers.get(q["question_id"])
        if annotations_path and a is None:
            raise ValueError(f"{annotations_path}: no annotation for question_id {q['question_id']}")
        if a is not None:
            item["answers"] = [x["answer"] for x in a["answers"]]
            for key in ("answer_type", "question_type"):
                if key in a:
                    item[key] = a[key]
        out.append(item)
    return sorted(out, key=lambda x: x["question_id"])


def image_path(image_dir: str, image_id, pattern: str = "COCO_val2014_{:012d}.jpg") -> str:
    """The image file of an image id: `pattern` is a str.format pattern (or a %-pattern such as
    `COCO_val2014_%012d.jpg`)."""
    name = pattern % image_id if "%" in pattern else pattern.format(image_id)
    return os.path.join(image_dir, name)


def vqa_prompt(question: str, template: str = "upstream") -> tuple[str, str]:
    """(user text with its `<image>` placeholder, assistant prefix) for one question.

    - `upstream` (spec 4.2, `eval_vqa.sh` for VQAv2): `{system}<image>{question} {prompt}`, the reply primed
      with "The short answer '(one word)' is:";
    - `llava`: `<image>` then the question and LLaVA-1.5's "Answer the question using a single word or phrase.";
    - `plain`: `<image>` then the question.
    """
    if template == "upstream":
        return f"{UPSTREAM_SYSTEM}{IMAGE}{question} {UPSTREAM_PROMPT}", UPSTREAM_POST
    if template == "llava":
        return f"{IMAGE}\n{question}\n{LLAVA_SHORT_ANSWER}", ""
    if template == "plain":
        return f"{IMAGE}\n{question}", ""
    raise ValueError(f"--prompt-template must be one of {PROMPT_TEMPLATES}, got {template!r}")


def summarize(records: Sequence[dict]) -> dict:
    """Overall accuracy (x100, as VQA reports it) and per answer type, over the records that have answers."""
    scored = [r for r in records if r.get("accuracy") is not None]
    out = {"questions": len(records), "scored": len(scored)}
    if scored:
        out["accuracy"] = 100.0 * sum(r["accuracy"] for r in scored) / len(scored)
        by_type: dict[str, list[float]] = {}
        for r in scored:
            if r.get("answer_type"):
                by_type.setdefault(r["answer_type"], []).append(r["accuracy"])
        out["accuracy_by_answer_type"] = {k: 100.0 * sum(v) / len(v) for k, v in sorted(by_type.items())}
    return out
