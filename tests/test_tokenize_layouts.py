"""Golden tests of the token layouts of spec section 3 and of the batch collation.

Blocks are small (N = 3 image tokens, Q = 2 dream queries) so every expected sequence is written out.
The word tokenizer's behaviour on every string used here is pinned in `test_tokenizer_on_tested_strings`.
"""

import io

import numpy as np
import pytest

from dreamjax.data.collate import collate, fit_sample
from dreamjax.data.documents import Conversation, ImageTextPair, InstructInterleavedDoc, InterleavedDoc
from dreamjax.data.tokenize import (
    IGNORE_INDEX,
    LayoutConfig,
    Reason,
    Skips,
    TokenizedSample,
    conversation_labels,
    tokenize,
    tokenize_conversation,
    tokenize_instruct_interleaved,
    tokenize_interleaved,
    tokenize_pair,
)
from dreamjax.data.tokenizer import (
    RELEASED_SPECIAL_TOKEN_ORDER,
    SpecialIds,
    add_dreamllm_special_tokens,
    build_word_tokenizer,
)

X = IGNORE_INDEX
N, Q = 3, 2  # image tokens, dream queries

WORDS = ["a red circle is on the blue square", "it big end what colour draw"]


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def s(tok):
    return SpecialIds.from_tokenizer(tok)


@pytest.fixture(scope="module")
def P(tok):
    """Ids of word pieces written out by hand: P("▁a", "▁red", ".")."""
    vocab = tok.get_vocab()
    return lambda *pieces: [vocab[p] for p in pieces]


def IMG(s):
    return [s.im_start] + [s.im_patch] * N + [s.im_end]


def DRM(s):
    return [s.dream_start] + [s.im_patch] * Q + [s.dream_end]


def IMG_LABELS():
    return [X] * (N + 2)


def DRM_LABELS(s):
    return [s.dream_start] + [X] * (Q + 1)  # only <dream_start> is a target


def cfg(mode="joint", max_length=2048):
    return LayoutConfig(num_image_tokens=N, num_dream_queries=Q, max_length=max_length, mode=mode)


SYSTEM_PIECES = (
    "▁A", "▁chat", "▁between", "▁a", "▁curious", "▁user", "▁and", "▁an", "▁artificial", "▁intelligence",
    "▁assistant", ".", "▁The", "▁assistant", "▁gives", "▁helpful", ",", "▁detailed", ",", "▁and", "▁polite",
    "▁answers", "▁to", "▁the", "▁user's", "▁questions", ".",
)


def test_tokenizer_on_tested_strings(tok, s, P):
    enc = lambda text: tok(text)["input_ids"]
    assert enc("a red circle.") == [s.bos] + P("▁a", "▁red", "▁circle", ".")
    assert enc("it is big.") == [s.bos] + P("▁it", "▁is", "▁big", ".")
    assert enc("the end.") == [s.bos] + P("▁the", "▁end", ".")
    assert enc("") == [s.bos]
    assert enc("<image>\nwhat is it?") == [s.bos, s.image] + P("▁", "\n", "what", "▁is", "▁it", "?")
    assert enc("USER: ") == [s.bos] + P("▁USER", ":", "▁")
    assert enc("red</s>USER: it") == [s.bos] + P("▁red") + [s.eos] + P("▁USER", ":", "▁it")
    assert len(SYSTEM_PIECES) == 27


# --- 3.1 pairs --------------------------------------------------------------------------------------------
def test_pair_i2t(tok, s, P):
    out = tokenize_pair(ImageTextPair("IMG0", "a red circle."), tok, cfg("comprehension_only"))
    assert out.ids == [s.bos] + IMG(s) + P("▁a", "▁red", "▁circle", ".") + [s.eos]
    assert out.labels == [s.bos] + IMG_LABELS() + P("▁a", "▁red", "▁circle", ".") + [s.eos]
    assert (out.images_in, out.images_out, out.kind) == (["IMG0"], [], "i2t")


def test_pair_t2i(tok, s, P):
    out = tokenize_pair(ImageTextPair("IMG0", "a red circle."), tok, cfg("creation_only"))
    assert out.ids == [s.bos] + P("▁a", "▁red", "▁circle", ".") + DRM(s) + [s.eos]
    assert out.labels == [X] * 10  # T2I pairs only train the diffusion loss
    assert (out.images_in, out.images_out, out.kind) == ([], ["IMG0"], "t2i")


