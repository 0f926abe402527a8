"""Training from `dreamjax prepare` output: the Grain pipeline over prepared shards is deterministic, splits
over processes into disjoint row blocks whose union is the single-process stream, builds the same batches
whatever its threads and worker processes, and resumes exactly, on its own and through `dreamjax train`;
an image that fails to decode costs only that image; bad data paths fail with one line before compiling."""

import hashlib
import io
import json
import os
import signal

import numpy as np
import pytest
from PIL import Image

from dreamjax.cli import main
from dreamjax.data.documents import ImageTextPair, InterleavedDoc, mmc4_member_name
from dreamjax.data.pipeline import IMAGE_DECODE_ERROR, SKIPS_KEY, PipelineConfig, PrepareExample, make_dataset
from dreamjax.data.prepare import prepare
from dreamjax.data.prepared import open_mixture
from dreamjax.data.synthetic import ShapesWorld
from dreamjax.data.tokenize import LayoutConfig, Reason, Skips, tokenize
from dreamjax.data.tokenizer import SpecialIds, build_word_tokenizer
from dreamjax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
KINDS = ("pairs", "documents", "conversations")
WEIGHTS = {"pairs": 0.3, "documents": 0.4, "conversations": 0.3}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """{name: directory} of three small prepared data sets of the shapes world (32 px PNGs)."""
    root = tmp_path_factory.mktemp("prepared")
    paths = {}
    for kind in KINDS:
        paths[kind] = str(root / kind)
        prepare("synthetic", f"{kind}:train:24:0:32", paths[kind], num_shards=2, workers=1, progress=False)
    return paths


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(ShapesWorld(seed=0).vocabulary())


def pcfg(per_host=4, seed=3, **kw):
    return PipelineConfig(layout=LayoutConfig(num_image_tokens=4, num_dream_queries=2, max_length=96),
                          per_host_batch=per_host, max_images_in=3, max_images_out=2, resolution_in=16,
                          resolution_out=8, seed=seed, **kw)


def take(it, n):
    out = []
    for _ in range(n):
        batch = next(it)
        batch.pop(SKIPS_KEY)
        out.append(batch)
    return out


def batches(paths, tok, n=4, *, process_index=0, process_count=1, **kw):
    sources, weights = open_mixture(paths, WEIGHTS)
    ds = make_dataset(sources, weights, tok, pcfg(**kw), process_index=process_index, process_count=process_count)
    return take(iter(ds), n)


def assert_same(a, b):
    assert len(a) == len(b)
    for step, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=f"batch {step} {key}")


# ----------------------------------------------------------------------------------------------------------
# The pipeline over prepared shards


def test_same_seed_same_batches_other_seed_others(prepared, tok):
    first = batches(prepared, tok)
    assert_same(first, batches(prepared, tok))
    assert first[0]["images_in"].shape == (4, 3, 16, 16, 3) and first[0]["images_out"].shape == (4, 2, 8, 8, 3)
    assert first[0]["images_in_mask"].any() and first[0]["images_out_mask"].any()  # real pixels came through
    other = batches(prepared, tok, seed=4)
    assert not all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(first, other))


def test_two_processes_read_disjoint_rows_whose_union_is_the_single_process_stream(prepared, tok):
    whole = batches(prepared, tok, per_host=4)
    halves = [batches(prepared, tok, per_host=2, process_index=k, process_count=2) for k in range(2)]
    for step, batch in enumerate(whole):
        for key, value in batch.items():
            np.testing.assert_array_equal(np.concatenate([h[step][key] for h in halves]), value,
                                          err_msg=f"batch {step} {key}")
    assert not np.array_equal(halves[0][0]["tokens"], halves[1][0]["tokens"])


def test_threads_do_not_change_the_batches_and_state_resumes_exactly(prepared, tok):
    reference = batches(prepared, tok, n=5, read_threads=0)
    assert_same(reference, batches(prepared, tok, n=5, read_threads=3, prefetch_batches=2))
    sources, weights = open_mixture(prepared, WEIGHTS)
    ds = make_dataset(sources, weights, tok, pcfg(read_threads=2))
    it = iter(ds)
    take(it, 2)
    state = it.get_state()
    resumed = iter(make_dataset(sources, weights, tok, pcfg(read_threads=2)))
    resumed.set_state(state)
    assert_same(take(resumed, 3), reference[2:])


