"""Image -> text evaluations on a loaded run (spec 4.2): VQAv2-style accuracy and COCO captioning.

Both build one user turn of the run's conversation template around one image, optionally prime the reply
with upstream's post prompt (the text after `ASSISTANT:`), decode greedily (upstream uses beam search 5; not
ported: greedy is what `dreamjax generate` does), batch the items over the run's mesh, and append each
batch's records to `results.jsonl` so an interrupted eval resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dreamjax.data import images as imgs
from dreamjax.data.tokenize import prompt_ids
from dreamjax.eval import caption as cap
from dreamjax.eval import report, vqa
from dreamjax.infer.decode import generate_text
from dreamjax.run.assembly import Run

PAGE_ITEMS = 100  # rows shown in index.html


@dataclasses.dataclass(frozen=True)
class TextSettings:
    max_new_tokens: int = 10
    batch: int = 32
    seed: int = 0
    prompt_template: str = "upstream"


def chat_ids(run: Run, user: str, post: str = "") -> list[int]:
    """BOS + one user turn open for the reply (`... ASSISTANT:`), the reply primed with `post` when given."""
    layout = run.layout()
    text = layout.template.prompt([("user", user), ("assistant", None)])
    if post:
        text += " " + post
    return prompt_ids(text, run.tokenizer, layout, run.specials)


def load_pixels(run: Run, paths: Sequence[str], workers: int = 8) -> np.ndarray:
    """[B, 1, S, S, 3] CLIP-normalised images (decoded in threads: PIL releases the GIL)."""
    side = run.model_config.vision.image_size

    def one(path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image not found: {path}")
        return imgs.clip_preprocess(imgs.decode_image(path, name=path), side)

    with ThreadPoolExecutor(workers) as pool:
        return np.stack(list(pool.map(one, paths)))[:, None]


def answer(run: Run, prompts: Sequence[list[int]], pixels: np.ndarray, settings: TextSettings) -> list[str]:
    outs = generate_text(run.model, run.params, prompts, images_in=pixels,
                         images_in_mask=np.ones(pixels.shape[:2], bool), max_new_tokens=settings.max_new_tokens,
                         stop_ids=[run.specials.eos], seed=settings.seed, mesh=run.mesh, rules=run.rules)
    return [run.tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]


def _loop(items: list[dict], results: report.ResultsLog, batch: int, fn: Callable[[list[dict]], list[dict]],
          desc: str, progress: bool) -> None:
    todo = results.todo(items)
    bar = report.progress(len(items), desc, progress, initial=len(items) - len(todo))
    for start in range(0, len(todo), batch):
        chunk = todo[start:start + batch]
        results.extend(fn(chunk))
        bar.update(len(chunk))
    bar.close()


# ------------------------------------------------------------------------------------------------ VQA


def evaluate_vqa(run: Run, items: list[dict], image_dir: str, out_dir: str, settings: TextSettings, *,
                 image_pattern: str = "COCO_val2014_{:012d}.jpg", progress: bool = True) -> dict:
    """VQA accuracy over `items` (`vqa.load_questions`); without human answers only the predictions are written
    (`answers.json`, the VQA results format for a test-dev submission)."""
    run.require("llm", "vision", "visual_projector", for_what="eval vqa")
    fingerprint = {"eval": "vqa", "checkpoint": run.workdir, "step": run.step, **dataclasses.asdict(settings),
                   "image_pattern": image_pattern}
    results = report.ResultsLog(out_dir, "question_id", fingerprint)

    def batch_fn(chunk):
        paths = [vqa.image_path(image_dir, it["image_id"], image_pattern) for it in chunk]
        prompts = [chat_ids(run, *vqa.vqa_prompt(it["question"], settings.prompt_template)) for it in chunk]
        answers = answer(run, prompts, load_pixels(run, paths), settings)
        out = []
        for it, path, ans in zip(chunk, paths, answers):
            rec = {**it, "image": path, "answer": ans, "prediction": vqa.normalize_answer(ans)}
            rec["accuracy"] = vqa.vqa_accuracy(ans, it["answers"]) if it.get("answers") else None
            out.append(rec)
        return out

    _loop(items, results, settings.batch, batch_fn, "vqa", progress)
    records = results.ordered(items)
    summary = vqa.summarize(records)
    if report.is_writer():
        with open(os.path.join(out_dir, "answers.json"), "w") as f:
            json.dump([{"question_id": r["question_id"], "answer": r["prediction"]} for r in records], f)
    rep = {"eval": "vqa", **summary, "checkpoint": run.workdir, "step": run.step,
           "settings": dataclasses.asdict(settings)}
    report.write_report(out_dir, rep)
    rows = [{**r, "answers": ", ".join(r.get("answers") or [])} for r in records[:PAGE_ITEMS]]
    report.write_page(out_dir, "VQA", {k: v for k, v in rep.items() if k != "settings"}, rows,
                      ["question_id", "question", "answer", "prediction", "answers", "accuracy"])
    return rep


# ------------------------------------------------------------------------------------------------ captions


def caption_prompt(template: str) -> tuple[str, str]:
    """(user text, reply primer): `upstream` (spec 4.2: "Please summarize object in one sentence within 10
    words.", the reply opened with "The image depicts"; the caption scored is the continuation), or `plain`
    (a plain request, no primer)."""
    if template == "upstream":
        return f"{vqa.IMAGE}{cap.UPSTREAM_PROMPT}", cap.UPSTREAM_POST
    if template == "plain":
        return f"{vqa.IMAGE}\nDescribe the image in one sentence.", ""
    raise ValueError(f"--prompt-template for captions must be upstream or plain, got {template!r}")


def evaluate_captions(run: Run, items: list[dict], image_dir: str, out_dir: str, settings: TextSettings, *,
                      image_pattern: str | None = None, progress: bool = True) -> dict:
    """BLEU-1..4 and CIDEr-D of generated captions against `items`' references (`caption.load_coco_captions`);
    an image's file is its `file_name` in the captions JSON, else `image_pattern` of its id."""
    run.require("llm", "vision", "visual_projector", for_what="eval caption")
    fingerprint = {"eval": "caption", "checkpoint": run.workdir, "step": run.step, **dataclasses.asdict(settings),
                   "image_pattern": image_pattern}
    results = report.ResultsLog(out_dir, "image_id", fingerprint)
    user, post = caption_prompt(settings.prompt_template)
    ids = chat_ids(run, user, post)

    def path_of(it):
        if image_pattern or not it.get("file_name"):
            return vqa.image_path(image_dir, it["image_id"], image_pattern or "COCO_val2014_{:012d}.jpg")
        return os.path.join(image_dir, it["file_name"])

    def batch_fn(chunk):
        paths = [path_of(it) for it in chunk]
        captions = answer(run, [ids] * len(chunk), load_pixels(run, paths), settings)
        return [{"image_id": it["image_id"], "image": p, "caption": c, "references": it["references"]}
                for it, p, c in zip(chunk, paths, captions)]

    _loop(items, results, settings.batch, batch_fn, "caption", progress)
    records = results.ordered(items)
    scores = cap.caption_scores([r["caption"] for r in records], [r["references"] for r in records])
    if report.is_writer():
        with open(os.path.join(out_dir, "captions.json"), "w") as f:  # the COCO results format
            json.dump([{"image_id": r["image_id"], "caption": r["caption"]} for r in records], f)
    rep = {"eval": "caption", "images": len(records), **scores["corpus"], "checkpoint": run.workdir,
           "step": run.step, "tokenizer": "PTB approximation (dreamjax.eval.caption.tokenize)",
           "settings": dataclasses.asdict(settings)}
    report.write_report(out_dir, rep)
    rows = [{**r, **s} for r, s in zip(records[:PAGE_ITEMS], scores["items"])]
    report.write_page(out_dir, "Captions", {k: v for k, v in rep.items() if k != "settings"}, rows,
                      ["image_id", "caption", "references", "bleu_4", "cider_d"])
    return rep
