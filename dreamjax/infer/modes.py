"""The four `dreamjax generate` modes on a loaded run; each writes `output.json` (and its images) to `out`.

    text         one question in the conversation template (spec 4.2), answer to stdout
    image        text -> image (spec 4.1), N per prompt, optionally the best by CLIP score
    interleaved  a document opening (spec 3.2) or an instruction (3.4) continued with text and images
    chat         interactive multi-turn chat in the conversation template; `/image PATH` adds an image
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import numpy as np

from dreamjax.data import images as imgs
from dreamjax.infer import render
from dreamjax.infer.decode import Sampling, generate_text
from dreamjax.infer.interleaved import generate_interleaved
from dreamjax.infer.text_to_image import best_of_n, text_to_image
from dreamjax.run import prompts
from dreamjax.run.assembly import Run
from dreamjax.run.prompts import SampleSettings

CHAT_HELP = "chat: type a message; /image PATH adds an image to your next message; /quit (or Ctrl-D) ends"


def load_images(run: Run, paths: Sequence[str] | None) -> np.ndarray | None:
    """[Ni, S, S, 3] CLIP-normalised input images, or None."""
    if not paths:
        return None
    side = run.model_config.vision.image_size
    return np.stack([imgs.clip_preprocess(imgs.decode_image(p, name=p), side) for p in paths])


def sampling_of(settings: SampleSettings) -> Sampling:
    return Sampling(settings.temperature, settings.top_k, settings.top_p)


def _answer(run: Run, ids: list[int], pixels: np.ndarray | None, settings: SampleSettings, seed: int) -> str:
    out = generate_text(run.model, run.params, [ids], images_in=None if pixels is None else pixels[None],
                        max_new_tokens=settings.max_new_tokens, stop_ids=[run.specials.eos],
                        temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p, seed=seed,
                        mesh=run.mesh, rules=run.rules)[0]
    return run.tokenizer.decode(out, skip_special_tokens=True).strip()


def text(run: Run, prompt: str, settings: SampleSettings, out: str, *, pixels=None, seed: int = 0) -> dict:
    ids = run.text_prompt(prompt, num_images=0 if pixels is None else len(pixels))
    answer = _answer(run, ids, pixels, settings, seed)
    print(answer)
    record = {"mode": "text", "prompt": prompt, "text": answer, "seed": seed, "settings": dataclasses.asdict(settings)}
    render.write_json(out, record)
    return record


def image(run: Run, prompt: str, settings: SampleSettings, out: str, *, pixels=None, seed: int = 0,
          progress: bool = True) -> dict:
    record = {"mode": "image", "prompt": prompt, "seed": seed, "settings": dataclasses.asdict(settings)}
    if settings.rerank:
        from dreamjax.infer.rerank import ClipReranker

        best, cands, scores = best_of_n(run, [prompt], settings, settings.num_images, ClipReranker(settings.rerank),
                                        seed=seed, images_in=pixels, progress=progress)
        record["candidates"] = [imgs.save_png(x, os.path.join(out, f"candidate_{seed}_{j}.png"))
                                for j, x in enumerate(cands[0])]
        record["clip_scores"] = scores[0].tolist()
        record["images"] = [imgs.save_png(best[0], os.path.join(out, f"image_{seed}_0.png"))]
    else:
        images = text_to_image(run, [prompt] * settings.num_images, settings, seed=seed, images_in=pixels,
                               progress=progress)
        record["images"] = [imgs.save_png(x, os.path.join(out, f"image_{seed}_{i}.png")) for i, x in enumerate(images)]
    for path in record["images"]:
        print(path)
    render.write_json(out, record)
    return record


def interleaved(run: Run, prompt: str, settings: SampleSettings, out: str, *, kind: str = "document",
                max_images: int = 4, pixels=None, seed: int = 0, logits_hook=None) -> dict:
    doc = generate_interleaved(run, prompt, kind=kind, settings=settings, sampling=sampling_of(settings),
                               max_new_tokens=settings.max_new_tokens, max_images=max_images, seed=seed,
                               input_images=pixels, logits_hook=logits_hook)
    rendered = render.write_document(doc, out)
    print(doc.text)
    record = {"mode": "interleaved", "layout": kind, "prompt": prompt, "text": doc.text, "seed": seed,
              **rendered, "settings": dataclasses.asdict(settings)}
    render.write_json(out, record)
    return record


def chat(run: Run, settings: SampleSettings, out: str, *, first: str | None = None, pixels=None, seed: int = 0,
         read: Callable[[str], str] | None = None, write: Callable[[str], None] = print) -> dict:
    """Multi-turn chat: the whole conversation is re-prefilled each turn (one compile per length bucket);
    every image stays in the context. Conversations never teach `<dream_start>` (spec 3.3): text only."""
    read = read or input  # looked up per call (tests replace builtins.input)
    side = run.model_config.vision.image_size
    turns: list[tuple[str, int]] = []
    answers: list[str] = []
    images = [] if pixels is None else list(pixels)
    pending = len(images)  # images given with --image join the first message
    write(CHAT_HELP)
    message = first
    while True:
        if message is None:
            try:
                message = read("USER: ").strip()
            except EOFError:
                break
        if message in ("/quit", "/exit"):
            break
        if message.startswith("/image"):
            path = message[len("/image"):].strip()
            try:
                images.append(imgs.clip_preprocess(imgs.decode_image(path, name=path), side))
                pending += 1
                write(f"(image {len(images)} added: {path})")
            except (OSError, ValueError) as e:
                write(f"(cannot read image {path!r}: {e})")
            message = None
            continue
        if not message:
            message = None
            continue
        turns.append((message, pending))
        pending = 0
        ids = prompts.chat_prompt(turns, answers, run.tokenizer, run.layout(), run.specials)
        answer = _answer(run, ids, np.stack(images) if images else None, settings, seed + len(answers))
        answers.append(answer)
        write(f"ASSISTANT: {answer}")
        render.write_json(out, _chat_record(turns, answers, seed, settings))  # the transcript so far
        message = None
    record = _chat_record(turns, answers, seed, settings)
    render.write_json(out, record)
    return record


def _chat_record(turns, answers, seed, settings) -> dict:
    return {"mode": "chat", "turns": [{"user": t, "images": n, "assistant": a} for (t, n), a in zip(turns, answers)],
            "seed": seed, "settings": dataclasses.asdict(settings)}