def test_worker_processes_give_the_same_batches_and_resume_exactly(prepared, tok):
    """`mp_prefetch` (2 worker processes) makes the single-process batches and its state resumes exactly."""
    reference = batches(prepared, tok, n=5, read_threads=0)
    sources, weights = open_mixture(prepared, WEIGHTS)
    it = iter(make_dataset(sources, weights, tok, pcfg(num_workers=2, read_threads=1)))
    assert_same(take(it, 3), reference[:3])
    state = it.get_state()
    del it
    resumed = iter(make_dataset(sources, weights, tok, pcfg(num_workers=2, read_threads=1)))
    resumed.set_state(state)
    assert_same(take(resumed, 2), reference[3:])


# ----------------------------------------------------------------------------------------------------------
# Images that fail to decode (spec 3.2: the document is kept)


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), color).save(buf, format="PNG")
    return buf.getvalue()


def _prepare_one(record, tok):
    cfg = pcfg()
    return PrepareExample(tok, SpecialIds.from_tokenizer(tok), cfg).random_map(record, np.random.default_rng(7)), cfg


def test_an_image_that_fails_to_decode_is_skipped_and_the_document_kept(tok):
    good_a, bad, good_b = _png((255, 0, 0)), b"\xff\xd8 not a jpeg", _png((0, 0, 255))
    doc = InterleavedDoc(["a red circle.", "a shape.", "a blue square."], [(good_a, 0), (bad, 1), (good_b, 2)])
    example, cfg = _prepare_one(doc, tok)
    assert example.sample is not None, example.skips
    assert example.skips == {IMAGE_DECODE_ERROR: 1, Reason.CORRUPT_IMAGE: 1}
    # exactly the layout of the same document with that image flagged corrupt from the start
    flagged = tokenize(InterleavedDoc(doc.text_list, doc.images, corrupt=frozenset({1})), tok, cfg.layout,
                       skips=Skips())
    assert example.sample.ids == flagged.ids and example.sample.labels == flagged.labels
    assert len(example.sample.images_in) == 2 and len(example.sample.images_out) == 2  # both uses of the rest
    assert example.sample.images_in[0][0, 0, 0] > example.sample.images_in[0][0, 0, 2]  # the red image first
    assert example.sample.images_in[1][0, 0, 2] > example.sample.images_in[1][0, 0, 0]  # then the blue one
    assert example.sample.images_out[0].shape == (8, 8, 3)
    # a pair needs its image: skipped, and counted under both reasons
    example, _ = _prepare_one(ImageTextPair(bad, "a red circle."), tok)
    assert example.sample is None
    assert example.skips == {IMAGE_DECODE_ERROR: 1, Reason.PAIR_CORRUPT_IMAGE: 1}


def test_mmc4_images_are_named_as_in_the_tar_shards():
    """Spec 3.2: the image of `image_name` is tar member `image_name.split(".")[0] + ".jpg"`."""
    assert mmc4_member_name("abc.png") == "abc.jpg"
    assert mmc4_member_name("a1b2.x.jpeg") == "a1b2.jpg"
    assert mmc4_member_name("noext") == "noext.jpg"
    doc = InterleavedDoc.from_mmc4({"text_list": ["a", "b"], "image_info": [
        {"image_name": "x.y.png", "matched_text_index": 1}]})
    assert doc.images == [("x.jpg", 1)]


# ----------------------------------------------------------------------------------------------------------
# Configuration errors: one line, before anything is built


def test_open_mixture_errors_are_one_line(prepared, tmp_path):
    (tmp_path / "empty").mkdir()
    cases = [
        ({}, {"pairs": 1.0}, "config.data.paths is empty"),
        ({"pairs": prepared["pairs"]}, {"pairs": 1.0, "laion": 0.5}, "names ['laion'] but config.data.paths"),
        ({"pairs": str(tmp_path / "nope")}, {"pairs": 1.0}, "does not exist"),
        ({"pairs": str(tmp_path / "empty")}, {"pairs": 1.0}, "not a prepared data directory"),
        ({"pairs": prepared["pairs"]}, {"pairs": -1.0}, "negative"),
    ]
    for paths, mixture, needle in cases:
        with pytest.raises(ValueError) as info:
            open_mixture(paths, mixture)
        assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)
    # a path the mixture does not name is not opened; an empty mixture weighs every path equally
    sources, weights = open_mixture({"pairs": prepared["pairs"], "unused": "/nowhere"}, {"pairs": 1.0})
    assert list(sources) == ["pairs"] and len(sources["pairs"]) == 24
    sources, weights = open_mixture({"pairs": prepared["pairs"], "documents": prepared["documents"]}, {})
    assert sorted(sources) == ["documents", "pairs"] and weights == {"pairs": 1.0, "documents": 1.0}


