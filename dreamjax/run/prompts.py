"""The prompt of each generation mode, and the sampler settings a run generates with, built in one place
so that `dreamjax generate`, the demo evaluation and every later caller agree.

- image (text -> image, spec 4.1): the caption as the image-text pair layout trains it (BOS + caption;
  the `<dream_start>` block is appended by the sampler), `<image>` placeholders first for input images.
- text (comprehension, spec 4.2): one user turn of the run's conversation template (Vicuna v1.1) with an
  `<image>` placeholder per input image, left open after `ASSISTANT:`.
- interleaved, the two layouts that supervise `<dream_start>`: a document opening continued as an MMC4
  document (spec 3.2: BOS + text, no template), or an instruction through the instruction-interleaved
  layout (spec 3.4: one user turn, the document follows `ASSISTANT:`).
- chat: every turn so far in the conversation template, open after the last `ASSISTANT:`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dreamjax.data.tokenize import LayoutConfig, prompt_ids
from dreamjax.data.tokenizer import IMAGE_TOKEN, SpecialIds

SAMPLERS = ("ddpm", "ddim")
INTERLEAVED_LAYOUTS = ("document", "instruction")


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """How a run samples images: its config's `sample` section, with per-call overrides."""

    steps: int = 150
    guidance: float = 2.0
    sampler: str = "ddpm"
    negative_prompt: str = ""
    num_images: int = 1  # images per prompt (candidates, when re-ranked)
    rerank: str | None = None  # a local CLIPModel directory: keep the best of num_images by CLIP score
    # text decoding
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 64

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"sampling steps must be >= 1, got {self.steps}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @classmethod
    def from_config(cls, sample: Any, **overrides) -> SampleSettings:
        """From `config.sample` (keys it lacks, e.g. in an older workdir, take the defaults here); overrides
        that are None keep the run's value."""
        values = {f.name: sample.get(f.name, f.default) for f in dataclasses.fields(cls)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(steps=int(values["steps"]), guidance=float(values["guidance"]), sampler=str(values["sampler"]),
                   negative_prompt=str(values["negative_prompt"] or ""), num_images=int(values["num_images"]),
                   rerank=values["rerank"] or None, temperature=float(values["temperature"]),
                   top_k=int(values["top_k"]), top_p=float(values["top_p"]),
                   max_new_tokens=int(values["max_new_tokens"]))


def _with_images(text: str, num_images: int) -> str:
    if num_images and IMAGE_TOKEN not in text:
        return f"{IMAGE_TOKEN}\n" * num_images + text
    return text


def image_prompt(text: str, tokenizer, layout: LayoutConfig, specials: SpecialIds, num_images: int = 0) -> list[int]:
    """Token ids of a text-to-image prompt (without the dream block)."""
    return prompt_ids(_with_images(text, num_images), tokenizer, layout, specials)


def text_prompt(text: str, tokenizer, layout: LayoutConfig, specials: SpecialIds, num_images: int = 0) -> list[int]:
    """Token ids of a one-turn question in the conversation template, open for the answer."""
    chat = layout.template.prompt([("user", _with_images(text, num_images)), ("assistant", None)])
    return prompt_ids(chat, tokenizer, layout, specials)


def interleaved_prompt(text: str, tokenizer, layout: LayoutConfig, specials: SpecialIds, kind: str = "document",
                       num_images: int = 0) -> list[int]:
    """Token ids that open an interleaved document: `kind` "document" (spec 3.2) or "instruction" (3.4)."""
    if kind == "document":
        return image_prompt(text, tokenizer, layout, specials, num_images)
    if kind == "instruction":
        return text_prompt(text, tokenizer, layout, specials, num_images)
    raise ValueError(f"interleaved prompt kind must be one of {INTERLEAVED_LAYOUTS}, got {kind!r}")


def chat_prompt(turns: list[tuple[str, int]], answers: list[str], tokenizer, layout: LayoutConfig,
                specials: SpecialIds) -> list[int]:
    """A multi-turn conversation open for the next answer: turns [(user text, number of new images)],
    answers the assistant's replies so far (one fewer than turns). Images go first in their turn."""
    if len(answers) != len(turns) - 1:
        raise ValueError(f"chat_prompt: {len(turns)} user turns need {len(turns) - 1} answers, got {len(answers)}")
    convo: list[tuple[str, str | None]] = []
    for (text, n), answer in zip(turns, answers + [None]):
        convo += [("user", _with_images(text, n)), ("assistant", answer)]
    return prompt_ids(layout.template.prompt(convo), tokenizer, layout, specials)
