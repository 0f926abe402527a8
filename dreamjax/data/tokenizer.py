"""The DreamLLM tokenizer: loading, special tokens, and a tiny word-level tokenizer for tests and the demo.

Spec 1.2: the base is the LLaMA SentencePiece tokenizer (`<unk>`=0, `<s>`=1, `</s>`=2; BOS added, no EOS),
and DreamLLM adds the pad token `[PAD]` plus seven additional special tokens. Their ids are NOT canonical:
the released checkpoints have `[PAD]`=32000, `<im_start>`=32001, `<dream_end>`=32002, ... (see
`RELEASED_SPECIAL_TOKEN_ORDER`), while adding them to a fresh Vicuna tokenizer gives insertion order.
So every id used by dreamjax is read from the tokenizer (`SpecialIds.from_tokenizer`), never hard-coded.

`split_words` is the one word segmentation of the package: the word tokenizer's vocabulary and the shapes
world's (`data/synthetic.py`) both come from it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from dreamjax.data.chat import VICUNA_V1_1

# --- special token strings (omni/models/dreamllm/tokenization_dreamllm.py) ---------------------------------
PAD_TOKEN = "[PAD]"
IMAGE_TOKEN = "<image>"  # placeholder in conversation text, expanded to an IMG block
IMAGE_PATCH_TOKEN = "<im_patch>"  # the 256 CLIP slots, and also the 64 dream-query slots
IMAGE_START_TOKEN = "<im_start>"
IMAGE_END_TOKEN = "<im_end>"
DREAM_TOKEN = "<dream>"  # placeholder in conversation text, expanded to DRM + IMG
DREAM_START_TOKEN = "<dream_start>"  # what the paper calls <dream>: the LM emits it to start an image
DREAM_END_TOKEN = "<dream_end>"

# The dict passed to `tokenizer.add_special_tokens` upstream (projects/dreamllm/train.py), in its order.
ADDITIONAL_SPECIAL_TOKENS: tuple[str, ...] = (
    IMAGE_TOKEN,
    IMAGE_PATCH_TOKEN,
    IMAGE_START_TOKEN,
    IMAGE_END_TOKEN,
    DREAM_TOKEN,
    DREAM_START_TOKEN,
    DREAM_END_TOKEN,
)
DREAM_SPECIAL_TOKENS: dict[str, object] = {
    "pad_token": PAD_TOKEN,
    "additional_special_tokens": list(ADDITIONAL_SPECIAL_TOKENS),
}
# Insertion order: what a fresh Vicuna tokenizer gets ([PAD]=32000, <image>=32001, ..., <dream_end>=32007).
INSERTION_SPECIAL_TOKEN_ORDER: tuple[str, ...] = (PAD_TOKEN, *ADDITIONAL_SPECIAL_TOKENS)
# Id order of the released checkpoints' added_tokens.json ([PAD]=32000, <im_start>=32001, ...).
RELEASED_SPECIAL_TOKEN_ORDER: tuple[str, ...] = (
    PAD_TOKEN,
    IMAGE_START_TOKEN,
    DREAM_END_TOKEN,
    DREAM_START_TOKEN,
    IMAGE_PATCH_TOKEN,
    IMAGE_END_TOKEN,
    IMAGE_TOKEN,
    DREAM_TOKEN,
)

# LLaMA base specials.
UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<unk>", "<s>", "</s>"


@dataclass(frozen=True)
class SpecialIds:
    """The token ids the layouts and the model need, read from a tokenizer."""

    bos: int
    eos: int
    pad: int
    im_start: int
    im_patch: int
    im_end: int
    dream_start: int
    dream_end: int
    image: int  # the `<image>` placeholder id (conversation text only)
    dream: int  # the `<dream>` placeholder id (conversation text only)

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> SpecialIds:
        """Read every id from `tokenizer`; a missing token raises `KeyError` naming it."""
        unk_id = tokenizer.unk_token_id

        def token_id(token: str | None, what: str) -> int:
            if token is None:
                raise KeyError(f"tokenizer has no {what} token")
            tid = tokenizer.convert_tokens_to_ids(token)
            if tid is None or (tid == unk_id and token != tokenizer.unk_token):
                raise KeyError(
                    f"tokenizer has no {token!r} ({what}); load it with "
                    "dreamjax.data.tokenizer.load_tokenizer or call add_dreamllm_special_tokens(tokenizer)"
                )
            return int(tid)

        return cls(
            bos=token_id(tokenizer.bos_token, "BOS"),
            eos=token_id(tokenizer.eos_token, "EOS"),
            pad=token_id(tokenizer.pad_token, "pad"),
            im_start=token_id(IMAGE_START_TOKEN, "image start"),
            im_patch=token_id(IMAGE_PATCH_TOKEN, "image patch"),
            im_end=token_id(IMAGE_END_TOKEN, "image end"),
            dream_start=token_id(DREAM_START_TOKEN, "dream start"),
            dream_end=token_id(DREAM_END_TOKEN, "dream end"),
            image=token_id(IMAGE_TOKEN, "image placeholder"),
            dream=token_id(DREAM_TOKEN, "dream placeholder"),
        )

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def add_dreamllm_special_tokens(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add `[PAD]` (and make it the pad token) and the seven DreamLLM tokens, each only if missing.

    Tokens already in the vocabulary keep their ids (so a released checkpoint's order is respected); the
    missing ones get new ids in `INSERTION_SPECIAL_TOKEN_ORDER`, as upstream `add_special_tokens` would.
    Returns the number of tokens added to the vocabulary.
    """
    added = tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    added += tokenizer.add_special_tokens(
        {"additional_special_tokens": list(ADDITIONAL_SPECIAL_TOKENS)}, replace_extra_special_tokens=False
    )
    return added