def _cli_paths(paths) -> str:
    return "--config.data.paths=" + repr(dict(paths))


@pytest.mark.parametrize("extra, needle", [
    (["--config.data.mixture={'pairs': 1.0, 'laion': 1.0}"], "names ['laion'] but config.data.paths"),
    (["--config.data.mixture={'pairs': 1.0}", "--config.data.paths={'pairs': '/does/not/exist'}"], "does not exist"),
])
def test_train_data_errors_exit_2_with_one_line(prepared, extra, needle, tmp_path, capsys, monkeypatch):
    def no_model(*_a, **_k):
        raise AssertionError("the run was assembled before the data was checked")

    monkeypatch.setattr(loop, "new_run", no_model)
    argv = ["train", "--config", TINY + ":smoke", "--workdir", str(tmp_path / "wd"), "--no-progress",
            "--config.data.source=prepared", _cli_paths({"pairs": prepared["pairs"]}), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


# ----------------------------------------------------------------------------------------------------------
# `dreamjax train` on prepared data: stopped after K steps and resumed = one uninterrupted run

STEPS, STOP_AT = 4, 2
SHARD_BATCH, METRICS_WRITER = loop.shard_batch, loop.MetricsWriter  # the originals (the tests patch them)


def _train(workdir, paths, monkeypatch, stop_at=None) -> list[str]:
    """Run `dreamjax train` in-process; returns a digest of each batch it fed to the step. With `stop_at`,
    a SIGTERM (preemption) arrives while step `stop_at` is logged: the run saves and stops there."""
    seen = []

    def shard(batch, *a, **k):
        seen.append(hashlib.sha1(b"".join(np.ascontiguousarray(batch[key]).tobytes()
                                          for key in sorted(batch))).hexdigest())
        return SHARD_BATCH(batch, *a, **k)

    class Writer(METRICS_WRITER):
        def write(self, step, metrics):
            super().write(step, metrics)
            if step == stop_at:
                os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(loop, "shard_batch", shard)
    monkeypatch.setattr(loop, "MetricsWriter", Writer)
    rc = main(["train", "--config", TINY + ":smoke", "--workdir", str(workdir), "--no-progress",
               "--config.data.source=prepared", _cli_paths(paths), f"--config.train.steps={STEPS}",
               "--config.train.checkpoint_every=100", "--config.train.log_every=1",
               "--config.train.global_batch_size=8"])
    assert rc == 0
    return seen


def _losses(workdir) -> dict[int, float]:
    out = {}
    for line in open(os.path.join(workdir, "metrics.jsonl")):
        m = json.loads(line)
        out[m["step"]] = m["loss"]
    return out


def test_train_on_prepared_data_resumes_exactly(prepared, tmp_path, monkeypatch):
    whole = _train(tmp_path / "whole", prepared, monkeypatch)
    assert len(whole) == STEPS and len(set(whole)) == STEPS
    first = _train(tmp_path / "split", prepared, monkeypatch, stop_at=STOP_AT)
    assert first == whole[:STOP_AT]
    assert sorted(int(s) for s in os.listdir(tmp_path / "split" / "checkpoints") if s.isdigit()) == [STOP_AT]
    rest = _train(tmp_path / "split", prepared, monkeypatch)
    assert rest == whole[STOP_AT:]  # exactly the batches STOP_AT + 1 .. of the uninterrupted run
    a, b = _losses(tmp_path / "whole"), _losses(tmp_path / "split")
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert [b[s] for s in range(STOP_AT + 1, STEPS + 1)] == [a[s] for s in range(STOP_AT + 1, STEPS + 1)]