def test_pair_caption_truncation(tok, s, P):
    skips = Skips()
    # I2T: caption max = 10 - 5 (IMG) - 1 (EOS) = 4 tokens counting BOS.
    long = ImageTextPair("I", "a red circle on a blue square.")
    out = tokenize_pair(long, tok, cfg("comprehension_only", 10), skips=skips)
    assert out.ids == [s.bos] + IMG(s) + P("▁a", "▁red", "▁circle") + [s.eos]
    # T2I: caption max = 8 - 4 (DRM) - 1 = 3 tokens counting BOS.
    out = tokenize_pair(long, tok, cfg("creation_only", 8), skips=skips)
    assert out.ids == [s.bos] + P("▁a", "▁red") + DRM(s) + [s.eos]
    assert skips[Reason.CAPTION_TRUNCATED] == 2


def test_pair_caption_limits_at_upstream_defaults(tok, s):
    """Defaults (N=256, Q=64, 2048): captions keep 1788 (I2T) / 1980 (T2I) tokens after BOS."""
    caption = " ".join(["red"] * 3000)
    for mode, block, kept in (("comprehension_only", 258, 1788), ("creation_only", 66, 1980)):
        out = tokenize_pair(ImageTextPair("I", caption), tok, LayoutConfig(mode=mode))
        assert len(out.ids) == 2048
        assert len(out.ids) - block - 2 == kept


def test_pair_joint_mode_uses_the_seeded_rng(tok):
    pair = ImageTextPair("I", "a red circle.")
    rng = np.random.default_rng(7)
    kinds = [tokenize_pair(pair, tok, cfg(), rng=rng).kind for _ in range(40)]
    reference = np.random.default_rng(7).random(40)
    assert kinds == ["i2t" if u >= 0.5 else "t2i" for u in reference]
    assert 10 < kinds.count("i2t") < 30
    rng = np.random.default_rng(7)
    assert [tokenize_pair(pair, tok, cfg(), rng=rng).kind for _ in range(40)] == kinds  # reproducible
    with pytest.raises(ValueError, match="Generator"):
        tokenize_pair(pair, tok, cfg())


def test_pair_corrupt_image_is_skipped_and_counted(tok):
    skips = Skips()
    bad = ImageTextPair("I", "a red circle.", corrupt=True)
    assert tokenize_pair(bad, tok, cfg("joint"), skips=skips) is None
    assert tokenize_pair(ImageTextPair(None, "a red circle."), tok, cfg("joint"), skips=skips) is None
    assert skips.as_dict() == {Reason.PAIR_CORRUPT_IMAGE: 2}


# --- 3.2 interleaved --------------------------------------------------------------------------------------
DOC = InterleavedDoc(
    text_list=[" a red circle. ", "it is big.", "the end."],
    images=[("B", 1), ("A", 0)],  # unsorted on purpose: A goes after sentence 0, B after sentence 1
)


def test_interleaved_comprehension_only(tok, s, P):
    out = tokenize_interleaved(DOC, tok, cfg("comprehension_only"))
    seg0, seg1, tail = P("▁a", "▁red", "▁circle", "."), P("▁it", "▁is", "▁big", "."), P("▁the", "▁end", ".")
    assert out.ids == [s.bos] + seg0 + IMG(s) + seg1 + IMG(s) + tail + [s.eos]
    assert out.labels == [s.bos] + seg0 + IMG_LABELS() + seg1 + IMG_LABELS() + tail + [s.eos]
    assert (out.images_in, out.images_out) == (["A", "B"], [])


def test_interleaved_creation_only(tok, s, P):
    out = tokenize_interleaved(DOC, tok, cfg("creation_only"))
    seg0, seg1, tail = P("▁a", "▁red", "▁circle", "."), P("▁it", "▁is", "▁big", "."), P("▁the", "▁end", ".")
    assert out.ids == [s.bos] + seg0 + DRM(s) + seg1 + DRM(s) + tail + [s.eos]
    assert out.labels == [s.bos] + seg0 + DRM_LABELS(s) + seg1 + DRM_LABELS(s) + tail + [s.eos]
    assert (out.images_in, out.images_out) == ([], ["A", "B"])