def load_tokenizer(local_dir: str | Path) -> PreTrainedTokenizerBase:
    """Load a HF tokenizer from a local directory (never the network) with the DreamLLM specials added.

    `len(tokenizer)` is then the vocabulary size the model needs.
    """
    path = Path(local_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {str(path)!r}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(
            f"could not load a tokenizer from {str(path)!r} (expected tokenizer.json or tokenizer.model "
            f"with tokenizer_config.json): {e}"
        ) from e
    use_legacy_sentencepiece(tokenizer)
    add_dreamllm_special_tokens(tokenizer)
    return tokenizer


def is_sentencepiece_bpe(tokenizer: PreTrainedTokenizerBase) -> bool:
    """A LLaMA-style SentencePiece BPE (byte fallback, "▁" for spaces), however transformers converted it.
    Llama-3's byte-level BPE and the word tokenizer are not."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.model, models.BPE) or not backend.model.byte_fallback:
        return False
    return WORD_SPACE in repr(backend.pre_tokenizer) + repr(backend.normalizer)


def use_legacy_sentencepiece(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Give a LLaMA SentencePiece tokenizer upstream's tokenization (spec 1.2: `LlamaTokenizer`, legacy=True).

    Upstream (transformers 4.35, slow, legacy) splits the text at the special tokens and runs
    `sp_model.encode` on each piece, which prepends "▁" to every piece: text right after `</s>` or `<image>`
    starts with "▁", and a piece starting with a space gets "▁▁". Newer transformers convert the same
    `tokenizer.model` to a Metaspace pre-tokenizer whose default prepends "▁" only to the first piece
    (legacy=False), or never doubles it (legacy=True), so the ids after a special token or of a leading space
    differ from what the released model was trained on. The legacy converter's normalizer (prepend "▁",
    spaces -> "▁", no pre-tokenizer) is exactly SentencePiece's identity normalizer with a dummy prefix, so
    we install it whatever the tokenizer files or transformers' defaults say. Returns whether it applied.
    """
    if not is_sentencepiece_bpe(tokenizer):
        return False
    backend = tokenizer.backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(WORD_SPACE), normalizers.Replace(" ", WORD_SPACE)])
    backend.pre_tokenizer = None
    if hasattr(tokenizer, "legacy"):
        tokenizer.legacy = True
    return True


def special_tokens2ids_dict(tokenizer: PreTrainedTokenizerBase) -> dict:
    """The `config.special_tokens2ids_dict` layout of the released checkpoints (spec 1.2)."""
    s = SpecialIds.from_tokenizer(tokenizer)
    return {
        tokenizer.bos_token: s.bos,
        tokenizer.eos_token: s.eos,
        tokenizer.unk_token: tokenizer.unk_token_id,
        PAD_TOKEN: s.pad,
        "additional_special_tokens": {
            t: int(tokenizer.convert_tokens_to_ids(t)) for t in ADDITIONAL_SPECIAL_TOKENS
        },
    }


