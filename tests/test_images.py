"""dreamjax.data.images: decoding, CLIP / diffusion preprocessing, output helpers."""

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from dreamjax.data.images import (
    CLIP_MEAN,
    CLIP_STD,
    ImageDecodeError,
    center_crop,
    clip_preprocess,
    decode_image,
    diffusion_preprocess,
    encode_png,
    image_grid,
    save_png,
    shortest_edge_size,
    to_uint8,
)

# Non-square, odd, tiny (upscaled) and already-224 shapes: exercises truncation and crop rounding.
SHAPES = [(300, 200), (200, 300), (224, 224), (64, 64), (37, 513), (225, 227), (17, 16)]


def _random_image(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def _encode(img, fmt, **kw):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **kw)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------
# CLIP side


def test_clip_preprocess_shape_and_range():
    for shape in SHAPES:
        x = clip_preprocess(_random_image(shape))
        assert x.shape == (224, 224, 3) and x.dtype == np.float32
        lo = (0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
        hi = (1 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
        assert np.all(x >= lo - 1e-5) and np.all(x <= hi + 1e-5)
    # a constant image stays constant, at exactly the normalised value
    x = clip_preprocess(np.full((50, 80, 3), 255, np.uint8), size=32)
    np.testing.assert_allclose(x, np.broadcast_to((1 - np.array(CLIP_MEAN)) / np.array(CLIP_STD), x.shape),
                               rtol=0, atol=1e-6)


def test_clip_preprocess_matches_transformers():
    """Against transformers' PIL CLIPImageProcessor (the 'slow' processor that upstream used), built offline
    with the openai/clip-vit-large-patch14 settings. Same kernels and arithmetic: measured max error 0.0."""
    pil_clip = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    from transformers.image_utils import PILImageResampling

    proc = pil_clip.CLIPImageProcessorPil(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
        resample=PILImageResampling.BICUBIC, do_resize=True, do_center_crop=True, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )
    for i, shape in enumerate(SHAPES):
        img = _random_image(shape, seed=i)
        ref = proc(img, return_tensors="np", input_data_format="channels_last")["pixel_values"][0]
        ref = np.moveaxis(ref, 0, -1)  # CHW -> HWC
        err = np.abs(clip_preprocess(img) - ref).max()
        assert err <= 1e-6, f"{shape}: max abs error {err}"


def test_shortest_edge_size_truncates_like_reference():
    assert shortest_edge_size(300, 200, 224) == (336, 224)
    assert shortest_edge_size(37, 513, 224) == (224, int(224 * 513 / 37))  # 3105.7 -> 3105
    assert shortest_edge_size(224, 224, 224) == (224, 224)


# ---------------------------------------------------------------------------------------------------------
# Diffusion side


def test_diffusion_preprocess_shape_range_and_flip():
    img = _random_image((48, 80))
    x = diffusion_preprocess(img, resolution=32, random_flip=False)
    assert x.shape == (32, 32, 3) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    # the flip is a pure function of the rng; both outcomes are reachable and exact mirrors
    outs = [diffusion_preprocess(img, resolution=32, rng=seed) for seed in range(16)]
    again = [diffusion_preprocess(img, resolution=32, rng=np.random.default_rng(seed)) for seed in range(16)]
    for a, b in zip(outs, again):
        np.testing.assert_array_equal(a, b)
    flipped = [not np.array_equal(o, x) for o in outs]
    assert any(flipped) and not all(flipped)
    for o, f in zip(outs, flipped):
        np.testing.assert_array_equal(o, x[:, ::-1] if f else x)
    with pytest.raises(ValueError, match="rng"):
        diffusion_preprocess(img, resolution=32)  # random_flip=True without an rng


def test_diffusion_preprocess_values_and_crop_rounding():
    # shortest edge already == resolution: no resize, so the values and the crop offset are checkable exactly
    r = 16
    for width, left in ((r + 1, 0), (r + 3, 2), (r + 5, 2), (r + 4, 2)):  # torchvision: round-half-even
        img = _random_image((r, width), seed=width)
        x = diffusion_preprocess(img, resolution=r, random_flip=False)
        want = (img[:, left: left + r].astype(np.float32) / 255 - 0.5) / 0.5
        np.testing.assert_array_equal(x, want)
    # the CLIP side (transformers) floors instead
    img = _random_image((r, r + 3))
    np.testing.assert_array_equal(center_crop(img, r, r, "floor"), img[:, 1: 1 + r])


def _upstream_sd_transform(img: np.ndarray, resolution: int, flip: bool) -> np.ndarray:
    """Upstream's SD transform, written out with PIL as torchvision runs it on a PIL image (torchvision does
    not install beside the pinned torch here): Resize(resolution, BILINEAR) of the shortest edge with the long
    edge truncated (and no resize when the short edge already fits), CenterCrop with round((h - th) / 2)
    offsets, RandomHorizontalFlip, ToTensor (/255), Normalize(0.5, 0.5)."""
    pic = Image.fromarray(img)
    w, h = pic.size
    short, long = (w, h) if w <= h else (h, w)
    if short != resolution:
        new_short, new_long = resolution, int(resolution * long / short)
        pic = pic.resize((new_short, new_long) if w <= h else (new_long, new_short), Image.BILINEAR)
    w, h = pic.size
    top, left = int(round((h - resolution) / 2.0)), int(round((w - resolution) / 2.0))
    pic = pic.crop((left, top, left + resolution, top + resolution))
    if flip:
        pic = pic.transpose(Image.FLIP_LEFT_RIGHT)
    x = np.asarray(pic, dtype=np.float32) / np.float32(255.0)
    return (x - np.float32(0.5)) / np.float32(0.5)


@pytest.mark.parametrize("shape", [(100, 70), (70, 131), (64, 64), (33, 40), (64, 97), (131, 64), (65, 66)])
def test_diffusion_preprocess_matches_the_upstream_transform(shape):
    img = _random_image(shape, seed=shape[0] * 1000 + shape[1])
    np.testing.assert_array_equal(diffusion_preprocess(img, 64, random_flip=False),
                                  _upstream_sd_transform(img, 64, flip=False))
    for seed in range(4):  # the flip follows the rng: draw < 0.5 flips
        flip = np.random.default_rng(seed).random() < 0.5
        np.testing.assert_array_equal(diffusion_preprocess(img, 64, random_flip=True, rng=seed),
                                      _upstream_sd_transform(img, 64, flip=flip))


# ---------------------------------------------------------------------------------------------------------
# Decoding


def test_decode_roundtrip_and_modes(tmp_path):
    img = _random_image((20, 30))
    np.testing.assert_array_equal(decode_image(encode_png(img)), img)
    np.testing.assert_array_equal(decode_image(save_png(img, tmp_path / "sub" / "a.png")), img)
    jpg = decode_image(_encode(img, "JPEG", quality=95))
    assert jpg.shape == (20, 30, 3) and jpg.dtype == np.uint8
    gray = decode_image(_encode(img[:, :, 0], "PNG"))
    assert gray.shape == (20, 30, 3) and np.array_equal(gray[:, :, 1], img[:, :, 0])
    rgba = np.concatenate([img, np.zeros((20, 30, 1), np.uint8)], axis=2)
    np.testing.assert_array_equal(decode_image(_encode(rgba, "PNG")), img)  # alpha dropped, like upstream


def test_decode_errors_name_the_item(tmp_path):
    good = _encode(_random_image((32, 32)), "PNG")
    jpeg = _encode(_random_image((32, 32)), "JPEG")
    cases = {
        "garbage": b"definitely not an image",
        "empty": b"",
        "truncated_png": good[: len(good) // 2],
        "truncated_jpeg": jpeg[: len(jpeg) // 2],
    }
    for name, data in cases.items():
        with pytest.raises(ImageDecodeError, match=name) as info:
            decode_image(data, name=name)
        assert isinstance(info.value, ValueError) and info.value.item == name and info.value.reason
    with pytest.raises(ImageDecodeError, match="missing.png"):
        decode_image(tmp_path / "missing.png")
    with pytest.raises(ImageDecodeError, match="max_pixels"):
        decode_image(good, max_pixels=100)
    # picklable with its fields (errors cross Grain worker processes)
    err = pickle.loads(pickle.dumps(ImageDecodeError("x.jpg", "bad")))
    assert (err.item, err.reason, str(err)) == ("x.jpg", "bad", "cannot decode image 'x.jpg': bad")


# ---------------------------------------------------------------------------------------------------------
# Output helpers


def test_to_uint8_and_grid(tmp_path):
    x = np.array([-2.0, -1.0, 0.0, 1.0, 3.0, np.nan], np.float32)
    np.testing.assert_array_equal(to_uint8(x), [0, 0, 128, 255, 255, 0])
    img = _random_image((8, 8))
    back = to_uint8(diffusion_preprocess(img, 8, random_flip=False))
    np.testing.assert_array_equal(back, img)  # [-1, 1] -> uint8 round-trips exactly

    grid = image_grid([img, img, np.zeros((4, 6, 3), np.float32)], cols=2, pad=1)
    assert grid.shape == (2 * 8 + 3, 2 * 8 + 3, 3) and grid.dtype == np.uint8
    np.testing.assert_array_equal(grid[1:9, 10:18], img)
    assert (grid[10:14, 1:7] == 128).all()  # float 0.0 -> 128
    path = save_png(grid, tmp_path / "grid.png")
    np.testing.assert_array_equal(decode_image(path), grid)