def test_interleaved_joint(tok, s, P):
    out = tokenize_interleaved(DOC, tok, cfg("joint"))
    seg0, seg1, tail = P("▁a", "▁red", "▁circle", "."), P("▁it", "▁is", "▁big", "."), P("▁the", "▁end", ".")
    blk, blk_labels = DRM(s) + IMG(s), DRM_LABELS(s) + IMG_LABELS()
    assert out.ids == [s.bos] + seg0 + blk + seg1 + blk + tail + [s.eos]
    assert out.labels == [s.bos] + seg0 + blk_labels + seg1 + blk_labels + tail + [s.eos]
    assert (out.images_in, out.images_out, out.kind) == (["A", "B"], ["A", "B"], "interleaved")


def test_interleaved_two_images_on_one_sentence(tok, s, P):
    # Stable sort by matched index: B(0), A(1), C(1) -> segments "a red circle.", "it is big.", "" , tail.
    doc = InterleavedDoc(["a red circle.", "it is big.", "the end."], [("A", 1), ("B", 0), ("C", 1)])
    out = tokenize_interleaved(doc, tok, cfg("comprehension_only"))
    assert out.ids == (
        [s.bos] + P("▁a", "▁red", "▁circle", ".") + IMG(s) + P("▁it", "▁is", "▁big", ".") + IMG(s)
        + IMG(s)  # the empty segment between the two images of sentence 1
        + P("▁the", "▁end", ".") + [s.eos]
    )
    assert out.images_in == ["B", "A", "C"]


def test_interleaved_truncation_at_an_image_block(tok, s, P):
    doc = InterleavedDoc(["a red circle.", "it is big."], [("A", 0), ("B", 1)])
    seg0, seg1 = P("▁a", "▁red", "▁circle", "."), P("▁it", "▁is", "▁big", ".")
    blk = DRM(s) + IMG(s)  # 9 tokens
    # After seg1 the body has 4 + 9 + 4 = 17 tokens; B's block needs 17 + 9 + 2 = 28 > 27: stop there.
    skips = Skips()
    out = tokenize_interleaved(doc, tok, cfg("joint", 27), skips=skips)
    assert out.ids == [s.bos] + seg0 + blk + seg1 + [s.eos]
    assert (out.images_in, out.images_out) == (["A"], ["A"])
    assert skips.as_dict() == {Reason.DOC_TRUNCATED: 1, Reason.IMAGES_DROPPED_BY_LENGTH: 1}
    # With 28 the block fits exactly (BOS + 26 + EOS).
    out = tokenize_interleaved(doc, tok, cfg("joint", 28))
    assert out.ids == [s.bos] + seg0 + blk + seg1 + blk + [s.eos] and len(out.ids) == 28
    # Truncation at a text segment: 13 + 4 + 2 > 18, so seg1 and everything after it are dropped.
    skips = Skips()
    out = tokenize_interleaved(doc, tok, cfg("joint", 18), skips=skips)
    assert out.ids == [s.bos] + seg0 + blk + [s.eos]
    assert skips.as_dict() == {Reason.DOC_TRUNCATED: 1, Reason.IMAGES_DROPPED_BY_LENGTH: 1}


def test_interleaved_corrupt_image_skips_both_uses(tok, s, P):
    doc = InterleavedDoc(["a red circle.", "it is big."], [("A", 0), ("B", 1)], corrupt=frozenset({0}))
    skips = Skips()
    out = tokenize_interleaved(doc, tok, cfg("joint"), skips=skips)
    assert out.ids == (
        [s.bos] + P("▁a", "▁red", "▁circle", ".") + P("▁it", "▁is", "▁big", ".") + DRM(s) + IMG(s) + [s.eos]
    )
    assert (out.images_in, out.images_out) == (["B"], ["B"])  # no CLIP input without its SD output
    assert skips.as_dict() == {Reason.CORRUPT_IMAGE: 1}
    # A missing (None) image counts the same way.
    out = tokenize_interleaved(InterleavedDoc(["a red circle."], [(None, 0)]), tok, cfg("joint"), skips=skips)
    assert out.ids == [s.bos] + P("▁a", "▁red", "▁circle", ".") + [s.eos]
    assert skips[Reason.CORRUPT_IMAGE] == 2