# --- a tiny LLaMA-like word tokenizer -----------------------------------------------------------------------
# Whitespace is handled like LLaMA's SentencePiece (legacy mode): every space becomes "▁" glued to the next
# word, a "▁" is prepended to each stretch of text (also right after a special token such as "</s>"), and a
# trailing space is a token "▁" of its own. That last point is what the FastChat/LLaVA "-2" masking rule
# relies on (`tok("... ASSISTANT: ")` ends with "▁"), so conversation masking is exact with this tokenizer
# too. Punctuation and newlines are split off as their own tokens.
WORD_SPACE = "▁"
PUNCTUATION: tuple[str, ...] = ("?", ".", ",", ":", "!", ";", "\n")
_SPLIT_RE = "[" + re.escape("".join(PUNCTUATION)) + "]"


def split_words(text: str) -> list[str]:
    """The words of `text` as the word tokenizer sees them (whitespace and punctuation removed)."""
    return [w for w in re.split(rf"\s+|{_SPLIT_RE}", text) if w]


def build_word_tokenizer(
    words: Iterable[str],
    out_dir: str | Path | None = None,
    *,
    include_template_words: bool = True,
    base_vocab_size: int | None = None,
    special_tokens_order: Sequence[str] = INSERTION_SPECIAL_TOKEN_ORDER,
) -> PreTrainedTokenizerFast:
    """A small word-level tokenizer for the synthetic world, with LLaMA-like specials and behaviour.

    `words`: words or whole sentences (split with `split_words`); each known word `w` gets the ids of both
    "▁w" (after a space) and "w" (after punctuation or a newline). Unknown words map to `<unk>`.
    Vocabulary: `<unk>`=0, `<s>`=1, `</s>`=2, "▁", punctuation, the words (first-seen order), optional
    `<unused_i>` filler up to `base_vocab_size` (e.g. 32000 to mimic LLaMA), then the eight DreamLLM
    specials in `special_tokens_order`. BOS is added, EOS is not.
    `include_template_words` adds the words of the vicuna_v1.1 conversation template.
    With `out_dir`, the tokenizer is saved there (`save_pretrained`) and `load_tokenizer(out_dir)` loads it.
    """
    if sorted(special_tokens_order) != sorted(INSERTION_SPECIAL_TOKEN_ORDER):
        raise ValueError(f"special_tokens_order must be a permutation of {INSERTION_SPECIAL_TOKEN_ORDER}")

    vocab: dict[str, int] = {}

    def add(piece: str) -> None:
        if piece not in vocab:
            vocab[piece] = len(vocab)

    for piece in (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, WORD_SPACE, *PUNCTUATION):
        add(piece)
    all_words = [w for text in words for w in split_words(text)]
    if include_template_words:
        all_words += split_words(" ".join((VICUNA_V1_1.system_message, *VICUNA_V1_1.roles)))
    for w in all_words:
        add(WORD_SPACE + w)
        add(w)
    if base_vocab_size is not None:
        if base_vocab_size < len(vocab):
            raise ValueError(f"base_vocab_size {base_vocab_size} < {len(vocab)} pieces needed")
        for i in range(base_vocab_size - len(vocab)):
            vocab[f"<unused_{i}>"] = len(vocab)

    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=WORD_SPACE, prepend_scheme="always", split=True),
            pre_tokenizers.Split(Regex(_SPLIT_RE), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement=WORD_SPACE, prepend_scheme="always", split=True)
    bos_id = vocab[BOS_TOKEN]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )

    def special(t: str) -> AddedToken:
        return AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)

    tok.add_special_tokens([special(t) for t in (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)])
    tok.add_special_tokens([special(t) for t in special_tokens_order])  # ids in this order

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(ADDITIONAL_SPECIAL_TOKENS),
        clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        hf.save_pretrained(str(out_dir))
    return hf


__all__ = [
    "ADDITIONAL_SPECIAL_TOKENS",
    "DREAM_SPECIAL_TOKENS",
    "INSERTION_SPECIAL_TOKEN_ORDER",
    "RELEASED_SPECIAL_TOKEN_ORDER",
    "SpecialIds",
    "add_dreamllm_special_tokens",
    "build_word_tokenizer",
    "load_tokenizer",
    "special_tokens2ids_dict",
    "split_words",
    "use_legacy_sentencepiece",
]
