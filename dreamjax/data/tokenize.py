"""Token layouts of the four data formats (spec section 3); the batch collation is in `data/collate.py`,
the chat template in `data/chat.py`.

Pure functions from a record (`data/documents.py`) to a `TokenizedSample`:

    tokenize_pair                  3.1  [BOS] IMG caption [EOS]  (I2T)   or   caption DRM [EOS]  (T2I)
    tokenize_interleaved           3.2  [BOS] seg_0 BLK_0 seg_1 BLK_1 ... [EOS]
    tokenize_conversation          3.3  vicuna_v1.1 prompt, <image> -> IMG, <dream> -> DRM IMG
    tokenize_instruct_interleaved  3.4  vicuna prompt with the instruction, then the document as in 3.2
    tokenize                       dispatch on the record type
    prompt_ids                     an inference prompt (BOS + text, `<image>` -> IMG; spec 4.1-4.2)

with the blocks (N = `num_image_tokens`, Q = `num_dream_queries`)

    IMG = <im_start> + N x <im_patch> + <im_end>       CLIP features are written into the N slots
    DRM = <dream_start> + Q x <im_patch> + <dream_end>  the dream queries are written into the Q slots

`tok(x)` below is LLaMA tokenization with BOS and without EOS. Upstream forces `add_eos_token=False` on the
shared tokenizer for the duration of a sample; here `tok` is `[bos] + encode(x, add_special_tokens=False)`,
which is the same ids without mutating a tokenizer that Grain workers may share.

Nothing is lost silently: whatever is skipped or truncated is counted in a `Skips` (pass one in; for
multi-process Grain workers use one `Skips` per record and carry its counts along with the sample).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from dreamjax.data.chat import VICUNA_V1_1, ConvTemplate
from dreamjax.data.documents import (
    Conversation,
    ImageRef,
    ImageTextPair,
    InstructInterleavedDoc,
    InterleavedDoc,
    Record,
    is_missing,
    normalize_roles,
    placeholders_in,
)
from dreamjax.data.tokenizer import SpecialIds

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
MODES = ("comprehension_only", "creation_only", "joint")


# --- configuration, results, counters -----------------------------------------------------------------------
@dataclass(frozen=True)
class LayoutConfig:
    """Sizes and mode of the token layout (spec 1.1, 3)."""

    num_image_tokens: int = 256  # N: CLIP patches per input image (224/14)^2
    num_dream_queries: int = 64  # Q: dream queries per generated image
    max_length: int = 2048  # the LLM context (upstream `tokenizer.model_max_length`)
    mode: str = "joint"  # "comprehension_only" (stage I, I2T), "creation_only" (stage I, T2I), "joint"
    template: ConvTemplate = VICUNA_V1_1

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.num_image_tokens < 0 or self.num_dream_queries < 0 or self.max_length < 1:
            raise ValueError(f"bad layout sizes: {self}")

    @property
    def img_len(self) -> int:
        return self.num_image_tokens + 2

    @property
    def drm_len(self) -> int:
        return self.num_dream_queries + 2


@dataclass
class TokenizedSample:
    """One sequence: `ids`/`labels` (-100 = no loss), the k-th `<im_start>` takes `images_in[k]` and the
    k-th `<dream_start>` takes `images_out[k]` (image references, not pixels)."""

    ids: list[int]
    labels: list[int]
    images_in: list[ImageRef] = field(default_factory=list)
    images_out: list[ImageRef] = field(default_factory=list)
    kind: str = ""  # "i2t", "t2i", "interleaved", "conversation", "instruct_interleaved"

    def __len__(self) -> int:
        return len(self.ids)


class Reason:
    """The reasons under which `Skips` counts things (one count per item unless noted)."""

    PAIR_CORRUPT_IMAGE = "pair_corrupt_image"  # a pair whose image failed: sample skipped
    CAPTION_TRUNCATED = "caption_truncated"  # caption cut to fit max_length
    CORRUPT_IMAGE = "corrupt_image"  # an interleaved image skipped (both its CLIP and SD uses)
    DOC_TRUNCATED = "doc_truncated"  # an interleaved document stopped early at max_length
    IMAGES_DROPPED_BY_LENGTH = "images_dropped_by_length"  # per image, in documents stopped early
    EMPTY_SAMPLE = "empty_sample"  # nothing left but [BOS, EOS]: sample skipped
    CONV_TRUNCATED = "conversation_truncated"  # conversation cut at max_length (block dropped whole)
    CONV_MISSING_IMAGE = "conversation_missing_image"  # more placeholders than images: sample skipped
    CONV_CORRUPT_IMAGE = "conversation_corrupt_image"  # a used image failed: sample skipped
    CONV_UNUSED_IMAGES = "conversation_unused_images"  # per image given but never referenced
    CONV_MASK_MISMATCH = "conversation_mask_mismatch"  # "-2" rule lengths disagree: sample kept, as upstream
    INSTRUCTION_TOO_LONG = "instruction_too_long"  # the prompt alone reaches max_length: sample skipped
    STRAY_SPECIAL_TOKEN = "stray_special_token"  # text produced <im_start>/<dream_start>: sample skipped
    BATCH_TRUNCATED = "batch_truncated"  # collate cut a sample (length or image count)
    BATCH_IMAGES_IN_DROPPED = "batch_images_in_dropped"  # per input image cut by collate
    BATCH_IMAGES_OUT_DROPPED = "batch_images_out_dropped"  # per output image cut by collate


class Skips:
    """Counts of skipped / truncated / dropped items by reason (never silent loss)."""

    def __init__(self, counts: Mapping[str, int] | None = None):
        self.counts: Counter[str] = Counter(counts or {})

    def add(self, reason: str, n: int = 1) -> None:
        if n:
            self.counts[reason] += n
            log.debug("data skip: %s (+%d)", reason, n)

    def merge(self, other: Skips | Mapping[str, int]) -> None:
        self.counts.update(other.counts if isinstance(other, Skips) else other)

    def __getitem__(self, reason: str) -> int:
        return self.counts[reason]

    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def __repr__(self) -> str:
        return f"Skips({self.as_dict()})"


# --- small helpers ----------------------------------------------------------------------------------------
def _tok(tokenizer, text: str, bos: int) -> list[int]:
    """`tok(x)`: BOS + the tokens of x, no EOS."""
    return [bos] + list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def image_block(s: SpecialIds, cfg: LayoutConfig) -> list[int]:
    """IMG = <im_start> + N x <im_patch> + <im_end>."""
    return [s.im_start] + [s.im_patch] * cfg.num_image_tokens + [s.im_end]


def dream_block(s: SpecialIds, cfg: LayoutConfig) -> list[int]:
    """DRM = <dream_start> + Q x <im_patch> + <dream_end> (the dream slots reuse <im_patch>)."""
    return [s.dream_start] + [s.im_patch] * cfg.num_dream_queries + [s.dream_end]


def _mask(ids: Sequence[int], masked: set[int]) -> list[int]:
    return [IGNORE_INDEX if t in masked else t for t in ids]


def _finish(sample: TokenizedSample, s: SpecialIds, skips: Skips) -> TokenizedSample | None:
    """Last check: the k-th <im_start>/<dream_start> must have the k-th image. A special token string in
    the raw text (e.g. a literal "<im_start>") would break that, so such a sample is skipped and counted."""
    aligned_in = sample.ids.count(s.im_start) == len(sample.images_in)
    aligned_out = sample.ids.count(s.dream_start) == len(sample.images_out)
    if not (aligned_in and aligned_out):
        skips.add(Reason.STRAY_SPECIAL_TOKEN)
        return None
    return sample


def _specials(tokenizer, specials: SpecialIds | None) -> SpecialIds:
    return specials if specials is not None else SpecialIds.from_tokenizer(tokenizer)


def _image_ok(image: ImageRef, index: int, corrupt: frozenset[int]) -> bool:
    return index not in corrupt and not is_missing(image)


# --- 3.1 image-text pairs ---------------------------------------------------------------------------------
def tokenize_pair(
    record: ImageTextPair,
    tokenizer,
    cfg: LayoutConfig,
    *,
    rng: np.random.Generator | None = None,
    skips: Skips | None = None,
    specials: SpecialIds | None = None,
) -> TokenizedSample | None:
    """Spec 3.1. I2T: `[BOS] + IMG + caption + [EOS]`, labels = ids with <im_*> at -100.
    T2I: `tok(caption) + DRM + [EOS]`, all labels -100 (the pair trains only the diffusion loss).

    comprehension_only -> I2T, creation_only -> T2I, joint -> I2T when `rng.random() >= 0.5` else T2I
    (upstream: `prob = np.random.rand()`; here the seeded `rng` makes it reproducible).
    The caption keeps at most `max_length - len(block) - 2` tokens (1788 for I2T, 1980 for T2I at the
    defaults: upstream tokenizes with `max_length = 2048 - len(block) - 1`, counting BOS).
    A corrupt image skips the pair (upstream keeps the ids and drops only the pixels, which misaligns).
    """
    s = _specials(tokenizer, specials)
    skips = skips if skips is not None else Skips()
    if record.corrupt or is_missing(record.image):
        skips.add(Reason.PAIR_CORRUPT_IMAGE)
        return None

    if cfg.mode == "comprehension_only":
        i2t = True
    elif cfg.mode == "creation_only":
        i2t = False
    else:
        if rng is None:
            raise ValueError("joint mode chooses I2T or T2I at random: pass a seeded numpy Generator as rng")
        i2t = rng.random() >= 0.5

    block = image_block(s, cfg) if i2t else dream_block(s, cfg)
    caption = _tok(tokenizer, record.caption, s.bos)
    limit = cfg.max_length - len(block) - 1  # tokenizer max_length upstream: caption incl. BOS, minus EOS
    if limit < 1:
        raise ValueError(f"max_length {cfg.max_length} is too small for a {len(block)}-token block")
    if len(caption) > limit:
        skips.add(Reason.CAPTION_TRUNCATED)
        caption = caption[:limit]

    if i2t:
        ids = caption[:1] + block + caption[1:] + [s.eos]
        labels = _mask(ids, {s.im_patch, s.im_start, s.im_end})  # BOS is kept (never predicted anyway)
        sample = TokenizedSample(ids, labels, images_in=[record.image], kind="i2t")
    else:
        ids = caption + block + [s.eos]
        labels = [IGNORE_INDEX] * len(ids)
        sample = TokenizedSample(ids, labels, images_out=[record.image], kind="t2i")
    return _finish(sample, s, skips)


# --- 3.2 interleaved documents ----------------------------------------------------------------------------
def merge_text_list(text_list: Sequence[str], matched_text_index: Sequence[int]) -> list[str]:
    """Upstream `_merge_text_list`: segment k = " ".join(text_list[prev : matched_text_index[k] + 1]);
    a tail after the last matched sentence is one more segment. Image k goes right after segment k, so two
    images matched to the same sentence have an empty segment between them."""
    segments, prev = [], 0
    for index in matched_text_index:
        segments.append(" ".join(text_list[prev : index + 1]))
        prev = index + 1
    if prev != len(text_list):
        segments.append(" ".join(text_list[prev:]))
    return segments


def _sorted_images(images: Sequence[tuple[ImageRef, int]]) -> list[tuple[ImageRef, int, int]]:
    """(image, matched_text_index, original position), sorted by matched_text_index, stable."""
    order = sorted(range(len(images)), key=lambda k: (images[k][1], k))
    return [(images[k][0], int(images[k][1]), k) for k in order]


def _append_document(
    ids: list[int],
    text_list: Sequence[str],
    images: Sequence[tuple[ImageRef, int]],
    corrupt: frozenset[int],
    tokenizer,
    cfg: LayoutConfig,
    s: SpecialIds,
    skips: Skips,
) -> tuple[list[int], list[ImageRef], list[ImageRef]]:
    """The loop of spec 3.2 steps 1-4, appending to `ids` (which holds no EOS yet).

    Before adding a segment or a block: if `len(ids) + len(new) + 2 > max_length`, stop and drop the rest
    of the document (the "+2" reserves BOS and EOS; it is kept as-is for 3.4 where BOS is already in ids).
    """
    ordered = _sorted_images(images)
    segments = merge_text_list([t.strip() for t in text_list], [m for _, m, _ in ordered])
    if cfg.mode == "comprehension_only":
        block = image_block(s, cfg)
    elif cfg.mode == "creation_only":
        block = dream_block(s, cfg)
    else:  # joint: generate the image from the dream queries, then read it back in through CLIP
        block = dream_block(s, cfg) + image_block(s, cfg)

    images_in: list[ImageRef] = []
    images_out: list[ImageRef] = []
    handled = 0  # images placed or skipped as corrupt
    truncated = False
    for idx, segment in enumerate(segments):
        new = _tok(tokenizer, segment, s.bos)[1:]  # BOS stripped
        if len(ids) + len(new) + 2 > cfg.max_length:
            truncated = True
            break
        ids = ids + new
        if idx >= len(ordered):  # the tail after the last image
            continue
        if len(ids) + len(block) + 2 > cfg.max_length:
            truncated = True
            break
        handled += 1
        image, _, original = ordered[idx]
        if not _image_ok(image, original, corrupt):
            # Skip the image for both CLIP and SD together (upstream could keep one without the other).
            skips.add(Reason.CORRUPT_IMAGE)
            continue
        ids = ids + block
        if cfg.mode != "creation_only":
            images_in.append(image)
        if cfg.mode != "comprehension_only":
            images_out.append(image)
    if truncated:
        skips.add(Reason.DOC_TRUNCATED)
        skips.add(Reason.IMAGES_DROPPED_BY_LENGTH, len(ordered) - handled)
    return ids, images_in, images_out


def _interleaved_labels(ids: Sequence[int], s: SpecialIds) -> list[int]:
    # Only <dream_start> is kept as a target among the specials: the model learns where to place images.
    return _mask(ids, {s.im_patch, s.im_start, s.im_end, s.dream_end})


def tokenize_interleaved(
    record: InterleavedDoc,
    tokenizer,
    cfg: LayoutConfig,
    *,
    rng: np.random.Generator | None = None,
    skips: Skips | None = None,
    specials: SpecialIds | None = None,
) -> TokenizedSample | None:
    """Spec 3.2: `[BOS] + tok(seg_0)[1:] + BLK + tok(seg_1)[1:] + BLK + ... + [EOS]`, BLK by mode
    (IMG / DRM / DRM+IMG), labels = ids with <im_patch>, <im_start>, <im_end>, <dream_end> at -100.
    `rng` is unused (accepted so that all layout functions share one signature)."""
    del rng
    s = _specials(tokenizer, specials)
    skips = skips if skips is not None else Skips()
    body, images_in, images_out = _append_document(
        [], record.text_list, record.images, record.corrupt, tokenizer, cfg, s, skips
    )
    if not body:
        # dreamjax: a document with nothing left would be just [BOS, EOS]; skip it (upstream keeps it).
        skips.add(Reason.EMPTY_SAMPLE)
        return None
    ids = [s.bos] + body + [s.eos]
    sample = TokenizedSample(ids, _interleaved_labels(ids, s), images_in, images_out, kind="interleaved")
    return _finish(sample, s, skips)


# --- 3.3 conversations ------------------------------------------------------------------------------------
def _turn_offset(tokenizer, template: ConvTemplate) -> int:
    """How many tokens a turn loses when it follows `sep2` ("</s>") instead of starting the text.

    Upstream subtracts 1 for turns i > 0 when `not tokenizer.legacy` (its comment: non-legacy LLaMA gives
    "USER" -> ["▁US", "ER"] but "</s>USER" -> ["</s>", "USER"]), and 0 in legacy mode. transformers 5
    does not keep a reliable `legacy` flag on reloaded tokenizers (it defaults to False and is not saved),
    so dreamjax measures the same quantity directly: 0 for legacy LLaMA and for the word tokenizer, 1 for
    the non-legacy case of that comment, as upstream.
    """
    head = template.roles[0] + ":"
    alone = tokenizer(head, add_special_tokens=False, verbose=False)["input_ids"]
    after = tokenizer(template.sep2 + head, add_special_tokens=False, verbose=False)["input_ids"]
    return len(alone) - (len(after) - 1)


def conversation_labels(
    prompt: str, ids: Sequence[int], tokenizer, template: ConvTemplate, bos: int
) -> tuple[list[int], bool]:
    """Mask the user turns with the FastChat/LLaVA rule (upstream builder_dreamllm.py, LLaVA `preprocess_v1`).

    The prompt is split into turns at sep2 ("</s>"); each turn "[system ]USER: q ASSISTANT: a" is split at
    " ASSISTANT: " into the instruction part (re-joined with that separator) and the answer. Then:
      - position 0 (BOS) is masked; a cursor starts at 1;
      - `instruction_len = len(tok(instruction_part)) - 2`: tok() adds BOS (1), and LLaMA tokenizes the
        instruction part's trailing space ("ASSISTANT: ") as a lone "▁" that merges into the answer's first
        token ("▁a1") in the full prompt (1). So -2 is the number of instruction tokens in the full prompt;
      - those positions are masked, and the cursor moves by `len(tok(turn))`: the +1 of BOS stands for the
        "</s>" that ends the turn in the full prompt;
      - turns after the first are shifted by `_turn_offset` (upstream's non-legacy hack).
    The answer tokens and each "</s>" stay supervised. Returns (labels, lengths_agree). Upstream logs a
    disagreement and keeps the sample; dreamjax also keeps it but, like LLaVA, masks everything after the
    cursor (upstream leaves it supervised), and the caller counts it.
    """
    labels = list(ids)
    sep = template.sep + template.roles[1] + ": "
    offset = _turn_offset(tokenizer, template)
    cur = 1
    labels[:cur] = [IGNORE_INDEX] * cur
    for i, turn in enumerate(prompt.split(template.sep2)):
        if turn == "":  # after the last "</s>"
            break
        turn_len = len(_tok(tokenizer, turn, bos))
        parts = turn.split(sep)
        if len(parts) != 2:
            break
        instruction_len = len(_tok(tokenizer, parts[0] + sep, bos)) - 2
        if i != 0:
            instruction_len -= offset
        labels[cur : cur + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur += turn_len
        if i != 0:
            cur -= offset
    agree = cur == len(ids)
    labels[cur:] = [IGNORE_INDEX] * max(0, len(labels) - cur)
    return labels[: len(ids)], agree


def tokenize_conversation(
    record: Conversation,
    tokenizer,
    cfg: LayoutConfig,
    *,
    rng: np.random.Generator | None = None,
    skips: Skips | None = None,
    specials: SpecialIds | None = None,
) -> TokenizedSample | None:
    """Spec 3.3: vicuna_v1.1 prompt, user turns masked, then `<image>` -> IMG and `<dream>` -> DRM + IMG
    with every inserted position at -100 (including <dream_start>: conversations do not teach the model to
    emit it). Each placeholder takes the next image of the record: `<image>` puts it in `images_in`,
    `<dream>` in `images_out` and `images_in` (generated, then read back).

    Truncation (dreamjax rule): tokens are appended up to `max_length`; a block that would cross the limit
    is dropped whole and nothing after it is appended, so the sequence ends there (<= max_length). Upstream
    `truncate_and_replace` differs: its slice `new_input_ids[: -(current_position - truncate)]` keeps only
    the first `max_length - position` tokens, and a block ending exactly at max_length lets later text
    through (sequences longer than max_length). There is no EOS after a truncation (as upstream).
    The layout does not depend on `cfg.mode` (as upstream). `rng` is unused.
    """
    del rng
    s = _specials(tokenizer, specials)
    skips = skips if skips is not None else Skips()
    template = cfg.template
    turns = normalize_roles(record.turns)
    prompt = template.prompt(turns)
    ids = _tok(tokenizer, prompt, s.bos)
    labels, agree = conversation_labels(prompt, ids, tokenizer, template, s.bos)
    if not agree:
        skips.add(Reason.CONV_MASK_MISMATCH)

    img, drm = image_block(s, cfg), dream_block(s, cfg)
    out_ids: list[int] = []
    out_labels: list[int] = []
    images_in: list[ImageRef] = []
    images_out: list[ImageRef] = []
    # Next image of the record. Placeholders of a leading non-user turn (dropped by normalize_roles, as
    # upstream drops it) would have taken the first images: skip those so the rest stay aligned.
    first = sum(len(placeholders_in(text)) for _, text in record.turns[: len(record.turns) - len(turns)])
    k = first
    truncated = False
    for t, lab in zip(ids, labels):
        if t == s.image or t == s.dream:
            block = img if t == s.image else drm + img
            if len(out_ids) + len(block) > cfg.max_length:
                truncated = True
                break
            if k >= len(record.images):
                skips.add(Reason.CONV_MISSING_IMAGE)
                return None
            if not _image_ok(record.images[k], k, record.corrupt):
                skips.add(Reason.CONV_CORRUPT_IMAGE)
                return None
            out_ids += block
            out_labels += [IGNORE_INDEX] * len(block)
            images_in.append(record.images[k])
            if t == s.dream:
                images_out.append(record.images[k])
            k += 1
        else:
            if len(out_ids) + 1 > cfg.max_length:
                truncated = True
                break
            out_ids.append(t)
            out_labels.append(lab)
    if truncated:
        skips.add(Reason.CONV_TRUNCATED)
    else:
        skips.add(Reason.CONV_UNUSED_IMAGES, max(0, len(record.images) - (k - first)))
    sample = TokenizedSample(out_ids, out_labels, images_in, images_out, kind="conversation")
    return _finish(sample, s, skips)


# --- 3.4 instruction-following interleaved ----------------------------------------------------------------
def tokenize_instruct_interleaved(
    record: InstructInterleavedDoc,
    tokenizer,
    cfg: LayoutConfig,
    *,
    rng: np.random.Generator | None = None,
    skips: Skips | None = None,
    specials: SpecialIds | None = None,
) -> TokenizedSample | None:
    """Spec 3.4: `tok("{system} USER: {instruction} ASSISTANT:")` (with BOS), then the document exactly as in
    3.2 (blocks by mode; joint = DRM + IMG), then [EOS]. Labels: -100 over the whole prompt and over the
    specials as in 3.2 (<dream_start> supervised). The "+2" length check is kept although BOS is already
    in the ids, so the effective maximum is max_length - 1, as upstream. `rng` is unused."""
    del rng
    s = _specials(tokenizer, specials)
    skips = skips if skips is not None else Skips()
    prompt = cfg.template.prompt([("user", record.instruction), ("assistant", None)])
    prompt_ids = _tok(tokenizer, prompt, s.bos)
    if len(prompt_ids) + 1 > cfg.max_length:
        skips.add(Reason.INSTRUCTION_TOO_LONG)
        return None
    body, images_in, images_out = _append_document(
        list(prompt_ids), record.text_list, record.images, record.corrupt, tokenizer, cfg, s, skips
    )
    ids = body + [s.eos]
    labels = _interleaved_labels(ids, s)
    labels[: len(prompt_ids)] = [IGNORE_INDEX] * len(prompt_ids)
    sample = TokenizedSample(ids, labels, images_in, images_out, kind="instruct_interleaved")
    return _finish(sample, s, skips)


# --- dispatch ---------------------------------------------------------------------------------------------
_LAYOUTS: dict[type, Callable[..., TokenizedSample | None]] = {
    ImageTextPair: tokenize_pair,
    InterleavedDoc: tokenize_interleaved,
    Conversation: tokenize_conversation,
    InstructInterleavedDoc: tokenize_instruct_interleaved,
}


def tokenize(
    record: Record,
    tokenizer,
    cfg: LayoutConfig,
    *,
    rng: np.random.Generator | None = None,
    skips: Skips | None = None,
    specials: SpecialIds | None = None,
) -> TokenizedSample | None:
    """Tokenize any record with the layout of its type. Returns None for a skipped record (counted)."""
    try:
        layout = _LAYOUTS[type(record)]
    except KeyError:
        raise TypeError(f"no token layout for {type(record).__name__}") from None
    return layout(record, tokenizer, cfg, rng=rng, skips=skips, specials=specials)


def prompt_ids(text: str, tokenizer, cfg: LayoutConfig, specials: SpecialIds | None = None) -> list[int]:
    """Inference prompt: BOS + tok(text), no EOS, with each `<image>` placeholder expanded to an IMG block
    (spec 4.1-4.2). The caller supplies one input image per block, in order."""
    s = _specials(tokenizer, specials)
    out: list[int] = []
    for t in _tok(tokenizer, text, s.bos):
        out += image_block(s, cfg) if t == s.image else [t]
    return out


__all__ = [
    "IGNORE_INDEX",
    "MODES",
    "LayoutConfig",
    "Reason",
    "Skips",
    "TokenizedSample",
    "conversation_labels",
    "dream_block",
    "image_block",
    "merge_text_list",
    "prompt_ids",
    "tokenize",
    "tokenize_conversation",
    "tokenize_instruct_interleaved",
    "tokenize_interleaved",
    "tokenize_pair",
]