def test_interleaved_empty_and_stray_specials_are_counted(tok):
    skips = Skips()
    assert tokenize_interleaved(InterleavedDoc(["  "]), tok, cfg(), skips=skips) is None
    assert tokenize_interleaved(InterleavedDoc(["a <im_start> red"]), tok, cfg(), skips=skips) is None
    assert skips.as_dict() == {Reason.EMPTY_SAMPLE: 1, Reason.STRAY_SPECIAL_TOKEN: 1}


# --- 3.3 conversations ------------------------------------------------------------------------------------
def test_conversation_with_image(tok, s, P):
    conv = Conversation(
        turns=[("human", "<image>\nwhat is it?"), ("gpt", "a red circle."), ("human", "what colour is it?"),
               ("gpt", "red.")],
        images=["X"],
    )
    skips = Skips()
    out = tokenize_conversation(conv, tok, cfg(), skips=skips)
    user1 = P(*SYSTEM_PIECES, "▁USER", ":", "▁")
    user1b = P("▁", "\n", "what", "▁is", "▁it", "?", "▁ASSISTANT", ":")
    answer1 = P("▁a", "▁red", "▁circle", ".") + [s.eos]
    user2 = P("▁USER", ":", "▁what", "▁colour", "▁is", "▁it", "?", "▁ASSISTANT", ":")
    answer2 = P("▁red", ".") + [s.eos]
    assert out.ids == [s.bos] + user1 + IMG(s) + user1b + answer1 + user2 + answer2
    assert out.labels == (
        [X] + [X] * len(user1) + IMG_LABELS() + [X] * len(user1b) + answer1 + [X] * len(user2) + answer2
    )
    assert (out.images_in, out.images_out, out.kind) == (["X"], [], "conversation")
    assert skips.total() == 0


def test_conversation_with_dream(tok, s, P):
    conv = Conversation([("user", "draw a red circle."), ("assistant", "a red circle: <dream>")], ["Y"])
    out = tokenize_conversation(conv, tok, cfg())
    user = P(*SYSTEM_PIECES, "▁USER", ":", "▁draw", "▁a", "▁red", "▁circle", ".", "▁ASSISTANT", ":")
    answer = P("▁a", "▁red", "▁circle", ":", "▁")
    assert out.ids == [s.bos] + user + answer + DRM(s) + IMG(s) + [s.eos]
    # Every inserted position is -100, including <dream_start>.
    assert out.labels == [X] * (1 + len(user)) + answer + [X] * (Q + 2 + N + 2) + [s.eos]
    assert (out.images_in, out.images_out) == (["Y"], ["Y"])


def test_conversation_truncation_drops_the_crossing_block(tok, s, P):
    conv = Conversation([("user", "<image>\nwhat is it?"), ("assistant", "a red circle.")], ["X"])
    prefix = [s.bos] + P(*SYSTEM_PIECES, "▁USER", ":", "▁")  # 31 tokens, then IMG (5)
    assert len(prefix) == 31
    skips = Skips()
    out = tokenize_conversation(conv, tok, cfg(max_length=35), skips=skips)
    assert out.ids == prefix and out.images_in == []  # block dropped whole, nothing after it
    assert skips.as_dict() == {Reason.CONV_TRUNCATED: 1}
    # A block ending exactly at max_length is kept, and nothing after it (upstream lets text through).
    out = tokenize_conversation(conv, tok, cfg(max_length=36), skips=skips)
    assert out.ids == prefix + IMG(s) and out.images_in == ["X"]
    # The same for DRM + IMG: 31 + 9 > 39.
    conv = Conversation([("user", "<dream> it"), ("assistant", "red")], ["Y"])
    out = tokenize_conversation(conv, tok, cfg(max_length=39), skips=skips)
    assert out.ids == prefix and (out.images_in, out.images_out) == ([], [])
    assert skips[Reason.CONV_TRUNCATED] == 3


