"""dreamjax.data.synthetic (the shapes world) and dreamjax.eval.color (the colour metric)."""

import pickle

import numpy as np
import pytest

from dreamjax.data.documents import Conversation, ImageTextPair, InstructInterleavedDoc, InterleavedDoc
from dreamjax.data.images import decode_image
from dreamjax.data.synthetic import (
    BACKGROUNDS,
    CENTRE_ONLY_SIZES,
    COLORS,
    DEFAULT_SIZES,
    KINDS,
    PLACEHOLDERS,
    POSITIONS,
    PUNCTUATION,
    SHAPES,
    SIZES,
    ShapeSpec,
    ShapesWorld,
    caption,
    render,
    world_from_config,
)
from dreamjax.data.tokenizer import split_words
from dreamjax.eval.color import NO_COLOR, color_accuracy, dominant_color


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(seed=3, resolution=32)


def _raw(world, kind, split, n, **kw):
    return getattr(world, kind)(split, n, format="raw", **kw)


def _texts(rec):
    """Every string of a raw record."""
    if "caption" in rec:
        return [rec["caption"]]
    if "conversations" in rec:
        return [t["value"] for t in rec["conversations"]]
    return list(rec["text_list"]) + ([rec["instruction"]] if "instruction" in rec else [])


def _images(rec):
    return rec["images"] if "images" in rec else [rec["image"]]


def _scenes(rec):
    return rec["specs"] if "images" in rec else [rec["specs"]]


# ---------------------------------------------------------------------------------------------------------
# Rendering


@pytest.mark.parametrize("res", [32, 64])
def test_render_pixels_and_geometry(res):
    area = {}
    for shape in SHAPES:
        for size in SIZES:
            for pos, (cx, cy) in POSITIONS.items():
                if size in CENTRE_ONLY_SIZES and pos != "center":
                    continue
                spec = ShapeSpec("red", shape, pos, size, "gray")
                img = render(spec, res)
                assert img.shape == (res, res, 3) and img.dtype == np.uint8
                is_shape = (img == COLORS["red"]).all(-1)
                is_bg = (img == BACKGROUNDS["gray"]).all(-1)
                assert (is_shape | is_bg).all()  # only the two colours, no anti-aliasing
                ys, xs = np.nonzero(is_shape)
                # the shape's bounding box is centred on its position (within a pixel) and inside the image
                assert abs((xs.min() + xs.max() + 1) / 2 / res - cx) < 1.5 / res
                assert abs((ys.min() + ys.max() + 1) / 2 / res - cy) < 1.5 / res
                area[shape, size, pos] = is_shape.mean()
    for shape in SHAPES:
        assert area[shape, "large", "center"] > 2.5 * area[shape, "small", "center"]
        assert 0.25 < area[shape, "huge", "center"] < 0.5  # the demo world: shapes that fill the frame
    # the three shapes are different pictures
    imgs = [render(ShapeSpec("red", s), res) for s in SHAPES]
    assert not np.array_equal(imgs[0], imgs[1]) and not np.array_equal(imgs[1], imgs[2])


def test_two_shape_scene_and_validation():
    a = ShapeSpec("red", "circle", "left", "large", "black")
    b = ShapeSpec("blue", "square", "right", "large", "black")
    img = render((a, b), 32)
    assert (img[:, :16] == COLORS["red"]).all(-1).any() and (img[:, 16:] == COLORS["blue"]).all(-1).any()
    assert not (img[:, :16] == COLORS["blue"]).all(-1).any()  # opposite positions never overlap
    assert caption((a, b)).startswith("a large red circle on the left and a large blue square on the right")
    with pytest.raises(ValueError, match="background"):
        render((a, ShapeSpec("blue", "square", "right", "large", "white")), 32)
    with pytest.raises(ValueError, match="unknown color"):
        ShapeSpec("white", "circle")  # backgrounds are not shape colours
    with pytest.raises(ValueError, match="unknown shape"):
        ShapeSpec("red", "hexagon")


# ---------------------------------------------------------------------------------------------------------
# Determinism and splits


def test_same_seed_same_data_any_access_order():
    w1, w2, w3 = ShapesWorld(seed=7, resolution=32), ShapesWorld(seed=7, resolution=32), ShapesWorld(8, 32)
    for kind in KINDS:
        s1, s2, s3 = (_raw(w, kind, "train", 20) for w in (w1, w2, w3))
        order = list(range(20))[::-1]
        got1 = [s1[i] for i in range(20)]
        got2 = {i: s2[i] for i in order}  # reverse order: records don't depend on access order
        differs = 0
        for i in range(20):
            assert _texts(got1[i]) == _texts(got2[i]), kind
            assert _scenes(got1[i]) == _scenes(got2[i])
            for a, b in zip(_images(got1[i]), _images(got2[i]), strict=True):
                np.testing.assert_array_equal(a, b)
            differs += _texts(got1[i]) != _texts(s3[i])
        assert differs > 10, f"{kind}: another seed should give other records"
    assert pickle.loads(pickle.dumps(s1))[3]["id"] == s1[3]["id"]  # sources pickle (Grain workers)


