"""The demo's two measured skills on held-out cases of the shapes world.

- color_accuracy: images generated for held-out captions ("a large red circle on the left ..."): the share
  whose dominant non-background colour is nearest to the asked colour.
- vqa_accuracy: answers to "What color is the shape?" about held-out images: the share whose first word
  is the right colour.

It also writes one interleaved story (`samples/story/index.html`): a document opening continued with text and
images by the same checkpoint, and counts the images drawn in the colour their sentence names.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from dreamjax.data import images as imgs
from dreamjax.data.synthetic import COLORS, ShapesWorld, caption, render, world_from_config
from dreamjax.eval.color import dominant_color
from dreamjax.infer import render as render_doc
from dreamjax.infer.decode import generate_text
from dreamjax.infer.interleaved import generate_interleaved
from dreamjax.infer.text_to_image import text_to_image
from dreamjax.run.assembly import Run
from dreamjax.run.prompts import SampleSettings

VQA_QUESTION = "What color is the shape?"
STORY_PROMPT = "Let me show you two shapes."  # a document opening as the world's documents begin


def heldout_specs(world: ShapesWorld, n: int, seed: int = 0):
    """`n` held-out specs: a random order of all of them, repeated as needed (a small world has few)."""
    specs = world.specs("heldout")
    if not specs:
        raise ValueError(f"{world!r} has no held-out specs to evaluate on")
    order = np.random.default_rng(seed).permutation(len(specs))
    return [specs[order[i % len(specs)]] for i in range(n)]


def color_accuracy(run: Run, world: ShapesWorld, n: int, out_dir: str, settings: SampleSettings, *,
                   seed: int = 0) -> tuple[float, list[dict]]:
    """Image i is what `dreamjax generate --mode image --seed SEED` gives as its image i for that prompt."""
    specs = heldout_specs(world, n, seed)
    texts = [caption(s, variant=i) for i, s in enumerate(specs)]  # held-out specs in varied phrasings
    images = [imgs.to_uint8(x) for x in text_to_image(run, texts, settings, seed=seed)]
    records, hits = [], 0
    for i, (spec, text, img) in enumerate(zip(specs, texts, images)):
        got = dominant_color(img, background=spec.background)
        hits += got == spec.color
        path = imgs.save_png(img, os.path.join(out_dir, f"t2i_{i:03d}_{spec.color}_{spec.shape}.png"))
        records.append({"prompt": text, "asked": spec.color, "dominant": got, "image": path, "seed": seed,
                        "index": i})
    imgs.save_png(imgs.image_grid(images[:32], cols=8), os.path.join(out_dir, "t2i_grid.png"))
    return hits / max(len(specs), 1), records


def vqa_accuracy(run: Run, world: ShapesWorld, n: int, *, seed: int = 0, batch: int = 32,
                 max_new_tokens: int = 4) -> tuple[float, list[dict]]:
    specs = heldout_specs(world, n, seed + 1)
    ids = run.text_prompt(VQA_QUESTION, num_images=1)
    side = run.model.config.vision.image_size
    stop = [run.specials.eos]
    records, hits = [], 0
    for start in range(0, len(specs), batch):
        chunk = specs[start : start + batch]
        pixels = np.stack([imgs.clip_preprocess(render(s, world.resolution), side) for s in chunk])[:, None]
        outs = generate_text(run.model, run.params, [ids] * len(chunk), images_in=pixels,
                             images_in_mask=np.ones((len(chunk), 1), bool), max_new_tokens=max_new_tokens,
                             stop_ids=stop)
        for spec, out in zip(chunk, outs):
            answer = run.tokenizer.decode(out, skip_special_tokens=True).strip()
            first = answer.split()[0].strip(".,").lower() if answer.split() else ""
            hits += first == spec.color
            records.append({"question": VQA_QUESTION, "truth": spec.color, "answer": answer,
                            "spec": spec.key()})
    return hits / max(len(specs), 1), records


def write_story(run: Run, out_dir: str, settings: SampleSettings, *, prompt: str = STORY_PROMPT, seed: int = 0,
                max_new_tokens: int = 48) -> dict:
    """One interleaved document (spec 3.2 layout: the opening continued, greedy) to `out_dir`; each image is
    checked against the last colour word of the text before it."""
    doc = generate_interleaved(run, prompt, kind="document", settings=settings, max_new_tokens=max_new_tokens,
                               max_images=4, seed=seed)
    record = render_doc.write_document(doc, out_dir)
    said, checks = prompt, []
    for seg in doc.segments:
        if seg.kind == "text":
            said += " " + seg.text
            continue
        named = [w.strip(".,").lower() for w in said.split() if w.strip(".,").lower() in COLORS]
        drawn = dominant_color(seg.image)
        checks.append({"image": f"image_{seg.index}.png", "named": named[-1] if named else None, "drawn": drawn})
    record.update(prompt=prompt, text=doc.text, colors=checks, seed=seed)
    render_doc.write_json(out_dir, record)
    return record


def evaluate(run: Run, out_dir: str, *, n: int = 64, steps: int | None = None, guidance: float | None = None,
             sampler: str | None = None, seed: int = 0) -> dict[str, float]:
    """Both skills on `n` held-out cases each; samples and answers to `out_dir`. Sampling follows the run's
    `config.sample` unless overridden."""
    os.makedirs(out_dir, exist_ok=True)
    world = world_from_config(run.config.data)
    settings = run.sample_settings(steps=steps, guidance=guidance, sampler=sampler)
    color, t2i = color_accuracy(run, world, n, out_dir, settings, seed=seed)
    vqa, answers = vqa_accuracy(run, world, n, seed=seed)
    story = write_story(run, os.path.join(out_dir, "story"), settings, seed=seed)
    story_hits = sum(c["named"] == c["drawn"] for c in story["colors"])
    with open(os.path.join(out_dir, "samples.json"), "w") as f:
        json.dump({"text_to_image": t2i, "vqa": answers, "color_accuracy": color, "vqa_accuracy": vqa,
                   "story": story, "sample_settings": dataclasses.asdict(settings)}, f, indent=1)
    return {"color_accuracy": color, "vqa_accuracy": vqa, "story_images": len(story["colors"]),
            "story_color_matches": story_hits}