def test_conversation_image_problems_are_counted(tok, s):
    skips = Skips()
    two = [("user", "<image> <image>"), ("assistant", "red")]
    assert tokenize_conversation(Conversation(two, ["X"]), tok, cfg(), skips=skips) is None
    corrupt_second = Conversation(two, ["X", "Y"], corrupt=frozenset({1}))
    assert tokenize_conversation(corrupt_second, tok, cfg(), skips=skips) is None
    one = Conversation([("user", "<image>"), ("assistant", "red")], ["X", "Y"])
    out = tokenize_conversation(one, tok, cfg(), skips=skips)
    assert out.images_in == ["X"]
    assert skips.as_dict() == {
        Reason.CONV_MISSING_IMAGE: 1, Reason.CONV_CORRUPT_IMAGE: 1, Reason.CONV_UNUSED_IMAGES: 1
    }
    # A leading assistant turn is dropped (as upstream), and so is the image of its placeholder.
    turns = [("gpt", "<image> hi"), ("human", "<image>\nwhat is it?"), ("gpt", "red.")]
    lead = Conversation(turns, ["X0", "X1"])
    out = tokenize_conversation(lead, tok, cfg(), skips=skips)
    assert out.images_in == ["X1"] and out.ids.count(s.im_start) == 1
    assert skips[Reason.CONV_UNUSED_IMAGES] == 2
    total = Skips()
    total.merge(skips)
    total.merge({Reason.CONV_MISSING_IMAGE: 2})
    assert total[Reason.CONV_MISSING_IMAGE] == 3 and total.total() == skips.total() + 2


def test_conversation_mask_mismatch_is_counted_and_tail_masked(tok, s, P):
    # Ends with a user turn: the "-2" walk stops early; the unmatched tail gets no loss (as LLaVA does).
    skips = Skips()
    conv = Conversation([("user", "what is it?"), ("assistant", "red."), ("user", "it is big.")])
    out = tokenize_conversation(conv, tok, cfg(), skips=skips)
    tail = P("▁USER", ":", "▁it", "▁is", "▁big", ".", "▁")
    assert out.ids[-len(tail):] == tail and out.labels[-len(tail):] == [X] * len(tail)
    assert out.labels[-len(tail) - 3:-len(tail)] == P("▁red", ".") + [s.eos]
    assert skips.as_dict() == {Reason.CONV_MASK_MISMATCH: 1}


def test_conversation_labels_with_a_sentencepiece_llama_tokenizer(tmp_path):
    """The "-2" rule with a real (tiny) LLaMA SentencePiece tokenizer in legacy mode: exactly the answers
    and their "</s>" are supervised."""
    spm = pytest.importorskip("sentencepiece")
    from transformers import LlamaTokenizer

    corpus = ["A chat between a curious user and an artificial intelligence assistant.",
              "USER: what colour is the circle? ASSISTANT: the circle is red.",
              "USER: is it big? ASSISTANT: yes, it is big."] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    sp_tok = LlamaTokenizer.from_pretrained(
        str(tmp_path), legacy=True, add_bos_token=True, local_files_only=True
    )
    add_dreamllm_special_tokens(sp_tok)
    s = SpecialIds.from_tokenizer(sp_tok)
    pieces = lambda text: sp_tok.convert_ids_to_tokens(sp_tok(text, add_special_tokens=False)["input_ids"])
    assert pieces("USER: hi ASSISTANT: ")[-2:] == [":", "▁"]  # the lone "▁" the -2 rule accounts for

    answers = ["the circle is red.", "yes, it is big."]
    conv = Conversation([("user", "<image>\nwhat colour is the circle?"), ("assistant", answers[0]),
                         ("user", "is it big?"), ("assistant", answers[1])], ["X"])
    skips = Skips()
    out = tokenize_conversation(conv, sp_tok, cfg(), skips=skips)
    assert skips.total() == 0
    supervised = [t for t, lab in zip(out.ids, out.labels) if lab != X]
    answer_ids = [sp_tok(a, add_special_tokens=False)["input_ids"] + [s.eos] for a in answers]
    assert supervised == answer_ids[0] + answer_ids[1]
    assert all(lab in (X, t) for t, lab in zip(out.ids, out.labels))
    # Each answer's first token directly follows "ASSISTANT:".
    toks = sp_tok.convert_ids_to_tokens(out.ids)
    first = [i for i, lab in enumerate(out.labels) if lab != X and (out.labels[i - 1] == X)]
    assert [toks[i - 1] for i in first] == [":", ":"]


