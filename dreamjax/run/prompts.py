"""The prompt of each generation mode, and the sampler settings a run generates with, built in one place
so that `dreamjax generate`, the demo evaluation and every later caller agree.

- image (text -> image, spec 4.1): the caption as the image-text pair layout trains it (BOS + caption;
  the `<dream_start>` block is appended by the sampler), `<image>` placeholders first for input images.
- text (comprehension, spec 4.2): one user turn of the run's conversation template (Vicuna v1.1) with an
  `<image>` placeholder per input image, left open after `ASSISTANT:`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dreamjax.data.tokenize import LayoutConfig, prompt_ids
from dreamjax.data.tokenizer import IMAGE_TOKEN, SpecialIds

SAMPLERS = ("ddpm", "ddim")


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """How a run samples images: its config's `sample` section, with per-call overrides."""

    steps: int = 150
    guidance: float = 2.0
    sampler: str = "ddpm"
    negative_prompt: str = ""

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"sampling steps must be >= 1, got {self.steps}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")

    @classmethod
    def from_config(cls, sample: Any, **overrides) -> SampleSettings:
        """From `config.sample`; overrides that are None keep the run's value."""
        values = {f.name: sample.get(f.name, f.default) for f in dataclasses.fields(cls)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(steps=int(values["steps"]), guidance=float(values["guidance"]), sampler=str(values["sampler"]),
                   negative_prompt=str(values["negative_prompt"] or ""))


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
