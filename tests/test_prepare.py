"""`dreamjax prepare`: every input format -> ArrayRecord shards -> typed records, bad input counted by reason."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreamjax.data.documents import Conversation, ImageTextPair, InstructInterleavedDoc, InterleavedDoc
from dreamjax.data.images import decode_image
from dreamjax.data.prepare import add_arguments, main, prepare
from dreamjax.data.prepared import open_prepared
from dreamjax.data.sources.mmc4 import MAX_IMAGES

# ----------------------------------------------------------------------------------------------------------
# Tiny inputs


def img_bytes(color=(200, 30, 30), size=(4, 3), mode="RGB", fmt="PNG") -> bytes:
    """A few-pixel image in `mode`, encoded as `fmt`."""
    if mode == "I;16":
        im = Image.fromarray(np.full(size[::-1], 40000, np.uint16))
    else:
        im = Image.new("RGB", size, color).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def bomb_png(width=20000, height=20000) -> bytes:
    """A PNG header claiming 400M pixels (over PIL's decompression-bomb limit), without the pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def jsonl(objs) -> str:
    return "".join(json.dumps(o) + "\n" for o in objs)


def add_member(tf: tarfile.TarFile, name: str, data: bytes | str) -> None:
    data = data.encode() if isinstance(data, str) else data
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def records_by_id(out: Path) -> dict:
    src, _ = open_prepared(out)
    return {src.raw(i)[0]["id"]: (src[i], src.raw(i)[0]) for i in range(len(src))}


def run(fmt, inp, out, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return prepare(fmt, inp, out, **kw)


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


# ----------------------------------------------------------------------------------------------------------
# Every format, valid input


def test_mmc4_plain_gz_zip(tmp_path):
    red, green, blue = img_bytes((255, 0, 0)), img_bytes((0, 255, 0)), img_bytes((0, 0, 255), fmt="JPEG")
    write(tmp_path / "in/images/r.png", red)
    write(tmp_path / "in/images/g.png", green)
    write(tmp_path / "in/images/b.jpg", blue)  # found by the tar rule: "b.x.jpeg" -> "b.jpg"
    doc1 = {"id": "d1", "text_list": ["a", "b", "c"], "image_info": [
        {"image_name": "g.png", "matched_text_index": 2, "matched_sim": 0.3},
        {"image_name": "r.png", "matched_text_index": 0}]}
    doc2 = {"text_list": ["only text"], "image_info": []}
    doc3 = {"id": "d3", "instruction": "Tell a story.", "text_list": ["x", "y"],
            "image_info": [{"image_name": "b.x.jpeg", "matched_text_index": 1}]}
    write(tmp_path / "in/a.jsonl", jsonl([doc1]))
    write(tmp_path / "in/b.jsonl.gz", gzip.compress(jsonl([doc2]).encode(), mtime=0))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("c.jsonl", jsonl([doc3]))
    write(tmp_path / "in/c.jsonl.zip", buf.getvalue())

    report = run("mmc4", tmp_path / "in", tmp_path / "out", num_shards=2)
    assert report["documents_in"] == 3 and report["documents_written"] == 3
    assert report["images_written"] == 3 and report["skipped"] == {} and report["images_reencoded"] == {}
    assert report["kinds"] == {"interleaved": 3}
    assert sorted(p.name for p in (tmp_path / "out").glob("*.array_record")) == [
        "data-00000-of-00002.array_record", "data-00001-of-00002.array_record"]
    assert json.loads((tmp_path / "out/report.json").read_text()) == report

    recs = records_by_id(tmp_path / "out")
    assert set(recs) == {"d1", "b.jsonl.gz#0", "d3"}
    rec, raw = recs["d1"]
    assert isinstance(rec, InterleavedDoc) and list(rec.text_list) == ["a", "b", "c"]
    assert list(rec.images) == [(red, 0), (green, 2)]  # sorted by matched_text_index, original bytes kept
    assert raw["images"][1] == {"image_name": "g.png", "matched_text_index": 2, "matched_sim": 0.3}
    assert recs["b.jsonl.gz#0"][0] == InterleavedDoc(text_list=["only text"], images=[])
    rec3 = recs["d3"][0]
    assert isinstance(rec3, InstructInterleavedDoc) and rec3.instruction == "Tell a story."
    assert list(rec3.images) == [(blue, 1)]


def test_webdataset_documents_and_pairs(tmp_path):
    red, green, blue = img_bytes((255, 0, 0)), img_bytes((0, 255, 0), fmt="JPEG"), img_bytes((0, 0, 255))
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tf:
        doc = {"text_list": ["s0", "s1"], "image_info": [{"image_name": "pic.1.png", "matched_text_index": 1}]}
        add_member(tf, "000.json", json.dumps(doc))
        add_member(tf, "pic.jpg", green)  # spec 3.2: "pic.1.png" is read from member "pic.jpg"
        add_member(tf, "001.json", json.dumps({"caption": "a red thing"}))
        add_member(tf, "001.png", red)
        add_member(tf, "sub/002.txt", "a blue thing")
        add_member(tf, "sub/002.jpg", blue)
    report = run("webdataset", tmp_path / "shard-0.tar", tmp_path / "out")
    assert (report["documents_in"], report["documents_written"], report["images_written"]) == (3, 3, 3)
    assert report["skipped"] == {} and report["kinds"] == {"interleaved": 1, "pair": 2}
    recs = records_by_id(tmp_path / "out")
    assert recs["000"][0] == InterleavedDoc(text_list=["s0", "s1"], images=[(green, 1)])
    assert recs["001"][0] == ImageTextPair(image=red, caption="a red thing")
    assert recs["sub/002"][0] == ImageTextPair(image=blue, caption="a blue thing")


def test_pairs_tsv_jsonl_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    a, b, c, d = (img_bytes((k * 60, 0, 0)) for k in range(4))
    write(tmp_path / "in/a.png", a)
    write(tmp_path / "imgs/b.png", b)
    write(tmp_path / "in/c.png", c)
    write(tmp_path / "in/caps.tsv", "image\tcaption\na.png\tfirst\n")
    write(tmp_path / "in/caps.jsonl", jsonl([{"url": "c.png", "text": "third", "id": "p3"}]))
    pq.write_table(pa.table({"image_path": [str(tmp_path / "imgs/b.png")], "caption": ["second"],
                             "image": [None]}), tmp_path / "in/caps.parquet")
    pq.write_table(pa.table({"img": [{"bytes": d, "path": None}], "cap": ["fourth"]}), tmp_path / "hf.parquet")

    report = run("pairs", tmp_path / "in", tmp_path / "out")
    assert (report["documents_in"], report["documents_written"], report["images_written"]) == (3, 3, 3)
    recs = records_by_id(tmp_path / "out")
    assert recs["caps.tsv#0"][0] == ImageTextPair(image=a, caption="first")
    assert recs["caps.parquet#0"][0] == ImageTextPair(image=b, caption="second")  # absolute path
    assert recs["p3"][0] == ImageTextPair(image=c, caption="third")

    # explicit columns; image bytes inside the parquet (HF datasets' Image feature)
    report = run("pairs", tmp_path / "hf.parquet", tmp_path / "out2", image_column="img", caption_column="cap")
    assert report["documents_written"] == 1
    src, _ = open_prepared(tmp_path / "out2")
    assert src[0] == ImageTextPair(image=d, caption="fourth")

    # relative paths against --images
    write(tmp_path / "rel/caps.tsv", "filepath\ttext\nb.png\tsecond\n")
    run("pairs", tmp_path / "rel/caps.tsv", tmp_path / "out3", images=tmp_path / "imgs")
    src, _ = open_prepared(tmp_path / "out3")
    assert src[0] == ImageTextPair(image=b, caption="second")


def test_llava_conversations(tmp_path):
    cat, dog = img_bytes((10, 10, 10)), img_bytes((90, 90, 90))
    write(tmp_path / "imgs/cat.png", cat)
    write(tmp_path / "imgs/dog.png", dog)
    data = [
        {"id": "c1", "image": "cat.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "Draw it again."}, {"from": "gpt", "value": "<dream>"}]},
        {"id": "c2", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "c3", "conversations": [
            {"from": "human", "value": "<image> and <image>", "modal_info": {"<image>": ["image", ["dog.png",
                                                                                                  "cat.png"]]}},
            {"from": "gpt", "value": "Two animals."}]},
    ]
    write(tmp_path / "llava.json", json.dumps(data))
    report = run("llava", tmp_path / "llava.json", tmp_path / "out", images=tmp_path / "imgs")
    assert (report["documents_in"], report["documents_written"], report["images_written"]) == (3, 3, 3)
    assert report["kinds"] == {"conversation": 3}
    recs = records_by_id(tmp_path / "out")
    c1 = recs["c1"][0]
    assert isinstance(c1, Conversation) and list(c1.images) == [cat, cat]  # one image, two placeholders
    assert c1.turns[3] == ("gpt", "<dream>")
    assert recs["c1"][1]["image_slots"] == [0, 0]
    assert recs["c2"][0] == Conversation(turns=[("human", "Hi"), ("gpt", "Hello.")], images=[])
    assert list(recs["c3"][0].images) == [dog, cat]


def test_synthetic_matches_the_world(tmp_path):
    from dreamjax.data.synthetic import ShapesWorld

    report = run("synthetic", "documents:train:6:3:32", tmp_path / "out", num_shards=3)
    assert report["documents_written"] == 6 and report["kinds"] == {"interleaved": 6}
    world = ShapesWorld(seed=3, resolution=32, image_format="png")
    recs = records_by_id(tmp_path / "out")
    for i in range(6):
        want = world.record("documents", "train", i)
        got = recs[f"shapes-documents-train-{i:09d}"][0]
        assert list(got.text_list) == list(want.text_list) and list(got.images) == list(want.images)
    report = run("synthetic", "pairs:heldout:4", tmp_path / "out2")
    assert report["kinds"] == {"pair": 4}
    with pytest.raises(ValueError, match="KIND:SPLIT:N"):
        run("synthetic", "nonsense", tmp_path / "out3")


# ----------------------------------------------------------------------------------------------------------
# Image normalization: kept, converted, downscaled


def test_images_converted_and_downscaled(tmp_path):
    modes = {"cmyk": ("CMYK", "JPEG"), "gray": ("L", "PNG"), "pal": ("P", "PNG"), "alpha": ("RGBA", "PNG"),
             "deep": ("I;16", "PNG")}
    info = []
    for i, (name, (mode, fmt)) in enumerate(modes.items()):
        write(tmp_path / f"in/images/{name}.img", img_bytes((100, 150, 200), mode=mode, fmt=fmt))
        info.append({"image_name": f"{name}.img", "matched_text_index": i})
    write(tmp_path / "in/images/wide.png", img_bytes(size=(20000, 2)))
    info.append({"image_name": "wide.png", "matched_text_index": 5})
    write(tmp_path / "in/docs.jsonl", jsonl([{"id": "d", "text_list": list("abcdef"), "image_info": info}]))

    report = run("mmc4", tmp_path / "in", tmp_path / "out", max_image_side=64)
    assert report["images_written"] == 6 and report["skipped"] == {}
    assert report["images_reencoded"] == {"downscaled": 1, "mode_CMYK": 1, "mode_I;16": 1, "mode_L": 1,
                                          "mode_P": 1, "mode_RGBA": 1}
    doc = records_by_id(tmp_path / "out")["d"][0]
    decoded = [Image.open(io.BytesIO(b)) for b, _ in doc.images]
    assert [im.mode for im in decoded] == ["RGB"] * 6
    assert [im.format for im in decoded] == ["JPEG", "PNG", "PNG", "PNG", "PNG", "PNG"]
    assert decoded[5].size == (64, 1)  # longer side to --max-image-side, aspect kept
    assert np.asarray(decoded[4])[0, 0].tolist() == [156, 156, 156]  # 16-bit 40000 scaled, not clipped
    assert np.asarray(decoded[1])[0, 0].tolist() == [141] * 3  # grayscale -> RGB


# ----------------------------------------------------------------------------------------------------------
# Bad input: counted by reason, never a crash, never a silent drop


def bad_mmc4_corpus(root: Path) -> dict:
    """An MMC4 folder mixing valid documents with every bad case; returns what prepare must report."""
    good = img_bytes()
    imgs = root / "images"
    write(imgs / "ok1.png", good)
    write(imgs / "ok2.png", img_bytes((0, 99, 0)))
    write(imgs / "cmyk.jpg", img_bytes(mode="CMYK", fmt="JPEG"))
    write(imgs / "trunc.png", img_bytes(size=(64, 64))[:60])
    write(imgs / "zero.png", b"")
    write(imgs / "text.png", "this is not an image")
    write(imgs / "bomb.png", bomb_png())
    write(imgs / "wide.png", img_bytes(size=(20000, 3)))
    for k in range(MAX_IMAGES + 3):
        write(imgs / f"many{k}.png", img_bytes((k, 0, 0)))

    def ref(name, index=0):
        return {"image_name": name, "matched_text_index": index}

    lines = [
        # valid: one image per bad case; the document is kept and the bad image dropped (spec 3.2)
        json.dumps({"id": "good", "text_list": ["a", "b", "c"], "image_info": [
            ref("ok1.png"), ref("cmyk.jpg", 1), ref("wide.png", 2), ref("trunc.png"), ref("zero.png"),
            ref("text.png"), ref("bomb.png"), ref("absent.png"), ref("ok2.png", 3), ref("ok2.png", -1),
            ref("ok1.png", 1), {"matched_text_index": 0}]}),
        "{not json",
        json.dumps({"id": "no_text", "image_info": []}),
        json.dumps({"id": "empty", "text_list": [], "image_info": []}),
        json.dumps({"id": "surrogate", "text_list": ["\ud800"]}),
        json.dumps({"id": "many", "text_list": [f"s{k}" for k in range(MAX_IMAGES + 3)],
                    "image_info": [ref(f"many{k}.png", k) for k in range(MAX_IMAGES + 3)]}),
        json.dumps({"id": "plain", "text_list": ["just text"]}),
    ]
    data = "\n".join(lines).encode() + b"\n" + b'{"text_list": ["caf\xe9"]}\n'  # latin-1: not UTF-8
    write(root / "docs.jsonl", data)
    write(root / "broken.jsonl.gz", b"\x1f\x8b this is not gzip data")
    return {
        "documents_in": 9, "documents_written": 3,
        "images_written": 3 + MAX_IMAGES,  # good: ok1, cmyk, wide; many: the first MAX_IMAGES
        "skipped": {
            "unreadable_file": 1, "malformed_json": 1, "missing_keys": 1, "empty_text_list": 1, "non_utf8_text": 2,
            "image_corrupt": 1, "image_empty": 1, "not_an_image": 1, "image_too_large": 1, "image_missing": 1,
            "matched_text_index_out_of_range": 2, "duplicate_image_name": 1, "image_info_invalid": 1,
            "too_many_images": 3, "document_truncated": 1},
    }


def test_bad_mmc4_input_is_counted(tmp_path):
    want = bad_mmc4_corpus(tmp_path / "in")
    report = run("mmc4", tmp_path / "in", tmp_path / "out", max_image_side=256)
    for key in ("documents_in", "documents_written", "images_written"):
        assert report[key] == want[key], key
    assert report["skipped"] == dict(sorted(want["skipped"].items()))
    assert report["documents_skipped"] == 6 and report["images_skipped"] == 12
    assert report["images_reencoded"] == {"downscaled": 1, "mode_CMYK": 1}
    recs = records_by_id(tmp_path / "out")
    good = recs["good"][0]
    assert [idx for _, idx in good.images] == [0, 1, 2]
    assert good.images[0][0] == img_bytes()
    many = recs["many"][0]  # spec 3.2: stop at the first image that does not fit, drop the rest
    assert len(many.images) == MAX_IMAGES and len(many.text_list) == MAX_IMAGES + 1
    assert list(recs["plain"][0].text_list) == ["just text"]


def test_max_images_matches_the_layout():
    from dreamjax.data.tokenize import LayoutConfig

    cfg = LayoutConfig()
    assert MAX_IMAGES == (cfg.max_length - 3) // cfg.drm_len


def test_bad_webdataset_pairs_llava_input(tmp_path):
    good = img_bytes()
    # a tar: a good pair, a good document with a dangling-link image, a pair without image, bad JSON,
    # then a member cut short by truncation
    (tmp_path / "t").mkdir()
    with tarfile.open(tmp_path / "t/a.tar", "w") as tf:
        add_member(tf, "0.json", json.dumps({"caption": "ok"}))
        add_member(tf, "0.jpg", good)
        add_member(tf, "0.jpg", b"a second member of the same name")
        add_member(tf, "1.json", json.dumps({"text_list": ["x"], "image_info": [
            {"image_name": "link.png", "matched_text_index": 0}, {"image_name": "0.png", "matched_text_index": 0}]}))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "nowhere.jpg"
        tf.addfile(link)
        add_member(tf, "2.json", json.dumps({"caption": "no image"}))
        add_member(tf, "3.json", "{bad")
        add_member(tf, "4.json", json.dumps({"caption": "cut"}))
        add_member(tf, "4.jpg", img_bytes(size=(64, 64)) * 4)
    data = (tmp_path / "t/a.tar").read_bytes()
    cut = data.index(b"4.jpg") + 512 + 100  # inside the data of the last member
    (tmp_path / "t/a.tar").write_bytes(data[:cut])
    report = run("webdataset", tmp_path / "t", tmp_path / "out")
    assert (report["documents_in"], report["documents_written"], report["images_written"]) == (5, 2, 2)
    assert report["skipped"] == {"duplicate_tar_member": 1, "image_missing": 1, "malformed_json": 1, "truncated_tar": 1,
                                 "unreadable_tar_member": 2}  # the dangling link, the cut member
    recs = records_by_id(tmp_path / "out")
    assert recs["1"][0] == InterleavedDoc(text_list=["x"], images=[(good, 0)])  # 0.png -> member 0.jpg

    # pairs: missing caption, URL, missing file, non-UTF-8 row, short TSV row
    write(tmp_path / "p/good.png", good)
    write(tmp_path / "p/caps.tsv", b"image\tcaption\ngood.png\tfine\nhttp://x/y.jpg\tremote\n"
                                   b"gone.png\tmissing\ngood.png\t\xff\xfe\ngood.png\n")
    report = run("pairs", tmp_path / "p", tmp_path / "out2")
    assert (report["documents_in"], report["documents_written"]) == (5, 1)
    assert report["skipped"] == {"image_is_url": 1, "image_missing": 1, "missing_keys": 1, "non_utf8_text": 1}

    # llava: unknown role, missing image, no conversations, an unreferenced image
    write(tmp_path / "l/good.png", good)
    write(tmp_path / "l/chat.json", json.dumps([
        {"id": "ok", "image": "good.png", "conversations": [{"from": "human", "value": "<image>?"},
                                                            {"from": "gpt", "value": "!"}]},
        {"id": "role", "conversations": [{"from": "robot", "value": "hi"}]},
        {"id": "gone", "image": "gone.png", "conversations": [{"from": "human", "value": "<image>"}]},
        {"id": "nothing"},
        {"id": "unref", "image": "good.png", "conversations": [{"from": "human", "value": "hi"}]},
    ]))
    report = run("llava", tmp_path / "l", tmp_path / "out3")
    assert (report["documents_in"], report["documents_written"], report["images_written"]) == (5, 2, 1)
    assert report["skipped"] == {"image_missing": 1, "image_unreferenced": 1, "missing_keys": 1, "unknown_role": 1}


# ----------------------------------------------------------------------------------------------------------
# Determinism, errors, reader


def test_idempotent_and_worker_independent(tmp_path):
    bad_mmc4_corpus(tmp_path / "in")
    write(tmp_path / "in/more.jsonl", jsonl([{"id": f"m{k}", "text_list": [str(k)]} for k in range(20)]))
    first = run("mmc4", tmp_path / "in", tmp_path / "out", num_shards=3)
    before = shard_bytes(tmp_path / "out")
    second = run("mmc4", tmp_path / "in", tmp_path / "out", num_shards=3)
    assert first == second and shard_bytes(tmp_path / "out") == before
    parallel = run("mmc4", tmp_path / "in", tmp_path / "out2", num_shards=3, workers=2)
    assert parallel == first and shard_bytes(tmp_path / "out2") == before
    # fewer shards: no stale shard is left behind
    run("mmc4", tmp_path / "in", tmp_path / "out", num_shards=2)
    assert len(list((tmp_path / "out").glob("*.array_record"))) == 2
    assert not (tmp_path / "out/.prepare-tmp").exists()


def test_grain_reads_the_shards(tmp_path):
    import grain

    run("synthetic", "pairs:train:5", tmp_path / "out", num_shards=2)
    src, info = open_prepared(tmp_path / "out")
    assert info["num_records"] == 5 and info["kinds"] == {"pair": 5} and len(info["shards"]) == 2
    ds = grain.MapDataset.source(pickle.loads(pickle.dumps(src)))
    assert len(ds) == 5 and all(isinstance(r, ImageTextPair) for r in ds)
    assert isinstance(src[-1], ImageTextPair)
    assert decode_image(src[0].image).shape == (64, 64, 3)  # what the training pipeline does with the bytes
    with pytest.raises(IndexError):
        src[5]


def test_input_errors_are_one_line(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    (tmp_path / "empty").mkdir()
    write(tmp_path / "zero.jsonl", b"")
    for inp in (tmp_path / "missing", tmp_path / "empty", tmp_path / "zero.jsonl"):
        args = parser.parse_args(["mmc4", "--input", str(inp), "--output", str(tmp_path / "o"), "--quiet"])
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("dreamjax prepare: error:") and err.count("\n") == 1, err
    # all documents bad: a report, and a non-zero exit
    write(tmp_path / "bad/docs.jsonl", "{nope\n")
    args = parser.parse_args(["mmc4", "--input", str(tmp_path / "bad"), "--output", str(tmp_path / "o2"), "--quiet"])
    assert main(args) == 1
    assert json.loads((tmp_path / "o2/report.json").read_text())["skipped"] == {"malformed_json": 1}
    with pytest.raises(ValueError, match="does not exist"):
        open_prepared(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not a prepared data directory"):
        open_prepared(tmp_path / "empty")
    with pytest.raises(ValueError, match="no records"):
        open_prepared(tmp_path / "o2")
