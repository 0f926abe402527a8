"""The built-in "shapes" world: a tiny, deterministic multimodal dataset generated on the fly.

Each image shows one (or two) flat coloured shapes on a plain background. Text is templated from the
image's ``ShapeSpec``, so captions, answers and drawing prompts are always correct, and a colour metric
(``dreamjax.eval.color``) can score generated images against the asked colour.

Four record kinds. By default (``format="record"``) a source yields the typed records of
``dreamjax.data.documents`` that ``data/tokenize.py`` consumes (``ImageTextPair``, ``Conversation``,
``InterleavedDoc``, ``InstructInterleavedDoc``). With ``format="raw"`` it yields plain dicts in the raw
upstream schemas (spec section 3), plus an ``id`` and the ground truth ``specs``:

* ``pairs``              ``{"id", "image", "caption", "specs"}``                    (image-text pairs)
* ``conversations``      ``{"id", "image", "conversations": [{"from", "value"}], "specs"}``  (LLaVA; the
                         text holds ``<image>`` for a question about the image or ``<dream>`` for an image
                         the assistant draws)
* ``documents``          ``{"id", "text_list", "image_info": [{"image_name", "matched_text_index"}],
                         "images", "specs"}``                                         (MMC4)
* ``instruct_documents`` as documents plus ``"instruction"``                         (InstructMMC4)

``image`` / ``images`` are uint8 ``[R, R, 3]`` arrays (``image_format="array"``) or PNG bytes
(``image_format="png"``); ``images[k]`` is the image of ``image_info[k]``. ``specs`` is the ground truth
(a tuple of ``ShapeSpec`` per image) for evaluation, e.g. the colour a text-to-image prompt asked for.

Determinism: record ``i`` of ``(kind, split)`` depends only on ``(seed, kind, split, i)`` and the world's
options, never on access order, so the sources are random-access ``Sequence``s that Grain's
``MapDataset.source`` can shuffle, shard and checkpoint.

Splits: every single-shape ``ShapeSpec`` (colour, shape, position, size, background) is assigned to
``"train"`` or ``"heldout"`` by a stable hash of its fields (independent of the seed), keeping every colour
with two shapes and every shape with two colours in training (`_heldout_specs`). Every image of a
split is built only from that split's specs, so no heldout image (or two-shape scene component) is ever
seen in training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import string
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from dreamjax.data.documents import (
    Conversation,
    ImageTextPair,
    InstructInterleavedDoc,
    InterleavedDoc,
    Record,
)
from dreamjax.data.tokenizer import split_words

# ----------------------------------------------------------------------------------------------------------
# The world's vocabulary of attributes

# Shape colours (RGB). Saturated, pairwise >= 95 apart in RGB, and >= 117 from every background, so the
# nearest-colour metric is unambiguous even with noise. Shared with dreamjax.eval.color (import, don't copy).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 225, 20),
    "purple": (140, 30, 190),
    "orange": (245, 130, 20),
    "pink": (245, 110, 190),
    "cyan": (20, 200, 210),
}
# Backgrounds are achromatic, so a background is never confusable with a shape colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
# Shape centres as (x, y) fractions of the image side; y grows downwards.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
# "Radius" as a fraction of the image side. Large shapes at opposite positions never overlap or leave
# the image (left/right large shapes span x in [0.008, 0.492] and [0.508, 0.992]).
SIZES: dict[str, float] = {"small": 0.12, "large": 0.22, "huge": 0.36}
# "huge" fills half the frame and fits only in the centre, so the default world leaves it out; the 2-core demo
# world is huge centred shapes (a colour that covers most pixels is what a few minutes of training can learn).
DEFAULT_SIZES = ("small", "large")
CENTRE_ONLY_SIZES = ("huge",)
# How a position is said; the first phrase is the canonical answer to "Where is the shape?".
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "on the left side"),
    "right": ("on the right", "on the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle"),
}
# Positions that two-shape scenes pair up (they cannot overlap).
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
SPLITS = ("train", "heldout")
KINDS = ("pairs", "conversations", "documents", "instruct_documents")
FORMATS = ("record", "raw")
# Placeholders the world writes into conversation text; tokenizers treat them as special tokens, so they
# are not part of ``vocabulary()``.
PLACEHOLDERS = ("<image>", "<dream>")


def _check_palette(min_dist: float = 90.0) -> None:
    """Guard against edits that make a colour confusable with another colour or with a background."""
    cols = {k: np.asarray(v, float) for k, v in COLORS.items()}
    for name, rgb in cols.items():
        for other, rgb2 in list(cols.items()) + [(b, np.asarray(v, float)) for b, v in BACKGROUNDS.items()]:
            if other != name and np.linalg.norm(rgb - rgb2) < min_dist:
                raise ValueError(f"shapes palette: {name} and {other} are closer than {min_dist} in RGB")


_check_palette()


@dataclasses.dataclass(frozen=True, order=True)
class ShapeSpec:
    """One shape in an image, plus the image's background (the ground truth the text is generated from)."""

    color: str
    shape: str
    position: str = "center"
    size: str = "large"
    background: str = "white"

    def __post_init__(self):
        for field, table in (("color", COLORS), ("shape", SHAPES), ("position", POSITIONS),
                             ("size", SIZES), ("background", BACKGROUNDS)):
            value = getattr(self, field)
            if value not in table:
                raise ValueError(f"ShapeSpec: unknown {field} {value!r}; choose from {sorted(table)}")

    def key(self) -> str:
        """Canonical string, also what the split hash is computed from."""
        return f"{self.color}|{self.shape}|{self.position}|{self.size}|{self.background}"


