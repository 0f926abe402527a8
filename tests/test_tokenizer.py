"""dreamjax.data.tokenizer: the word tokenizer, loading, and special ids read from the tokenizer."""

import io
import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dreamjax.data.tokenizer import (
    ADDITIONAL_SPECIAL_TOKENS,
    DREAM_SPECIAL_TOKENS,
    INSERTION_SPECIAL_TOKEN_ORDER,
    RELEASED_SPECIAL_TOKEN_ORDER,
    SpecialIds,
    build_word_tokenizer,
    load_tokenizer,
    special_tokens2ids_dict,
    split_words,
)

WORDS = ["a red circle is on the blue square", "what colour is it"]


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(WORDS)


def pieces(tok, text, **kw):
    return tok.convert_ids_to_tokens(tok(text, **kw)["input_ids"])


def test_dream_special_tokens_match_upstream_dict():
    assert DREAM_SPECIAL_TOKENS == {
        "pad_token": "[PAD]",
        "additional_special_tokens": [
            "<image>", "<im_patch>", "<im_start>", "<im_end>", "<dream>", "<dream_start>", "<dream_end>"
        ],
    }
    assert RELEASED_SPECIAL_TOKEN_ORDER == (
        "[PAD]", "<im_start>", "<dream_end>", "<dream_start>", "<im_patch>", "<im_end>", "<image>", "<dream>"
    )


def test_word_tokenizer_llama_like_basics(tok):
    v = tok.get_vocab()
    assert (v["<unk>"], v["<s>"], v["</s>"]) == (0, 1, 2)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    # BOS added, no EOS; words carry the "▁" of the space before them; punctuation split off.
    assert pieces(tok, "what colour is it?") == ["<s>", "▁what", "▁colour", "▁is", "▁it", "?"]
    assert pieces(tok, "a red circle, a blue square.") == [
        "<s>", "▁a", "▁red", "▁circle", ",", "▁a", "▁blue", "▁square", "."
    ]
    assert pieces(tok, "it: red") == ["<s>", "▁it", ":", "▁red"]
    assert pieces(tok, "") == ["<s>"]
    # Unknown words map to <unk>.
    assert pieces(tok, "a green circle") == ["<s>", "▁a", "<unk>", "▁circle"]
    # A trailing space is a lone "▁" (as LLaMA's SentencePiece does; the "-2" masking rule relies on it),
    # and "▁" is prepended again after a special token (LLaMA legacy mode).
    assert pieces(tok, "USER: what ASSISTANT: ") == ["<s>", "▁USER", ":", "▁what", "▁ASSISTANT", ":", "▁"]
    assert pieces(tok, "red</s>USER: it") == ["<s>", "▁red", "</s>", "▁USER", ":", "▁it"]
    # A newline is its own token and the next word has no "▁" (like LLaMA's <0x0A>).
    assert pieces(tok, "<image>\nwhat is it?") == ["<s>", "<image>", "▁", "\n", "what", "▁is", "▁it", "?"]


def test_word_tokenizer_round_trip(tok):
    for text in ["what colour is it?", "a red circle, a blue square.", "it: red", "a red circle.is it"]:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert split_words("a red circle, it.\nis") == ["a", "red", "circle", "it", "is"]


def test_special_ids_are_read_from_the_tokenizer(tok):
    s = SpecialIds.from_tokenizer(tok)
    base = len(tok) - 8
    # Insertion order: [PAD], then the additional tokens in list order.
    expected = {t: base + i for i, t in enumerate(INSERTION_SPECIAL_TOKEN_ORDER)}
    assert s.pad == expected["[PAD]"] == tok.pad_token_id
    assert (s.image, s.im_patch, s.im_start, s.im_end) == tuple(
        expected[t] for t in ("<image>", "<im_patch>", "<im_start>", "<im_end>")
    )
    assert (s.dream, s.dream_start, s.dream_end) == tuple(
        expected[t] for t in ("<dream>", "<dream_start>", "<dream_end>")
    )
    assert (s.bos, s.eos) == (1, 2)
    # A different order gives different ids: nothing is hard-coded.
    released = build_word_tokenizer(WORDS, special_tokens_order=RELEASED_SPECIAL_TOKEN_ORDER)
    other = SpecialIds.from_tokenizer(released)
    assert other.pad == s.pad and other.im_start == base + 1 and other.image == base + 6
    assert other != s