def test_splits_are_disjoint_and_respected(world):
    train, held = set(world.specs("train")), set(world.specs("heldout"))
    n_all = len(COLORS) * len(SHAPES) * len(POSITIONS) * len(DEFAULT_SIZES) * len(BACKGROUNDS)
    assert not train & held and len(train | held) == n_all
    assert 0.1 < len(held) / n_all < 0.3
    for field, values in (("color", COLORS), ("shape", SHAPES), ("position", POSITIONS),
                          ("size", DEFAULT_SIZES), ("background", BACKGROUNDS)):
        assert {getattr(s, field) for s in train} == set(values)  # every attribute value is trainable
    assert set(ShapesWorld(seed=99, resolution=64).specs("heldout")) == held  # split does not depend on seed
    for split, allowed in (("train", train), ("heldout", held)):
        for kind in KINDS:
            src = _raw(world, kind, split, 40, **({"multi_prob": 0.5} if kind != "conversations" else {}))
            for i in range(len(src)):
                for scene in _scenes(src[i]):
                    assert set(scene) <= allowed, (kind, split, scene)
    with pytest.raises(ValueError, match="split"):
        world.pairs("test", 3)


# ---------------------------------------------------------------------------------------------------------
# Text


def test_vocabulary_covers_every_generated_word():
    for w in (ShapesWorld(seed=0, resolution=32),
              ShapesWorld(seed=1, resolution=32, colors=("red", "orange"), shapes=("circle",),
                          doc_images=(1, 2))):
        vocab = set(w.vocabulary())
        seen = set()
        for kind in KINDS:
            for split in ("train", "heldout"):
                src = _raw(w, kind, split, 150)
                for i in range(len(src)):
                    for text in _texts(src[i]):
                        for tok in split_words(text):
                            if tok.isalpha():
                                assert tok in vocab, (tok, text)
                                seen.add(tok)
                            else:
                                assert tok in PUNCTUATION or tok in PLACEHOLDERS, (tok, text)
        assert len(seen) >= 0.9 * len(vocab), sorted(vocab - seen)  # and the vocabulary is not padded
    assert "orange" not in ShapesWorld(0, 32, colors=("red", "blue")).vocabulary()


def test_attribute_subsets_and_world_from_config():
    """A smaller world (the demo's): every spec, scene and word stays inside the chosen subsets."""
    w = ShapesWorld(seed=0, resolution=32, positions=("center",), sizes=("huge",), backgrounds=("white", "gray"))
    specs = w.specs("train") + w.specs("heldout")
    assert len(specs) == len(COLORS) * len(SHAPES) * 2
    assert {(s.position, s.size) for s in specs} == {("center", "huge")}
    assert "left" not in w.vocabulary() and "huge" in w.vocabulary()
    assert "huge" not in ShapesWorld(0, 32).vocabulary()  # the default world keeps small and large shapes
    for i in range(20):  # no opposite positions: two-shape scenes fall back to one shape
        assert len(w.record("documents", "train", i, format="raw", multi_prob=1.0)["specs"][0]) == 1
    data = {"seed": 0, "resolution_out": 16, "world": {"positions": ["center"], "sizes": ["large"]}}
    assert {s.position for s in world_from_config(data).specs("train")} == {"center"}
    assert world_from_config({"seed": 0, "resolution_out": 16, "world": None}).positions == tuple(POSITIONS)
    with pytest.raises(ValueError, match="unknown keys"):
        world_from_config({**data, "world": {"position": ["center"]}})
    with pytest.raises(ValueError, match="sizes must not be empty"):
        ShapesWorld(0, 32, sizes=())
    with pytest.raises(ValueError, match="fit only at position 'center'"):
        ShapesWorld(0, 32, sizes=("large", "huge"))  # huge shapes at the side would leave the frame


def test_word_tokenizer_has_no_unknowns(world):
    """Integration with the word tokenizer of data/tokenizer.py (skipped if that module is absent)."""
    tokmod = pytest.importorskip("dreamjax.data.tokenizer")
    tok = tokmod.build_word_tokenizer(world.vocabulary(), include_template_words=False)
    for kind in KINDS:
        src = _raw(world, kind, "train", 30)
        for i in range(len(src)):
            for text in _texts(src[i]):
                assert tok.unk_token_id not in tok(text)["input_ids"], text


