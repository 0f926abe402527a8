"""The fast image paths of dreamjax.data.images and the pipeline (issue 11): reduced-scale JPEG decoding
(`decode_pil(draft_side=...)`) and crop-window resizing (`window=True`) stay close to the exact path, and
with both off (`PipelineConfig.jpeg_draft=False`) the outputs are exactly the reference arithmetic's."""

import io

import numpy as np
import pytest
from PIL import Image

from dreamjax.data.documents import ImageTextPair
from dreamjax.data.images import (
    CLIP_MEAN,
    CLIP_STD,
    DRAFT_INFO,
    clip_preprocess,
    decode_pil,
    diffusion_preprocess,
    shortest_edge_size,
)
from dreamjax.data.pipeline import SKIPS_KEY, PipelineConfig, make_dataset
from dreamjax.data.tokenize import LayoutConfig
from dreamjax.data.tokenizer import build_word_tokenizer

CLIP_LEVEL = 1 / (255 * np.asarray(CLIP_STD, np.float32))  # one uint8 level, in CLIP-normalised units
DIFF_LEVEL = 2 / 255  # one uint8 level in [-1, 1]


def _photo(h, w, seed=0, noise=6.0):
    """Photo-like pixels: smooth colour gradients plus mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        fx, fy, phase = rng.uniform(0.005, 0.03, 2).tolist() + [rng.uniform(0, 6.28)]
        img[..., c] = 127 + 90 * np.sin(xx * fx + phase) * np.cos(yy * fy)
    img += rng.normal(0, noise, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(img, **kw):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def _reference_clip(pic: Image.Image, size: int) -> np.ndarray:
    """transformers' PIL CLIPImageProcessor steps, written out (the pre-issue-11 implementation)."""
    w, h = pic.size
    new_h, new_w = shortest_edge_size(h, w, size)
    if (new_h, new_w) != (h, w):
        pic = pic.resize((new_w, new_h), Image.Resampling.BICUBIC)
    arr = np.asarray(pic)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    arr = arr[top: top + size, left: left + size]
    x = (arr.astype(np.float64) * (1.0 / 255.0)).astype(np.float32)
    return (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def _reference_diffusion(pic: Image.Image, size: int, flip: bool) -> np.ndarray:
    """torchvision Resize(bilinear) / CenterCrop / flip / ToTensor / Normalize(0.5, 0.5), written out."""
    w, h = pic.size
    new_h, new_w = shortest_edge_size(h, w, size)
    if (new_h, new_w) != (h, w):
        pic = pic.resize((new_w, new_h), Image.Resampling.BILINEAR)
    arr = np.asarray(pic)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    arr = arr[top: top + size, left: left + size]
    if flip:
        arr = arr[:, ::-1]
    x = arr.astype(np.float32) / np.float32(255.0)
    return (x - np.float32(0.5)) / np.float32(0.5)


SHAPES = [(300, 200), (200, 300), (97, 64), (64, 64), (65, 66), (37, 129), (130, 131)]


@pytest.mark.parametrize("shape", SHAPES)
def test_exact_path_is_the_reference_arithmetic(shape):
    img = _photo(*shape, seed=shape[0])
    pic = decode_pil(_jpeg(img))
    for src in (pic, np.asarray(pic)):  # PIL and numpy inputs
        np.testing.assert_array_equal(clip_preprocess(src, 64), _reference_clip(pic, 64))
        np.testing.assert_array_equal(diffusion_preprocess(src, 48, random_flip=False),
                                      _reference_diffusion(pic, 48, flip=False))
        for seed in range(3):
            flip = np.random.default_rng(seed).random() < 0.5
            np.testing.assert_array_equal(diffusion_preprocess(src, 48, rng=seed),
                                          _reference_diffusion(pic, 48, flip=flip))


@pytest.mark.parametrize("shape", SHAPES)
def test_window_resize_is_within_one_level(shape):
    pic = Image.fromarray(_photo(*shape, seed=shape[1], noise=20.0))
    for size in (32, 64):
        a, b = clip_preprocess(pic, size, window=True), clip_preprocess(pic, size)
        assert a.shape == b.shape == (size, size, 3)
        assert (np.abs(a - b) <= CLIP_LEVEL * 1.001).all()
        a, b = diffusion_preprocess(pic, size, rng=1, window=True), diffusion_preprocess(pic, size, rng=1)
        assert a.shape == b.shape == (size, size, 3)
        assert np.abs(a - b).max() <= DIFF_LEVEL * 1.001


def test_draft_decode_scale_and_fallbacks():
    img = _photo(1100, 1300)
    data = _jpeg(img)
    full = decode_pil(data)
    assert full.size == (1300, 1100) and DRAFT_INFO not in full.info
    half = decode_pil(data, draft_side=512)  # 1100 // 512 = 2: scale 1/2
    assert half.size == (650, 550) and half.info[DRAFT_INFO] == (1300, 1100, 2)
    eighth = decode_pil(data, draft_side=100)  # 1100 // 100 = 11: scale 1/8, rounded up
    assert eighth.size == (163, 138) and eighth.info[DRAFT_INFO] == (1300, 1100, 8)
    # less than twice the side: a full decode, the same pixels
    for side in (600, 1100, 4000):
        same = decode_pil(data, draft_side=side)
        assert DRAFT_INFO not in same.info
        np.testing.assert_array_equal(np.asarray(same), np.asarray(full))
    # not a JPEG: never drafted
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    assert DRAFT_INFO not in decode_pil(buf.getvalue(), draft_side=100).info
    # grayscale JPEG: drafted, then RGB
    gray = decode_pil(_jpeg(img[:, :, 0]), draft_side=256)
    assert gray.mode == "RGB" and gray.size == (325, 275) and gray.info[DRAFT_INFO] == (1300, 1100, 4)


@pytest.mark.parametrize("shape,side", [((1100, 1300), 512), ((1300, 1030), 512), ((700, 900), 224),
                                        ((2000, 1500), 224)])
def test_draft_decode_preprocesses_close_to_the_full_decode(shape, side):
    """Same output shapes; pixels within a few levels (mean abs difference under one level)."""
    data = _jpeg(_photo(*shape, seed=shape[0]))
    full, small = decode_pil(data), decode_pil(data, draft_side=side)
    assert DRAFT_INFO in small.info
    clip_size = min(side, 224)
    diff_small, diff_full = diffusion_preprocess(small, side, rng=0), diffusion_preprocess(full, side, rng=0)
    for a, b, level in ((clip_preprocess(small, clip_size), clip_preprocess(full, clip_size), CLIP_LEVEL),
                        (diff_small, diff_full, DIFF_LEVEL)):
        assert a.shape == b.shape
        err = np.abs(a - b) / level  # in uint8 levels
        assert err.mean() < 1.0 and np.percentile(err, 99.9) <= 8, (err.mean(), np.percentile(err, 99.9))


def test_pipeline_jpeg_draft_off_is_exact_and_on_is_close():
    words = "a red blue green square circle on the left right".split()
    tok = build_word_tokenizer(words)
    rng = np.random.default_rng(0)
    shapes = [(150, 130), (96, 200), (64, 64), (40, 50), (300, 260), (130, 129)]
    pics = [_photo(h, w, seed=i) for i, (h, w) in enumerate(shapes)]
    pairs = [ImageTextPair(image=_jpeg(p), caption=" ".join(rng.choice(words, 6))) for p in pics]

    def batch(**kw):
        cfg = PipelineConfig(layout=LayoutConfig(num_image_tokens=4, num_dream_queries=2, max_length=48, mode="joint"),
                             per_host_batch=len(pairs), max_images_in=1, max_images_out=1, resolution_in=24,
                             resolution_out=32, seed=0, read_threads=0, random_flip=False, **kw)
        b = next(iter(make_dataset({"pairs": pairs}, {"pairs": 1.0}, tok, cfg)))
        b.pop(SKIPS_KEY)
        return b

    exact, fast = batch(jpeg_draft=False), batch(jpeg_draft=True)
    assert exact.keys() == fast.keys()
    for key in exact:
        if key not in ("images_in", "images_out"):
            np.testing.assert_array_equal(exact[key], fast[key], err_msg=key)
    # every image of the exact batch is the reference preprocessing of one of the decoded images
    refs = [(_reference_clip(decode_pil(p.image), 24), _reference_diffusion(decode_pil(p.image), 32, flip=False))
            for p in pairs]
    found = 0
    for key, k in (("images_in", 0), ("images_out", 1)):
        for row in np.flatnonzero(exact[f"{key}_mask"][:, 0]):
            assert any(np.array_equal(exact[key][row, 0], r[k]) for r in refs), f"{key} row {row}"
            found += 1
    assert found >= 3
    # the fast batch is close
    for key, level in (("images_in", CLIP_LEVEL), ("images_out", DIFF_LEVEL)):
        err = np.abs(fast[key] - exact[key]) / level
        assert err.mean() < 1.0 and err.max() <= 12, (key, err.mean(), err.max())
    assert not np.array_equal(fast["images_out"], exact["images_out"])  # drafted: the fast path was taken