def test_conversation_labels_function_directly(tok, s):
    prompt = "sys USER: what ASSISTANT: red</s>"
    ids = tok(prompt)["input_ids"]
    labels, agree = conversation_labels(prompt, ids, tok, cfg().template, s.bos)
    assert agree
    assert [lab for lab in labels if lab != X] == tok("red", add_special_tokens=False)["input_ids"] + [s.eos]


# --- 3.4 instruction-following interleaved -----------------------------------------------------------------
def test_instruct_interleaved(tok, s, P):
    doc = InstructInterleavedDoc("draw a red circle.", ["a red circle.", "the end."], [("A", 0)])
    out = tokenize_instruct_interleaved(doc, tok, cfg("joint"))
    instruction = P("▁USER", ":", "▁draw", "▁a", "▁red", "▁circle", ".", "▁ASSISTANT", ":")
    prompt = [s.bos] + P(*SYSTEM_PIECES) + instruction
    seg0, tail = P("▁a", "▁red", "▁circle", "."), P("▁the", "▁end", ".")
    assert out.ids == prompt + seg0 + DRM(s) + IMG(s) + tail + [s.eos]
    assert out.labels == [X] * len(prompt) + seg0 + DRM_LABELS(s) + IMG_LABELS() + tail + [s.eos]
    assert (out.images_in, out.images_out, out.kind) == (["A"], ["A"], "instruct_interleaved")
    # The "+2" check with BOS already in the ids: the effective maximum is max_length - 1.
    full = len(out.ids)
    assert tokenize_instruct_interleaved(doc, tok, cfg("joint", full + 1)).ids == out.ids
    skips = Skips()
    cut = tokenize_instruct_interleaved(doc, tok, cfg("joint", full), skips=skips)
    assert cut.ids == prompt + seg0 + DRM(s) + IMG(s) + [s.eos]
    assert skips.as_dict() == {Reason.DOC_TRUNCATED: 1}
    assert tokenize_instruct_interleaved(doc, tok, cfg("joint", 20), skips=skips) is None
    assert skips[Reason.INSTRUCTION_TOO_LONG] == 1


# --- dispatch, ids from the tokenizer ----------------------------------------------------------------------
def test_dispatch_and_released_order_ids(s):
    rel = build_word_tokenizer(WORDS, special_tokens_order=RELEASED_SPECIAL_TOKEN_ORDER)
    r = SpecialIds.from_tokenizer(rel)
    assert r.im_start != s.im_start  # the layouts must follow the tokenizer, not a fixed table
    out = tokenize(InterleavedDoc(["a red circle."], [("A", 0)]), rel, cfg("joint"))
    vocab = rel.get_vocab()
    seg = [vocab[p] for p in ("▁a", "▁red", "▁circle", ".")]
    blk = [r.dream_start] + [r.im_patch] * Q + [r.dream_end] + [r.im_start] + [r.im_patch] * N + [r.im_end]
    assert out.ids == [r.bos] + seg + blk + [r.eos]
    with pytest.raises(TypeError, match="no token layout"):
        tokenize("not a record", rel, cfg())
    with pytest.raises(ValueError, match="mode"):
        LayoutConfig(mode="both")