def test_text_matches_the_image(world):
    for rec in _raw(world, "pairs", "train", 50, multi_prob=0.3):
        for s in rec["specs"]:
            assert s.color in rec["caption"] and s.shape in rec["caption"] and s.background in rec["caption"]
    n_create = 0
    for rec in _raw(world, "conversations", "train", 100):
        (s,) = rec["specs"]
        turns = rec["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        if turns[1]["value"] == "<dream>":  # creation: the prompt names the colour and shape drawn
            n_create += 1
            assert len(turns) == 2 and s.color in turns[0]["value"] and s.shape in turns[0]["value"]
            continue
        assert turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1
        for q, a in zip(turns[::2], turns[1::2]):
            q, a = q["value"].removeprefix("<image>\n"), a["value"]
            if q.startswith(("What color is the shape", "What is the color of", "Which color")):
                assert a == f"{s.color}."
            elif q in ("Is the shape small or large?", "How big is the shape?"):
                assert a == f"{s.size}."
            elif q.startswith("Is the shape "):
                assert a == ("yes." if q == f"Is the shape {s.color}?" else "no.")
            elif q.startswith("Is "):
                assert a == ("yes." if f" {s.shape}" in q else "no.")
            elif "background" in q:
                assert a == f"{s.background}."
            elif q.startswith("Where"):
                assert a.startswith(("on the", "at the", "in the")) and a.endswith(".")
    assert 25 < n_create < 75


def test_documents_structure(world):
    for kind in ("documents", "instruct_documents"):
        for rec in _raw(world, kind, "train", 30, multi_prob=0.5):
            idx = [info["matched_text_index"] for info in rec["image_info"]]
            assert idx == sorted(set(idx)) and 0 < idx[0] and idx[-1] < len(rec["text_list"])
            assert 2 <= len(idx) <= 4 and len(rec["images"]) == len(idx) == len(rec["specs"])
            for i, scene in zip(idx, rec["specs"]):
                sentence = rec["text_list"][i]
                assert all(s.color in sentence and s.shape in sentence for s in scene), sentence
            assert ("instruction" in rec) == (kind == "instruct_documents")


def test_typed_records_and_png_format():
    w = ShapesWorld(seed=0, resolution=32, image_format="png")
    pair = w.pairs("train", 4)[0]
    assert isinstance(pair, ImageTextPair) and isinstance(pair.image, bytes)
    raw = w.pairs("train", 4, format="raw")[0]
    np.testing.assert_array_equal(decode_image(pair.image), render(raw["specs"], 32))
    conv = w.conversations("train", 4)[1]
    assert isinstance(conv, Conversation) and len(conv.images) == 1
    doc = w.documents("train", 4)[2]
    assert isinstance(doc, InterleavedDoc) and all(0 < i < len(doc.text_list) for _, i in doc.images)
    assert isinstance(w.instruct_documents("train", 4)[3], InstructInterleavedDoc)


def test_grain_map_dataset(world):
    grain = pytest.importorskip("grain")
    src = world.pairs("train", 64)
    ds = grain.MapDataset.source(src).shuffle(seed=5).map(lambda r: r.caption)
    first = [ds[i] for i in range(8)]
    assert first == [ds[i] for i in range(8)] and len(ds) == 64
    assert sorted(ds[i] for i in range(64)) == sorted(src[i].caption for i in range(64))
    with pytest.raises(IndexError):
        src[64]


# ---------------------------------------------------------------------------------------------------------
# Colour metric


@pytest.mark.parametrize("res", [32, 64])
def test_color_metric_exact_on_clean_renders(world, res):
    specs = world.specs("train") + world.specs("heldout")  # every spec of the world
    imgs = [render(s, res) for s in specs]
    assert color_accuracy(imgs, [s.color for s in specs]) == 1.0
    assert all(dominant_color(im, background=s.background) == s.color for im, s in zip(imgs[::7], specs[::7]))


def test_color_metric_noisy_renders(world):
    rng = np.random.default_rng(0)
    specs = world.specs("train") + world.specs("heldout")
    imgs, asked = [], []
    for s in specs:  # strong Gaussian noise (sigma 40) plus a global colour shift of up to +-20 per channel
        noise = rng.normal(0, 40, (32, 32, 3)) + rng.uniform(-20, 20, 3)
        imgs.append(np.clip(render(s, 32) + noise, 0, 255).astype(np.uint8))
        asked.append(s.color)
    assert color_accuracy(imgs, asked) >= 0.99  # measured 1.0
    # without the neighbour filter, per-pixel noise votes overwhelm small shapes
    assert color_accuracy(imgs, asked, min_neighbors=0) < 0.95


def test_color_metric_sanity():
    blank = np.full((32, 32, 3), 128, np.uint8)
    assert dominant_color(blank) == NO_COLOR
    big = ShapeSpec("green", "circle", "left", "large", "white")
    small = ShapeSpec("pink", "square", "right", "small", "white")
    assert dominant_color(render((big, small), 64)) == "green"  # the larger shape dominates
    img = render(ShapeSpec("blue", "square", "center", "large", "black"), 32)
    assert color_accuracy([img, img], ["blue", "red"]) == 0.5
    assert dominant_color(img, palette=["red", "purple"]) == "purple"  # nearest of a restricted palette
    with pytest.raises(ValueError):
        color_accuracy([img], ["blue", "red"])
    with pytest.raises(TypeError, match="uint8"):
        dominant_color(img.astype(np.float32))
