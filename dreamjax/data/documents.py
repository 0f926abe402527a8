"""Typed records for the raw training formats (spec section 3).

These are what the source readers (`data/sources/`) produce and what `data/tokenize.py` consumes. An
image is an opaque reference (`ImageRef`): encoded bytes, a path, an array, anything the caller's image
loader understands. Tokenization never decodes an image; it only decides *where* each image goes and
returns the references in the order the model consumes them.

A record can flag images that failed to load or decode (`corrupt`, or an image that is `None`). The
layout functions then skip such an image as a whole (its `<im_start>` block and its `<dream_start>` block
together, so input and output images can never drift apart) and count the skip.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

# Encoded bytes, a path, a numpy array, a PIL image... Whatever the caller's loader accepts.
ImageRef: TypeAlias = Any

# Placeholder strings inside conversation text (LLaVA format): an input image and an image the assistant
# should generate. They are expanded to token blocks by `tokenize.tokenize_conversation`.
IMAGE_PLACEHOLDER = "<image>"
DREAM_PLACEHOLDER = "<dream>"
_PLACEHOLDER_RE = re.compile(f"{re.escape(IMAGE_PLACEHOLDER)}|{re.escape(DREAM_PLACEHOLDER)}")

# Role aliases of the LLaVA / ShareGPT json files (upstream `ConversationDataset.roles_map`).
ROLE_ALIASES: Mapping[str, str] = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "obj365": "assistant",
    "vg": "assistant",
}


def mmc4_member_name(image_name: str) -> str:
    """Spec 3.2: MMC4 shards store the image of `image_name` as member `image_name.split(".")[0] + ".jpg"`
    (the text before the *first* dot), whatever extension `image_name` has."""
    return image_name.split(".")[0] + ".jpg"


def is_missing(image: ImageRef) -> bool:
    """An image reference that cannot be used at all (treated like a corrupt image)."""
    return image is None


@dataclass(frozen=True)
class ImageTextPair:
    """An image and its caption (LAION, CC, BLIP-LAION...; spec 3.1).

    `corrupt=True` marks an image that failed to load: the pair is then skipped (and counted).
    """

    image: ImageRef
    caption: str
    corrupt: bool = False


@dataclass(frozen=True)
class InterleavedDoc:
    """An MMC4-style document (spec 3.2): sentences plus images matched to sentences.

    `images[k] = (image, matched_text_index)`: the image goes right after sentence `matched_text_index`.
    The order of `images` does not matter (tokenization sorts them stably by the index).
    `corrupt` holds indices into `images` (this list's order) of images that failed to load.
    """

    text_list: Sequence[str]
    images: Sequence[tuple[ImageRef, int]] = ()
    corrupt: frozenset[int] = frozenset()

    @classmethod
    def from_mmc4(
        cls,
        record: Mapping[str, Any],
        resolve: Callable[[Mapping[str, Any]], ImageRef] = lambda info: mmc4_member_name(info["image_name"]),
    ) -> InterleavedDoc:
        """From an MMC4 json: `{"text_list": [...], "image_info": [{"image_name", "matched_text_index"}]}`.

        `resolve(image_info)` returns the image reference. The default is the name the image has inside an
        MMC4 tar shard (spec 3.2, `mmc4_member_name`), not `image_name` verbatim: `"abc.png"` is stored as
        `"abc.jpg"`. Return None for an image that cannot be found, and it is skipped and counted at
        tokenization.
        """
        images = [(resolve(info), int(info["matched_text_index"])) for info in record.get("image_info", [])]
        return cls(text_list=list(record["text_list"]), images=images)


@dataclass(frozen=True)
class Conversation:
    """A multi-turn conversation (LLaVA format; spec 3.3).

    `turns = [(role, text), ...]`, roles "user"/"assistant" (the LLaVA aliases "human"/"gpt" are accepted).
    The text may contain the placeholders `<image>` (an input image) and `<dream>` (an image the
    assistant generates). Each placeholder, in reading order over all turns, takes the next entry of
    `images`. `corrupt` holds indices into `images` of images that failed to load.
    """

    turns: Sequence[tuple[str, str]]
    images: Sequence[ImageRef] = ()
    corrupt: frozenset[int] = frozenset()

    @classmethod
    def from_llava(
        cls,
        record: Mapping[str, Any],
        resolve: Callable[[str], ImageRef] = lambda path: path,
    ) -> Conversation:
        """From a LLaVA json record.

        Old format `{"image": path, "conversations": [{"from", "value"}]}`: every placeholder refers to the
        one image (upstream loads `record["image"]` for each message that has a placeholder).
        New format: a message may carry `"modal_info": {placeholder: ["image", [path, ...]]}`, and each
        occurrence of a placeholder in that message takes the next path listed for it.
        `resolve(path)` turns a path into the image reference (default: the path itself).
        """
        turns = [(conv["from"], conv["value"]) for conv in record["conversations"]]
        images: list[ImageRef] = []
        if "image" in record:
            n = sum(len(_PLACEHOLDER_RE.findall(text)) for _, text in turns)
            images = [resolve(record["image"])] * n
        else:
            for conv in record["conversations"]:
                modal_info = conv.get("modal_info")
                if not modal_info:
                    continue
                pending = {ph: list(paths) for ph, (_modal_type, paths) in modal_info.items()}
                for match in _PLACEHOLDER_RE.finditer(conv["value"]):
                    paths = pending.get(match.group(), [])
                    images.append(resolve(paths.pop(0)) if paths else None)  # None: missing, counted later
        return cls(turns=turns, images=images)


@dataclass(frozen=True)
class InstructInterleavedDoc:
    """An instruction-following interleaved document (InstructMMC4; spec 3.4).

    The `instruction` becomes a one-turn vicuna prompt; the document (`text_list`, `images` as in
    `InterleavedDoc`) is the assistant's answer.
    """

    instruction: str
    text_list: Sequence[str]
    images: Sequence[tuple[ImageRef, int]] = ()
    corrupt: frozenset[int] = frozenset()


Record: TypeAlias = ImageTextPair | InterleavedDoc | Conversation | InstructInterleavedDoc


def normalize_roles(turns: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Map role aliases to "user"/"assistant" and drop a leading non-user turn (as upstream does).

    An unknown role raises `ValueError`.
    """
    out = []
    for role, text in turns:
        if role.lower() not in ROLE_ALIASES:
            raise ValueError(f"unknown conversation role {role!r}; expected one of {sorted(ROLE_ALIASES)}")
        out.append((ROLE_ALIASES[role.lower()], text))
    if out and out[0][0] != "user":
        out = out[1:]
    return out


def placeholders_in(text: str) -> list[str]:
    """The `<image>` / `<dream>` placeholders of `text`, in reading order."""
    return _PLACEHOLDER_RE.findall(text)


__all__ = [
    "DREAM_PLACEHOLDER",
    "IMAGE_PLACEHOLDER",
    "ROLE_ALIASES",
    "Conversation",
    "ImageRef",
    "ImageTextPair",
    "InstructInterleavedDoc",
    "InterleavedDoc",
    "Record",
    "is_missing",
    "mmc4_member_name",
    "normalize_roles",
    "placeholders_in",
]