def test_save_and_load_round_trip(tok, tmp_path):
    build_word_tokenizer(WORDS, tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert len(loaded) == len(tok)
    assert SpecialIds.from_tokenizer(loaded) == SpecialIds.from_tokenizer(tok)
    for text in ["USER: <image>\nwhat colour is it? ASSISTANT: red</s>", "a <dream> square."]:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert set(ADDITIONAL_SPECIAL_TOKENS) <= set(loaded.all_special_tokens)
    # Special tokens are skipped when decoding.
    assert loaded.decode(loaded("a <dream> square")["input_ids"], skip_special_tokens=True) == "a  square"


def test_released_checkpoint_order_is_respected(tmp_path):
    # A tokenizer laid out like the released checkpoints: 32000 base pieces, then the added tokens in the
    # order of their added_tokens.json ([PAD]=32000, <im_start>=32001, <dream_end>=32002, ...).
    build_word_tokenizer(
        WORDS, tmp_path / "rel", base_vocab_size=32000, special_tokens_order=RELEASED_SPECIAL_TOKEN_ORDER
    )
    loaded = load_tokenizer(tmp_path / "rel")
    assert len(loaded) == 32008  # nothing added again
    s = SpecialIds.from_tokenizer(loaded)
    assert s.as_dict() == {
        "bos": 1, "eos": 2, "pad": 32000, "im_start": 32001, "im_patch": 32004, "im_end": 32005,
        "dream_start": 32003, "dream_end": 32002, "image": 32006, "dream": 32007,
    }
    assert special_tokens2ids_dict(loaded) == {
        "<s>": 1, "</s>": 2, "<unk>": 0, "[PAD]": 32000,
        "additional_special_tokens": {
            "<image>": 32006, "<im_patch>": 32004, "<im_start>": 32001, "<im_end>": 32005,
            "<dream>": 32007, "<dream_start>": 32003, "<dream_end>": 32002,
        },
    }


def _base_tokenizer_without_specials(out_dir):
    """A LLaMA-like tokenizer with no DreamLLM tokens (like a fresh Vicuna), saved to out_dir."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁a": 3, "▁red": 4}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    hf = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    hf.save_pretrained(str(out_dir))


def test_load_adds_missing_specials_in_insertion_order(tmp_path):
    _base_tokenizer_without_specials(tmp_path / "base")
    loaded = load_tokenizer(tmp_path / "base")
    assert len(loaded) == 5 + 8
    assert loaded.convert_tokens_to_ids(list(INSERTION_SPECIAL_TOKEN_ORDER)) == list(range(5, 13))
    assert loaded.pad_token == "[PAD]" and loaded.pad_token_id == 5
    assert SpecialIds.from_tokenizer(loaded).dream_end == 12


def test_missing_specials_raise_a_clear_error(tmp_path):
    _base_tokenizer_without_specials(tmp_path / "base")
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(str(tmp_path / "base"), local_files_only=True)
    with pytest.raises(KeyError, match="pad"):
        SpecialIds.from_tokenizer(raw)


def test_load_tokenizer_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found"):
        load_tokenizer(tmp_path / "does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="could not load a tokenizer"):
        load_tokenizer(tmp_path / "empty")


def test_build_word_tokenizer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="permutation"):
        build_word_tokenizer(WORDS, special_tokens_order=("[PAD]", "<image>"))
    with pytest.raises(ValueError, match="base_vocab_size"):
        build_word_tokenizer(WORDS, base_vocab_size=10)


def test_released_slow_format_sentencepiece(tmp_path):
    """The released repos ship tokenizer.model + added_tokens.json: the added ids must be kept."""
    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    corpus = ["USER: what colour is the circle? ASSISTANT: the circle is red."] * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=300, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    d = tmp_path / "release"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(model.getvalue())
    n = 300
    added = {t: n + i for i, t in enumerate(RELEASED_SPECIAL_TOKEN_ORDER)}
    (d / "added_tokens.json").write_text(json.dumps(added))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": True,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "[PAD]",
    }))
    (d / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "[PAD]",
        "additional_special_tokens": list(ADDITIONAL_SPECIAL_TOKENS),
    }))
    loaded = load_tokenizer(d)
    assert len(loaded) == n + 8
    s = SpecialIds.from_tokenizer(loaded)
    assert (s.pad, s.im_start, s.dream_end, s.dream_start, s.im_patch, s.im_end, s.image, s.dream) == tuple(
        range(n, n + 8)
    )
    ids = loaded("USER: <image>")["input_ids"]
    assert ids[0] == s.bos and ids[-1] == s.image and s.eos not in ids


# --- upstream's LLaMA SentencePiece tokenization (spec 1.2), checked against the sentencepiece library -----
SP_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "USER: what colour is the circle? ASSISTANT: the circle is red.",
    "The quick brown fox jumps over the lazy dog.  Two  spaces.\nA new line.",
]
SP_TEXTS = [
    "USER: what colour? ASSISTANT: red</s>USER: the fox ASSISTANT: a dog</s>",  # text right after </s>
    "USER: <image>\nwhat is the circle? ASSISTANT:",  # a newline right after an <image> placeholder
    "<image>the fox<dream>jumps <im_start>over",  # text right after special tokens, no space
    "end </s> x",  # a space right after a special token: upstream gives "▁▁x"
    " leading space, trailing space ",
    "a  b   c\n\nd",
    "héllo ☃ wörld",  # byte fallback
]


@pytest.fixture(scope="module")
def sp_model():
    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    # LLaMA's normalizer: identity, dummy prefix, extra whitespace kept
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_CORPUS * 20), model_writer=model, vocab_size=300, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
    )
    return model.getvalue()


def _llama_dir(path, model: bytes, legacy):
    path.mkdir()
    (path / "tokenizer.model").write_bytes(model)
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if legacy is not None:
        config["legacy"] = legacy
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def _reference_ids(sp, tok, text):
    """Upstream (transformers 4.35 slow LlamaTokenizer, legacy=True): BOS, then the text split at the special
    tokens, each special its id, each other piece `sp_model.encode(piece)` (with its own dummy prefix)."""
    import re

    specials = sorted({"<s>", "</s>", "<unk>", *tok.all_special_tokens}, key=len, reverse=True)
    ids = [1]
    for piece in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
        if piece in specials:
            ids.append(tok.convert_tokens_to_ids(piece))
        elif piece:
            ids += sp.encode(piece)
    return ids


@pytest.mark.parametrize("legacy", [True, False, None])
def test_sentencepiece_tokenization_is_upstreams(sp_model, legacy, tmp_path):
    """Whatever the tokenizer_config says and whatever transformers' default is, `load_tokenizer` gives the
    ids of sentencepiece itself, also right after </s> and <image>; saved to a workdir it reloads the same."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    tok = load_tokenizer(_llama_dir(tmp_path / "llama", sp_model, legacy))
    for text in SP_TEXTS:
        assert tok(text)["input_ids"] == _reference_ids(sp, tok, text), text
    tok.save_pretrained(str(tmp_path / "workdir_tokenizer"))
    reloaded = load_tokenizer(tmp_path / "workdir_tokenizer")
    assert len(reloaded) == len(tok) and SpecialIds.from_tokenizer(reloaded) == SpecialIds.from_tokenizer(tok)
    for text in SP_TEXTS:
        assert reloaded(text)["input_ids"] == tok(text)["input_ids"], text