Scene = tuple[ShapeSpec, ...]  # the shapes of one image (same background), painted in order


# ----------------------------------------------------------------------------------------------------------
# Rendering


def render(spec: ShapeSpec | Sequence[ShapeSpec], resolution: int = 64) -> np.ndarray:
    """Paint one shape, or several sharing a background, into a uint8 ``[R, R, 3]`` image (no anti-aliasing).

    A pixel belongs to a shape when its centre is inside it. Shapes are sized relative to the image, so the
    same spec looks the same at 32 and 64 px.
    """
    specs = (spec,) if isinstance(spec, ShapeSpec) else tuple(spec)
    if not specs:
        raise ValueError("render: no shapes")
    if len({s.background for s in specs}) != 1:
        raise ValueError(f"render: shapes of one image must share a background, got {specs}")
    if resolution < 8:
        raise ValueError(f"render: resolution {resolution} is too small (>= 8)")
    img = np.empty((resolution, resolution, 3), np.uint8)
    img[:] = BACKGROUNDS[specs[0].background]
    c = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution  # pixel centres in [0, 1]
    x, y = c[None, :], c[:, None]
    for s in specs:
        img[_shape_mask(s, x, y)] = COLORS[s.color]
    return img


def _shape_mask(s: ShapeSpec, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean [R, R] mask of the pixels whose centre (x[1, R], y[R, 1] broadcast) is inside the shape."""
    cx, cy = POSITIONS[s.position]
    r = SIZES[s.size]
    dx, dy = x - cx, y - cy
    if s.shape == "circle":
        return dx * dx + dy * dy <= r * r
    if s.shape == "square":  # same area as the circle: side = r * sqrt(pi)
        h = 0.5 * np.sqrt(np.pi) * r
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if s.shape == "triangle":  # upright isosceles: base 2.2 r, height 1.9 r, centred on its bounding box
        half_base, height = 1.1 * r, 1.9 * r
        t = (dy + height / 2) / height  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= half_base * t)
    raise AssertionError(s.shape)


# ----------------------------------------------------------------------------------------------------------
# Text templates. Every emitted string is one of these, filled with the fields of ``_fields``; vocabulary()
# is computed from the same tables, so keep all text in templates (tests check the coverage).

CAPTIONS = (
    "{np} {where} on a {bg} background",
    "{NP} {where} on a {bg} background.",
    "a picture of {np} {where} on a {bg} background",
    "An image of {np} {where}, on a {bg} background.",
    "{np} {where}, {bg} background",
    "{NP} against a plain {bg} background, {where}.",
)
SCENE_CAPTIONS = (  # two shapes
    "{np} {where} and {np2} {where2} on a {bg} background",
    "{NP} {where} and {np2} {where2}, on a {bg} background.",
    "two shapes on a {bg} background: {np} {where} and {np2} {where2}",
)
# Question kind -> (phrasings, answer). Answers are short and canonical so exact-match VQA scoring works.
QUESTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "color": (("What color is the shape?", "What is the color of the shape?", "Which color is the shape?"),
              "{color}."),
    "shape": (("What shape is it?", "What shape is shown?", "Which shape is in the image?"), "{a_shape}."),
    "position": (("Where is the shape?", "Where is the shape located?"), "{where0}."),
    "size": (("Is the shape small or large?", "How big is the shape?"), "{size}."),
    "background": (("What color is the background?", "What is the background color?"), "{bg}."),
    "is_color": (("Is the shape {ask_color}?",), "{yes_no}."),
    "is_shape": (("Is it a {ask_shape}?", "Is there a {ask_shape} in the image?"), "{yes_no}."),
    "describe": (("Describe the image.", "What is in the picture?"), "{NP} {where} on a {bg} background."),
}
YES_NO = ("yes", "no")
DRAW_PROMPTS = (
    "Draw {np}.",
    "Draw {np} {where}.",
    "Please draw {np} {where} on a {bg} background.",
    "Create an image of {np} {where}.",
    "Generate a picture of {np} on a {bg} background.",
    "Can you draw {np}?",
)
DRAW_ANSWER = "<dream>"
STORY_OPENERS = ("A story about {count} {shape_word}.", "Let me show you {count} {shape_word}.",
                 "This story has {count} {picture_word}.")
# Sentence describing the k-th image (first / middle / last), for one shape and for a two-shape scene.
STORY_FIRST = ("First, there is {np} {where}.", "The first picture shows {np} {where}.")
STORY_MIDDLE = ("Then there is {np} {where}.", "Next comes {np} {where}.", "After that, we see {np} {where}.")
STORY_LAST = ("Finally, there is {np} {where}.", "The last picture shows {np} {where}.")
STORY_FIRST_SCENE = ("First, there are {np} {where} and {np2} {where2}.",
                     "The first picture shows {np} {where} and {np2} {where2}.")
STORY_MIDDLE_SCENE = ("Then there are {np} {where} and {np2} {where2}.",
                      "After that, we see {np} {where} and {np2} {where2}.")
STORY_LAST_SCENE = ("Finally, there are {np} {where} and {np2} {where2}.",
                    "The last picture shows {np} {where} and {np2} {where2}.")
STORY_BACKGROUND = ("It is on a {bg} background.", "The background is {bg}.")
STORY_BACKGROUND_SCENE = ("They are on a {bg} background.", "The background is {bg}.")
STORY_CLOSERS = ("The end.", "That is all.")
INSTRUCTIONS = ("Write a short illustrated story about {count} {shape_word}.",
                "Tell me a story with {count} {picture_word} of shapes.")
ALL_TEMPLATES: tuple[str, ...] = (
    CAPTIONS + SCENE_CAPTIONS + tuple(t for qs, a in QUESTIONS.values() for t in (*qs, a)) + YES_NO
    + DRAW_PROMPTS + (DRAW_ANSWER,) + STORY_OPENERS + STORY_FIRST + STORY_MIDDLE + STORY_LAST
    + STORY_FIRST_SCENE + STORY_MIDDLE_SCENE + STORY_LAST_SCENE + STORY_BACKGROUND + STORY_BACKGROUND_SCENE
    + STORY_CLOSERS + INSTRUCTIONS
)

# The only non-word characters the world writes (besides spaces): "\n" follows a leading "<image>".
PUNCTUATION = (".", ",", ":", "?", "\n")
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(spec: ShapeSpec, with_size: bool = True, with_color: bool = True) -> str:
    """``"a small red circle"`` / ``"an orange square"`` / ``"a triangle"``."""
    words = ([spec.size] if with_size else []) + ([spec.color] if with_color else []) + [spec.shape]
    return " ".join([_article(words[0])] + words)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def caption(spec: ShapeSpec | Sequence[ShapeSpec], variant: int = 0) -> str:
    """Templated caption of a one- or two-shape image; ``variant`` picks the phrasing (any int, wraps)."""
    specs = (spec,) if isinstance(spec, ShapeSpec) else tuple(spec)
    if not 1 <= len(specs) <= 2:
        raise ValueError(f"caption: one or two shapes, got {len(specs)}")
    templates = CAPTIONS if len(specs) == 1 else SCENE_CAPTIONS
    fields = _fields(specs, where_variant=variant // len(templates))  # phrasing independent of template
    return templates[variant % len(templates)].format(**fields)


def _fields(specs: Sequence[ShapeSpec], where_variant: int = 0, with_size: bool = True) -> dict[str, str]:
    """Template fields for an image (first shape -> np/where, second -> np2/where2)."""
    s = specs[0]
    phrases = POSITION_PHRASES[s.position]
    f = {
        "np": noun_phrase(s, with_size),
        "where": phrases[where_variant % len(phrases)],
        "where0": phrases[0],
        "bg": s.background,
        "color": s.color,
        "size": s.size,
        "a_shape": f"{_article(s.shape)} {s.shape}",
    }
    f["NP"] = _cap(f["np"])
    if len(specs) > 1:
        s2 = specs[1]
        f["np2"] = noun_phrase(s2, with_size)
        p2 = POSITION_PHRASES[s2.position]
        f["where2"] = p2[where_variant % len(p2)]
    return f


def _stable_unit(key: str) -> float:
    """A hash of ``key`` mapped to [0, 1), identical across processes and Python versions."""
    h = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64


# ----------------------------------------------------------------------------------------------------------
# The world


class ShapesWorld:
    """A seeded generator of pairs, conversations and interleaved documents about coloured shapes.

    Args:
      seed: non-negative int; every record is a pure function of (seed, kind, split, index).
      resolution: image side in pixels (e.g. 32 or 64).
      colors, shapes, positions, sizes, backgrounds: subsets of COLORS / SHAPES / POSITIONS / SIZES /
        BACKGROUNDS (default: all, and sizes ``DEFAULT_SIZES``). A smaller world is an easier one (the 2-core
        demo uses huge centred shapes); two-shape scenes need a pair of opposite positions and are otherwise
        drawn as one shape.
      heldout_fraction: share of single-shape specs (by stable hash) reserved for the "heldout" split.
      image_format: "array" (uint8 [R, R, 3]) or "png" (encoded bytes, what ArrayRecord shards store).
      doc_images: (min, max) images per document, inclusive.
      max_turns: most question/answer turns in a Q&A conversation.
    """

    def __init__(self, seed: int = 0, resolution: int = 64, *, colors: Iterable[str] | None = None,
                 shapes: Iterable[str] | None = None, positions: Iterable[str] | None = None,
                 sizes: Iterable[str] | None = None, backgrounds: Iterable[str] | None = None,
                 heldout_fraction: float = 0.2, image_format: str = "array",
                 doc_images: tuple[int, int] = (2, 4), max_turns: int = 3):
        if not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"ShapesWorld: seed must be a non-negative int, got {seed!r}")
        if image_format not in ("array", "png"):
            raise ValueError(f"ShapesWorld: image_format must be 'array' or 'png', got {image_format!r}")
        if not 0.0 <= heldout_fraction < 1.0:
            raise ValueError(f"ShapesWorld: heldout_fraction must be in [0, 1), got {heldout_fraction}")
        lo, hi = doc_images
        if not 1 <= lo <= hi < len(NUMBER_WORDS):
            raise ValueError(f"ShapesWorld: doc_images must satisfy 1 <= min <= max <= 10, got {doc_images}")
        self.seed = int(seed)
        self.resolution = int(resolution)
        self.colors = tuple(colors) if colors is not None else tuple(COLORS)
        self.shapes = tuple(shapes) if shapes is not None else SHAPES
        self.positions = tuple(positions) if positions is not None else tuple(POSITIONS)
        self.sizes = tuple(sizes) if sizes is not None else DEFAULT_SIZES
        self.backgrounds = tuple(backgrounds) if backgrounds is not None else tuple(BACKGROUNDS)
        self.heldout_fraction = float(heldout_fraction)
        self.image_format = image_format
        self.doc_images = (int(lo), int(hi))
        self.max_turns = int(max_turns)
        if self.max_turns < 1:
            raise ValueError(f"ShapesWorld: max_turns must be >= 1, got {max_turns}")
        if len(self.colors) < 2:
            raise ValueError("ShapesWorld: need at least two colours (yes/no questions, two-shape scenes)")
        for name in ("shapes", "positions", "sizes", "backgrounds"):
            if not getattr(self, name):
                raise ValueError(f"ShapesWorld: {name} must not be empty")
        off_centre = [p for p in self.positions if p != "center"]
        if off_centre and set(self.sizes) & set(CENTRE_ONLY_SIZES):
            raise ValueError(f"ShapesWorld: sizes {CENTRE_ONLY_SIZES} fit only at position 'center', "
                             f"not at {off_centre}")
        # Every single-shape spec of this world, in a fixed order, assigned to a split by hash.
        all_specs = [ShapeSpec(c, s, p, z, b) for c in self.colors for s in self.shapes  # validates the names
                     for p in self.positions for z in self.sizes for b in self.backgrounds]
        self._heldout = _heldout_specs(all_specs, self.heldout_fraction)
        self._specs = {split: tuple(x for x in all_specs if self.split_of(x) == split) for split in SPLITS}
        # (split, background, position) -> specs, for picking the second shape of a two-shape scene.
        self._by_bg_pos: dict[tuple[str, str, str], tuple[ShapeSpec, ...]] = {}
        for split, specs in self._specs.items():
            for x in specs:
                k = (split, x.background, x.position)
                self._by_bg_pos[k] = self._by_bg_pos.get(k, ()) + (x,)

    def __repr__(self):
        return (f"ShapesWorld(seed={self.seed}, resolution={self.resolution}, colors={len(self.colors)}, "
                f"shapes={len(self.shapes)}, positions={len(self.positions)}, sizes={len(self.sizes)}, "
                f"backgrounds={len(self.backgrounds)}, "
                f"train={len(self._specs['train'])}, heldout={len(self._specs['heldout'])})")

    # -- splits ----------------------------------------------------------------------------------------

    def split_of(self, spec: ShapeSpec) -> str:
        """"heldout" for a stable-hash ``heldout_fraction`` of all specs (see `_heldout_specs`), else "train"
        (seed-independent)."""
        return "heldout" if spec in self._heldout else "train"

    def specs(self, split: str) -> tuple[ShapeSpec, ...]:
        """All single-shape specs of a split, in a fixed order."""
        _check_split(split)
        return self._specs[split]

    # -- sources (random access, Grain-friendly) --------------------------------------------------------

    def pairs(self, split: str, n: int, multi_prob: float = 0.0, format: str = "record") -> ShapesSource:
        """``n`` image-caption pairs; a ``multi_prob`` share shows two shapes."""
        return ShapesSource(self, "pairs", split, n, format=format, multi_prob=multi_prob)

    def conversations(self, split: str, n: int, create_prob: float = 0.5,
                      format: str = "record") -> ShapesSource:
        """``n`` LLaVA conversations: Q&A about an ``<image>``, or (share ``create_prob``) "Draw ..." ->
        ``<dream>``."""
        return ShapesSource(self, "conversations", split, n, format=format, create_prob=create_prob)

    def documents(self, split: str, n: int, multi_prob: float = 0.25, format: str = "record") -> ShapesSource:
        """``n`` MMC4-style stories, one sentence per image (``multi_prob``: two-shape images)."""
        return ShapesSource(self, "documents", split, n, format=format, multi_prob=multi_prob)

    def instruct_documents(self, split: str, n: int, multi_prob: float = 0.25,
                           format: str = "record") -> ShapesSource:
        """``n`` InstructMMC4-style stories: an ``instruction`` plus a document as in ``documents``."""
        return ShapesSource(self, "instruct_documents", split, n, format=format, multi_prob=multi_prob)

    def record(self, kind: str, split: str, index: int, format: str = "record", **options: Any) -> Any:
        """Record ``index`` of ``(kind, split)`` (what the sources' ``__getitem__`` returns).

        ``format="raw"``: the upstream-schema dict with ``id`` and ``specs``; ``format="record"``: the typed
        record of ``dreamjax.data.documents`` (``ImageTextPair``, ``Conversation``, ``InterleavedDoc``,
        ``InstructInterleavedDoc``) that ``data/tokenize.py`` consumes.
        """
        _check_split(split)
        if kind not in KINDS:
            raise ValueError(f"unknown record kind {kind!r}; choose from {KINDS}")
        if format not in FORMATS:
            raise ValueError(f"unknown format {format!r}; choose from {FORMATS}")
        if index < 0:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, KINDS.index(kind), SPLITS.index(split), int(index)])
        rid = f"shapes-{kind}-{split}-{index:09d}"
        if kind == "pairs":
            raw = self._pair(rng, split, rid, **options)
        elif kind == "conversations":
            raw = self._conversation(rng, split, rid, **options)
        else:
            raw = self._document(rng, split, rid, instruct=kind == "instruct_documents", **options)
        return raw if format == "raw" else to_record(kind, raw)

    # -- vocabulary ------------------------------------------------------------------------------------

    def vocabulary(self) -> list[str]:
        """Every word this world can emit, sorted: the alphabetic words of the tokenizer's ``split_words``
        (case kept). Punctuation (``PUNCTUATION``) and the placeholders ``<image>`` / ``<dream>`` are not included."""
        values: list[str] = list(self.colors) + list(self.shapes) + list(self.backgrounds) + list(self.sizes)
        values += ["a", "an", "A", "An", "shape", "shapes", "picture", "pictures"]
        values += [p for pos in self.positions for p in POSITION_PHRASES[pos]]
        values += NUMBER_WORDS[self.doc_images[0]: self.doc_images[1] + 1]
        words = set()
        for text in values:
            words.update(split_words(text))
        for template in ALL_TEMPLATES:
            for literal, _, _, _ in string.Formatter().parse(template):
                words.update(split_words(literal or ""))
        return sorted(w for w in words if w.isalpha())

    # -- generators ------------------------------------------------------------------------------------

    def _encode(self, img: np.ndarray) -> np.ndarray | bytes:
        if self.image_format == "png":
            from dreamjax.data.images import encode_png  # same layer; imported lazily to keep this light
            return encode_png(img)
        return img

    def _sample_spec(self, rng: np.random.Generator, split: str) -> ShapeSpec:
        specs = self._specs[split]
        if not specs:
            raise ValueError(f"{self!r} has no specs in split {split!r}; change heldout_fraction or subsets")
        return specs[rng.integers(len(specs))]

    def _sample_scene(self, rng: np.random.Generator, split: str, multi_prob: float) -> Scene:
        """One shape, or with probability ``multi_prob`` two shapes (opposite positions, distinct colours,
        same background), every shape being a spec of ``split``."""
        first = self._sample_spec(rng, split)
        if multi_prob <= 0 or rng.random() >= multi_prob:
            return (first,)
        for _ in range(8):  # find a partner from the same split; re-draw the first shape if there is none
            if first.position in OPPOSITE:
                key = (split, first.background, OPPOSITE[first.position])
                cands = [s for s in self._by_bg_pos.get(key, ()) if s.color != first.color]
                if cands:
                    return (first, cands[rng.integers(len(cands))])
            first = self._sample_spec(rng, split)
        return (first,)

    def _pair(self, rng, split, rid, multi_prob: float = 0.0) -> dict[str, Any]:
        scene = self._sample_scene(rng, split, multi_prob)
        text = caption(scene, variant=int(rng.integers(1 << 30)))
        return {"id": rid, "image": self._encode(render(scene, self.resolution)), "caption": text,
                "specs": scene}

    def _conversation(self, rng, split, rid, create_prob: float = 0.5) -> dict[str, Any]:
        spec = self._sample_spec(rng, split)
        f = _fields((spec,), where_variant=int(rng.integers(2)), with_size=bool(rng.integers(2)))
        if rng.random() < create_prob:  # creation: "Draw a red circle." -> "<dream>"
            prompt = DRAW_PROMPTS[rng.integers(len(DRAW_PROMPTS))].format(**f)
            turns = [{"from": "human", "value": prompt}, {"from": "gpt", "value": DRAW_ANSWER}]
        else:  # comprehension: "<image>\nWhat color is the shape?" -> "red."
            f["NP"] = _cap(noun_phrase(spec))  # "describe" answers always give the size
            kinds = list(QUESTIONS)
            n_turns = int(rng.integers(1, self.max_turns + 1))
            turns = []
            for t, qi in enumerate(rng.permutation(len(kinds))[:n_turns]):
                kind = kinds[qi]
                phrasings, answer = QUESTIONS[kind]
                # yes/no questions ask about the true value or another one, half and half
                yes = bool(rng.integers(2))
                f["ask_color"] = spec.color if yes else _other(rng, self.colors, spec.color)
                f["ask_shape"] = spec.shape if yes else _other(rng, self.shapes, spec.shape)
                truth = {"is_color": f["ask_color"] == spec.color, "is_shape": f["ask_shape"] == spec.shape}
                f["yes_no"] = "yes" if truth.get(kind, True) else "no"
                q = phrasings[rng.integers(len(phrasings))].format(**f)
                turns.append({"from": "human", "value": ("<image>\n" + q) if t == 0 else q})
                turns.append({"from": "gpt", "value": answer.format(**f)})
        return {"id": rid, "image": self._encode(render(spec, self.resolution)), "conversations": turns,
                "specs": (spec,)}

    def _document(self, rng, split, rid, instruct: bool, multi_prob: float = 0.25) -> dict[str, Any]:
        lo, hi = self.doc_images
        n_img = int(rng.integers(lo, hi + 1))
        nums = {"count": NUMBER_WORDS[n_img], "shape_word": "shape" if n_img == 1 else "shapes",
                "picture_word": "picture" if n_img == 1 else "pictures"}
        text = [STORY_OPENERS[rng.integers(len(STORY_OPENERS))].format(**nums)]
        infos, images, scenes = [], [], []
        for k in range(n_img):
            scene = self._sample_scene(rng, split, multi_prob)
            f = _fields(scene, where_variant=int(rng.integers(2)), with_size=bool(rng.integers(2)))
            first, last = k == 0, k == n_img - 1 and k > 0
            if len(scene) == 1:
                pool = STORY_FIRST if first else STORY_LAST if last else STORY_MIDDLE
            else:
                pool = STORY_FIRST_SCENE if first else STORY_LAST_SCENE if last else STORY_MIDDLE_SCENE
            sentence = pool[rng.integers(len(pool))].format(**f)
            name = f"{rid}-{k}.png"
            infos.append({"image_name": name, "matched_text_index": len(text)})  # image follows its sentence
            text.append(sentence)
            if rng.random() < 0.5:  # an unmatched sentence between images
                pool = STORY_BACKGROUND if len(scene) == 1 else STORY_BACKGROUND_SCENE
                text.append(pool[rng.integers(len(pool))].format(**f))
            images.append(self._encode(render(scene, self.resolution)))
            scenes.append(scene)
        if rng.random() < 0.5:
            text.append(STORY_CLOSERS[rng.integers(len(STORY_CLOSERS))])
        rec: dict[str, Any] = {"id": rid, "text_list": text, "image_info": infos, "images": images,
                               "specs": scenes}
        if instruct:
            rec["instruction"] = INSTRUCTIONS[rng.integers(len(INSTRUCTIONS))].format(**nums)
        return rec


def to_record(kind: str, raw: dict[str, Any]) -> Record:
    """Raw dict of ``kind`` -> the typed record of ``dreamjax.data.documents`` (images passed through)."""
    if kind == "pairs":
        return ImageTextPair(image=raw["image"], caption=raw["caption"])
    if kind == "conversations":
        return Conversation.from_llava(raw, resolve=lambda image: image)  # "image" holds the image itself
    infos = raw["image_info"]
    images = [(img, info["matched_text_index"]) for img, info in zip(raw["images"], infos, strict=True)]
    if kind == "documents":
        return InterleavedDoc(text_list=list(raw["text_list"]), images=images)
    if kind == "instruct_documents":
        return InstructInterleavedDoc(instruction=raw["instruction"], text_list=list(raw["text_list"]),
                                      images=images)
    raise ValueError(f"unknown record kind {kind!r}; choose from {KINDS}")


def _other(rng: np.random.Generator, choices: Sequence[str], exclude: str) -> str:
    """A random element of ``choices`` other than ``exclude`` (``exclude`` itself if there is no other)."""
    rest = [c for c in choices if c != exclude]
    return rest[rng.integers(len(rest))] if rest else exclude


def _heldout_specs(specs: Sequence[ShapeSpec], fraction: float) -> frozenset[ShapeSpec]:
    """The held-out specs: those whose stable hash is below `fraction`, except that every colour must keep at
    least two shapes, and every shape two colours (as far as the world has them), among the training specs.
    A held-out (colour, shape) is meant to test composition, and an attribute seen in training with one
    partner only cannot be composed
    (in the 24-combination demo world the hash alone left pink with the square only, and whether pink circles
    came out pink was a coin toss between training runs). Specs are returned to training from the highest
    hash down, so the split stays deterministic; large worlds are unaffected."""
    held = sorted((x for x in specs if _stable_unit(x.key()) < fraction), key=lambda x: _stable_unit(x.key()))
    train = [x for x in specs if _stable_unit(x.key()) >= fraction]
    need_shapes = min(2, len({x.shape for x in specs}))  # a one-shape world cannot ask for two
    need_colors = min(2, len({x.color for x in specs}))
    changed = True
    while changed:
        changed = False
        for x in reversed(held):
            shapes = {t.shape for t in train if t.color == x.color}
            colors = {t.color for t in train if t.shape == x.shape}
            if len(shapes) < need_shapes or len(colors) < need_colors:
                held.remove(x)
                train.append(x)
                changed = True
                break
    return frozenset(held)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")


class ShapesSource(Sequence):
    """``n`` records of one kind and split, as a random-access sequence (``grain.MapDataset.source(src)``).

    Picklable (only the world's settings travel), so it works with Grain worker processes.
    """

    def __init__(self, world: ShapesWorld, kind: str, split: str, n: int, format: str = "record",
                 **options: Any):
        _check_split(split)
        if kind not in KINDS:
            raise ValueError(f"unknown record kind {kind!r}; choose from {KINDS}")
        if format not in FORMATS:
            raise ValueError(f"unknown format {format!r}; choose from {FORMATS}")
        if n < 0:
            raise ValueError(f"ShapesSource: n must be >= 0, got {n}")
        self.world, self.kind, self.split, self.n = world, kind, split, int(n)
        self.format, self.options = format, options

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.n))]
        index = int(index)
        if index < 0:
            index += self.n
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self!r}")
        return self.world.record(self.kind, self.split, index, format=self.format, **self.options)

    def __repr__(self):
        return (f"ShapesSource({self.world!r}, kind={self.kind!r}, split={self.split!r}, n={self.n}, "
                f"format={self.format!r})")


WORLD_OPTIONS = ("colors", "shapes", "positions", "sizes", "backgrounds")


def world_from_config(data: Any) -> ShapesWorld:
    """The world a run's `config.data` section describes (the same one for training and evaluation).

    `data.world` (optional) restricts the attributes: a mapping with any of ``WORLD_OPTIONS``, each a list of
    names or None for all.
    """
    options = dict(data.get("world") or {})
    unknown = sorted(set(options) - set(WORLD_OPTIONS))
    if unknown:
        raise ValueError(f"config.data.world: unknown keys {unknown}; known: {list(WORLD_OPTIONS)}")
    options = {k: None if v is None else tuple(v) for k, v in options.items()}
    return ShapesWorld(seed=int(data["seed"]), resolution=max(int(data["resolution_out"]), 32), **options)