def test_record_helpers():
    conv = Conversation.from_llava({"image": "a.jpg", "conversations": [
        {"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "red <dream>"}]})
    assert conv.images == ["a.jpg", "a.jpg"] and conv.turns[0] == ("human", "<image>\nwhat?")
    conv = Conversation.from_llava({"conversations": [
        {"from": "human", "value": "<image> and <image>", "modal_info": {"<image>": ["image", ["p1", "p2"]]}},
        {"from": "gpt", "value": "ok"}]})
    assert conv.images == ["p1", "p2"]
    doc = InterleavedDoc.from_mmc4({"text_list": ["a", "b"], "image_info": [
        {"image_name": "x.png", "matched_text_index": 1, "matched_sim": 0.3}]})
    assert doc.images == [("x.jpg", 1)]  # spec 3.2: the tar member name (stem before the first dot + .jpg)


# --- collation ---------------------------------------------------------------------------------------------
def test_collate_shapes_padding_and_masks(tok, s, P):
    i2t = tokenize_pair(ImageTextPair("P", "a red circle."), tok, cfg("comprehension_only"))  # 11 tokens
    t2i = tokenize_pair(ImageTextPair("Q", "a red circle."), tok, cfg("creation_only"))  # 10 tokens
    doc = tokenize_interleaved(
        InterleavedDoc(["a red circle.", "it is big."], [("A", 0), ("B", 1)]), tok, cfg("joint")
    )  # [BOS] seg0(4) BLK(9) seg1(4) BLK(9) [EOS] = 28 tokens, 2 images in, 2 out
    load_in = lambda ref: np.full((2, 2, 3), ord(ref), np.float32)
    load_out = lambda ref: np.full((4, 4, 3), -ord(ref), np.float32)
    skips = Skips()
    batch = collate([i2t, t2i, doc], 24, 1, 2, specials=s, load_in=load_in, load_out=load_out,
                    in_shape=(2, 2, 3), out_shape=(4, 4, 3), skips=skips)

    assert batch["tokens"].shape == batch["labels"].shape == (3, 24)
    assert batch["tokens"].dtype == np.int32 and batch["labels"].dtype == np.int32
    assert batch["images_in"].shape == (3, 1, 2, 2, 3) and batch["images_out"].shape == (3, 2, 4, 4, 3)
    assert batch["tokens"][0].tolist() == i2t.ids + [s.pad] * 13
    assert batch["labels"][0].tolist() == i2t.labels + [X] * 13
    assert batch["segment_ids"][0].tolist() == [1] * 11 + [0] * 13
    assert batch["tokens"][1].tolist() == t2i.ids + [s.pad] * 14
    assert (batch["positions"] == np.arange(24)[None]).all()
    # The document has two DRM+IMG units but only one input image fits: cut before the second unit.
    seg0, seg1 = P("▁a", "▁red", "▁circle", "."), P("▁it", "▁is", "▁big", ".")
    kept = [s.bos] + seg0 + DRM(s) + IMG(s) + seg1
    assert batch["tokens"][2].tolist() == kept + [s.pad] * (24 - len(kept))
    assert batch["segment_ids"][2].sum() == len(kept) == 18
    assert batch["images_in_mask"].tolist() == [[True], [False], [True]]
    assert batch["images_out_mask"].tolist() == [[False, False], [True, False], [True, False]]
    assert batch["images_in"][0, 0, 0, 0, 0] == ord("P") and batch["images_in"][2, 0, 0, 0, 0] == ord("A")
    assert not batch["images_in"][1].any()  # absent: zeros
    assert batch["images_out"][1, 0, 0, 0, 0] == -ord("Q") and not batch["images_out"][1, 1].any()
    assert skips.as_dict() == {
        Reason.BATCH_TRUNCATED: 1, Reason.BATCH_IMAGES_IN_DROPPED: 1, Reason.BATCH_IMAGES_OUT_DROPPED: 1
    }


def test_fit_sample_length_cut_and_alignment_check(tok, s):
    doc = tokenize_interleaved(InterleavedDoc(["a red circle.", "it is big."], [("A", 0), ("B", 1)]), tok,
                               cfg("joint"))
    skips = Skips()
    # 15 tokens: the first unit ends at 14 (BOS + 4 + 9), the next token fits; the rest does not.
    cut = fit_sample(doc, 15, 4, 4, s, skips)
    assert cut.ids == doc.ids[:15] and cut.labels == doc.labels[:15] and cut.images_in == ["A"]
    # 10 tokens: the first unit would cross: cut before it, no images.
    cut = fit_sample(doc, 10, 4, 4, s, skips)
    assert cut.ids == doc.ids[:5] and (cut.images_in, cut.images_out) == ([], [])
    assert skips[Reason.BATCH_IMAGES_IN_DROPPED] == 3
    assert fit_sample(doc, 100, 4, 4, s) is doc
    bad = TokenizedSample(doc.ids, doc.labels, images_in=["A"], images_out=["A", "B"])
    with pytest.raises(ValueError, match="<im_start>"):
        collate([bad], 64, 4, 4, specials=s)
    batch = collate([doc], 64, 2, 2, specials=s)
    assert "images_in" not in batch and batch["images_in_mask"].tolist() == [[True, True]]
