"""Interleaved generation and the `generate` modes on a smoke-trained run: `<dream_start>` forced at chosen
steps gives one image per `<dream_start>`, in order, in index.html / document.md / output.json; the generated
image is fed back (the cache equals a from-scratch prefill of the whole stream with CLIP(image) in its IMG
block); chat turns with `/image`; text to output.json; best-of-N by CLIP score."""

import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dreamjax.cli import main
from dreamjax.data import images as imgs
from dreamjax.infer import decode, modes
from dreamjax.infer.interleaved import generate_interleaved
from dreamjax.models.llama import init_cache
from dreamjax.run.assembly import load_run
from tests.helpers import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
FORCED = {2: "dream", 6: "dream", 9: "eos"}  # generated-token step -> forced token


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("run"))
    assert main(["train", "--config", TINY + ":smoke", "--workdir", wd, "--no-progress"]) == 0
    return wd


@functools.cache
def forcing_hook(dream_start: int, eos: int):
    """The test's logits bias: `<dream_start>` / EOS exactly at the FORCED steps, never elsewhere."""
    steps = jnp.array(sorted(FORCED))
    tokens = jnp.array([dream_start if FORCED[k] == "dream" else eos for k in sorted(FORCED)])

    def hook(logits, step):
        vocab = jnp.arange(logits.shape[-1])
        hit = steps == step
        forced = jnp.sum(jnp.where(hit, tokens, 0))
        banned = (vocab == dream_start) | (vocab == eos)
        logits = jnp.where(banned, -jnp.inf, logits)
        return jnp.where(hit.any(), jnp.where(vocab == forced, 0.0, -jnp.inf), logits)

    return hook


def test_interleaved_cli_writes_text_and_one_image_per_dream_start(workdir, tmp_path, monkeypatch):
    run = load_run(workdir)
    hook = forcing_hook(run.specials.dream_start, run.specials.eos)
    docs = []

    def forced(*args, **kwargs):
        docs.append(generate_interleaved(*args, **{**kwargs, "logits_hook": hook}))
        return docs[-1]

    monkeypatch.setattr(modes, "generate_interleaved", forced)
    out = str(tmp_path / "doc")
    assert main(["generate", "--checkpoint", workdir, "--mode", "interleaved", "--out", out, "--steps", "2",
                 "--prompt", "A story about two shapes. First, there is a red circle."]) == 0
    doc = docs[0]
    assert doc.stop == "eos"
    assert doc.tokens.count(run.specials.dream_start) == 2 == len(doc.images)
    assert [s.kind for s in doc.segments] == ["text", "image", "text", "image", "text"]
    record = json.load(open(os.path.join(out, "output.json")))
    assert [("image" if "image" in s else "text") for s in record["segments"]] == [s.kind for s in doc.segments]
    page = open(os.path.join(out, "index.html")).read()
    assert re.findall(r'<img src="(image_\d\.png)"', page) == ["image_0.png", "image_1.png"]
    body = page[page.index("<body"):]
    pieces = re.findall(r'<p>(?!<img)(.*?)</p>|<img src="(image_\d)', body)
    assert [("image" if img else "text") for _, img in pieces[1:]] == [s.kind for s in doc.segments]  # in order
    md = open(os.path.join(out, "document.md")).read()
    assert md.index("image_0.png") < md.index("image_1.png")
    side = run.model_config.unet.sample_size
    for k, image in enumerate(doc.images):
        saved = np.asarray(Image.open(os.path.join(out, f"image_{k}.png")))
        assert saved.shape == (side, side, 3)
        np.testing.assert_array_equal(saved, image)


def test_generated_image_is_fed_back_through_clip(workdir):
    """The cache after the document equals a prefill of the whole stream with each generated image's CLIP
    features in its IMG block (so the decode steps after an image attend to that image)."""
    run = load_run(workdir)
    s = run.specials
    doc = generate_interleaved(run, "A story about two shapes.", settings=run.sample_settings(steps=2),
                               max_new_tokens=12, logits_hook=forcing_hook(s.dream_start, s.eos))
    assert len(doc.images) == 2 and doc.stop == "eos"
    side = run.model_config.vision.image_size
    for fed, image in zip(doc.images_in, doc.images):  # exactly the PNG's pixels, CLIP-preprocessed
        np.testing.assert_array_equal(fed, imgs.clip_preprocess(image, side))
    n = len(doc.tokens)
    # the stream holds DRM + IMG per image, as the joint training layout
    starts = [i for i, t in enumerate(doc.tokens) if t == s.dream_start]
    q, m = run.model_config.num_dream_queries, run.model_config.num_image_tokens
    for i in starts:
        assert doc.tokens[i + q + 1] == s.dream_end and doc.tokens[i + q + 2] == s.im_start
        assert doc.tokens[i + q + 3 + m] == s.im_end

    cache_len = doc.cache["k"].shape[3]  # [Ly, B, Hkv, S, H]

    @jax.jit
    def prefill(params, tokens, images):
        cache = init_cache(run.model_config.llm, 1, cache_len)
        return decode.extend(run.model, params, cache, tokens, jnp.array([n]), jnp.zeros((1,), jnp.int32),
                             images, jnp.ones(images.shape[:2], bool))[2]

    tokens = jnp.asarray([doc.tokens], jnp.int32)
    want = prefill(run.params, tokens, jnp.asarray(np.stack(doc.images_in))[None])
    for name in ("k", "v"):
        assert_close(np.asarray(doc.cache[name])[:, :, :, :n], np.asarray(want[name])[:, :, :, :n], 1e-4, name)
    np.testing.assert_array_equal(np.asarray(doc.cache["segment_ids"])[0, :n], 1)
    # and without the images, the cache after the first IMG block would differ: the features were used
    blank = prefill(run.params, tokens, jnp.zeros((1, 2) + doc.images_in[0].shape))
    after = starts[0] + q + 2
    assert not np.allclose(np.asarray(blank["k"])[:, :, :, after:n], np.asarray(want["k"])[:, :, :, after:n],
                           atol=1e-4)


def test_text_mode_writes_output_json(workdir, tmp_path, capsys):
    out = str(tmp_path / "txt")
    assert main(["generate", "--checkpoint", workdir, "--prompt", "What color is the shape?", "--out", out,
                 "--max-new-tokens", "3", "--temperature", "0.7", "--top-k", "5", "--top-p", "0.9"]) == 0
    record = json.load(open(os.path.join(out, "output.json")))
    assert record["mode"] == "text" and record["settings"]["top_k"] == 5
    assert record["text"] == capsys.readouterr().out.strip().splitlines()[-1].strip() or record["text"] == ""


def test_chat_turns_with_an_image(workdir, tmp_path, monkeypatch):
    src = tmp_path / "in.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(src)
    lines = iter([f"/image {src}", "What color is the shape?", "", "And the background?", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    out = str(tmp_path / "chat")
    assert main(["generate", "--checkpoint", workdir, "--mode", "chat", "--out", out, "--max-new-tokens", "3"]) == 0
    record = json.load(open(os.path.join(out, "output.json")))
    assert [t["user"] for t in record["turns"]] == ["What color is the shape?", "And the background?"]
    assert [t["images"] for t in record["turns"]] == [1, 0]


def test_best_of_n_by_clip_score(workdir, tmp_path):
    from tests.test_rerank import save_tiny_clip

    clip = tmp_path / "clip"
    save_tiny_clip(clip)
    out = str(tmp_path / "img")
    assert main(["generate", "--checkpoint", workdir, "--prompt", "a red circle", "--mode", "image", "--steps", "2",
                 "--num-images", "3", "--rerank", str(clip), "--seed", "4", "--out", out, "--no-progress"]) == 0
    record = json.load(open(os.path.join(out, "output.json")))
    scores = record["clip_scores"]
    assert len(scores) == 3 == len(record["candidates"])
    best = np.asarray(Image.open(record["images"][0]))
    np.testing.assert_array_equal(best, np.asarray(Image.open(record["candidates"][int(np.argmax(scores))])))
    # candidate j is what plain generation gives as image j for the same seed
    plain = str(tmp_path / "plain")
    assert main(["generate", "--checkpoint", workdir, "--prompt", "a red circle", "--mode", "image", "--steps", "2",
                 "--num-images", "3", "--seed", "4", "--out", plain, "--no-progress"]) == 0
    for j in range(3):
        np.testing.assert_array_equal(np.asarray(Image.open(record["candidates"][j])),
                                      np.asarray(Image.open(os.path.join(plain, f"image_4_{j}.png"))))
