"""Throughput of the whole training input pipeline on MMC4-like documents, in documents per second.

    .venv/bin/python benchmarks/data_pipeline.py                 # 160 documents, all reading modes
    .venv/bin/python benchmarks/data_pipeline.py --docs 40 --tiny  # smoke run (small images)

What is timed is everything between the prepared shards and a training batch: ArrayRecord read, record
decode, weighted mixture + shuffle, tokenization (spec 3.2 joint layout: DRM + IMG per image, 2048 tokens),
JPEG decode, CLIP preprocessing (224 px) and diffusion preprocessing (512 px, random flip) of every image
the layout keeps, and collation into static-shape batches. The corpus is generated first (3-5 JPEG photos
of 512-1024 px per document with smooth content plus noise, 200-800 words) and written with `dreamjax
prepare mmc4`; the tokenizer is a LLaMA-like SentencePiece BPE trained on the corpus text.

Modes: `threads=0` (everything in the calling thread), `threads=T` (Grain read threads build whole batches
ahead), `workers=W` (Grain worker processes, `mp_prefetch`; their start-up is excluded by a warm-up batch).
A cProfile of the single-thread mode shows where the time goes. The 1-minute load average is printed:
numbers from a busy machine understate the pipeline; "per CPU-second" (documents per second of CPU time of
the reading process) does not depend on the load, and N idle cores give at most N times it.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from dreamjax.data.pipeline import SKIPS_KEY, PipelineConfig, make_dataset  # noqa: E402
from dreamjax.data.prepare import prepare  # noqa: E402
from dreamjax.data.prepared import open_mixture  # noqa: E402
from dreamjax.data.tokenize import LayoutConfig  # noqa: E402
from dreamjax.data.tokenizer import load_tokenizer  # noqa: E402

WORDS = ("the a of and to in is was for on that with as by at from this his her they which photo image "
         "garden house river city people children morning evening light colour green blue red water tree "
         "street market recipe kitchen table window mountain winter summer travel family friend story").split()


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def photo(rng: np.random.Generator, side_range: tuple[int, int]) -> bytes:
    """A JPEG of random size with photo-like statistics: smooth gradients and blobs plus mild noise."""
    w, h = (int(rng.integers(side_range[0], side_range[1] + 1)) for _ in range(2))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        fx, fy, phase = rng.uniform(0.002, 0.02, 2).tolist() + [rng.uniform(0, 6.28)]
        img[..., c] = 127 + 80 * np.sin(xx * fx + phase) * np.cos(yy * fy)
    img += rng.normal(0, 12, img.shape).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def sentences(rng: np.random.Generator, n_words: int) -> list[str]:
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), n_words)]
    out, i = [], 0
    while i < len(words):
        k = int(rng.integers(8, 20))
        out.append(" ".join(words[i: i + k]).capitalize() + ".")
        i += k
    return out


def make_corpus(root: Path, docs: int, side_range: tuple[int, int], seed: int = 0) -> Path:
    """MMC4 JSONL + image folder under `root/raw`."""
    rng = np.random.default_rng(seed)
    raw = root / "raw"
    (raw / "images").mkdir(parents=True)
    with open(raw / "docs.jsonl", "w") as f:
        for d in range(docs):
            text = sentences(rng, int(rng.integers(200, 801)))
            infos = []
            for k in range(int(rng.integers(3, 6))):
                name = f"{d:06d}_{k}.jpg"
                (raw / "images" / name).write_bytes(photo(rng, side_range))
                infos.append({"image_name": name, "matched_text_index": int(rng.integers(0, len(text)))})
            f.write(json.dumps({"id": f"doc{d}", "text_list": text, "image_info": infos}) + "\n")
    return raw


def make_tokenizer(root: Path, raw: Path) -> Path:
    """A LLaMA-style SentencePiece BPE (byte fallback, identity normalizer) trained on the corpus."""
    import sentencepiece as spm

    lines = [" ".join(json.loads(line)["text_list"]) for line in open(raw / "docs.jsonl")]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=600, model_type="bpe", byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, normalization_rule_name="identity",
        add_dummy_prefix=True, remove_extra_whitespaces=False)
    d = root / "tokenizer"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(model.getvalue())
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": True,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return d


def pipeline_config(args, **kw) -> PipelineConfig:
    return PipelineConfig(layout=LayoutConfig(mode="joint"), per_host_batch=args.batch,
                          max_images_in=args.max_images, max_images_out=args.max_images, resolution_in=args.res_in,
                          resolution_out=args.res_out, seed=0, **kw)


def measure(sources, weights, tok, cfg: PipelineConfig, batches: int) -> tuple[float, float, dict]:
    """(documents per wall second, documents per CPU second of this process, summed skips) over `batches`
    batches after one warm-up batch. The CPU rate does not depend on how busy the machine is (for worker
    processes it counts only the main process, so it is not shown for them)."""
    it = iter(make_dataset(sources, weights, tok, cfg))
    next(it)  # worker start-up, first reads
    skips: dict[str, int] = {}
    t, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        for k, v in next(it).pop(SKIPS_KEY).items():
            skips[k] = skips.get(k, 0) + v
    docs = batches * cfg.per_host_batch
    return docs / (time.perf_counter() - t), docs / (time.process_time() - cpu), skips


def token_efficiency(sources, weights, tok, cfg: PipelineConfig, batches: int) -> tuple[float, float, float]:
    """(fraction of non-padding tokens, samples per row, fraction of present image slots in + out) over
    `batches` batches: what sequence packing (`cfg.packing`) buys in useful tokens per step at the same
    batch shape. Records with nothing left (skipped by their layout) are not samples."""
    it = iter(make_dataset(sources, weights, tok, cfg))
    used = rows = segments = images = slots = 0
    for _ in range(batches):
        b = next(it)
        seg = b["segment_ids"]
        used, rows = used + int((seg > 0).sum()), rows + seg.shape[0]
        segments += int(seg.max(axis=1).sum())
        images += int(b["images_in_mask"].sum() + b["images_out_mask"].sum())
        slots += b["images_in_mask"].size + b["images_out_mask"].size
    return used / (rows * seg.shape[1]), segments / rows, images / slots


def caption_pairs(source, n: int) -> list:
    """Image-caption pairs (as LAION / BLIP-LAION in upstream's stage-2 mixture) made from the corpus: the
    first image of a document with its first sentence, for the mixed packing measurement."""
    from dreamjax.data.documents import ImageTextPair

    out = []
    for i in range(min(n, len(source))):
        doc = source[i]
        out.append(ImageTextPair(image=doc.images[0][0], caption=doc.text_list[0]))
    return out


def packing_line(sources, weights, tok, cfg: PipelineConfig, batches: int, open_rows: int) -> str:
    plain = token_efficiency(sources, weights, tok, cfg, batches)
    packed = token_efficiency(sources, weights, tok, dataclasses.replace(cfg, packing=open_rows), batches)
    return (f"packing (L={cfg.layout.max_length}, {cfg.max_images_in}/{cfg.max_images_out} images per row, "
            f"{open_rows} open rows, {batches} batches of {cfg.per_host_batch}): non-padding tokens "
            f"{plain[0]:.1%} unpacked -> {packed[0]:.1%} packed ({plain[1]:.2f} -> {packed[1]:.2f} samples per "
            f"row, image slots used {plain[2]:.1%} -> {packed[2]:.1%})")


def profile(sources, weights, tok, cfg: PipelineConfig, batches: int, top: int) -> str:
    it = iter(make_dataset(sources, weights, tok, cfg))
    next(it)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(batches):
        next(it)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--docs", type=int, default=160, help="documents in the generated corpus")
    p.add_argument("--batch", type=int, default=8, help="per-host batch size")
    p.add_argument("--batches", type=int, default=12, help="timed batches per mode")
    p.add_argument("--max-images", type=int, default=4,
                   help="images per row in and out (configs/common.py's default; a row past it is cut)")
    p.add_argument("--modes", default="threads=0,threads=2,workers=2", help="comma list of threads=T / workers=W")
    p.add_argument("--top", type=int, default=18, help="functions shown in the profile (0: no profile)")
    p.add_argument("--tiny", action="store_true", help="small images and resolutions (smoke run)")
    p.add_argument("--packing", type=int, default=16,
                   help="open rows for the token-efficiency measurement of sequence packing (0: skip it)")
    p.add_argument("--packing-batches", type=int, default=40, help="batches that measurement reads per side")
    args = p.parse_args()
    side = (48, 96) if args.tiny else (512, 1024)
    args.res_in, args.res_out = (32, 16) if args.tiny else (224, 512)

    print(f"load average at start: {load()}  ({os.cpu_count()} cores)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        raw = make_corpus(root, args.docs, side)
        tok = load_tokenizer(make_tokenizer(root, raw))
        report = prepare("mmc4", raw, root / "prepared", num_shards=4, progress=False)
        print(f"corpus: {report['documents_written']} documents, {report['images_written']} images "
              f"({sum(p.stat().st_size for p in (root / 'prepared').glob('*.array_record')) / 2**20:.0f} MiB "
              f"of shards), made and prepared in {time.perf_counter() - t:.0f} s")
        sources, weights = open_mixture({"mmc4": str(root / "prepared")}, {"mmc4": 1.0})
        for mode in args.modes.split(","):
            name, _, n = mode.partition("=")
            kw = {"read_threads": int(n)} if name == "threads" else {"num_workers": int(n), "read_threads": 1}
            rate, cpu_rate, skips = measure(sources, weights, tok, pipeline_config(args, **kw), args.batches)
            per_cpu = f"{cpu_rate:6.1f} per CPU-second" if name == "threads" else " " * 20
            print(f"{mode:>10}: {rate:6.1f} documents/s, {per_cpu}   (load {load()})   skips {skips}")
        if args.packing:
            cfg = pipeline_config(args, read_threads=0)
            print("MMC4-like", packing_line(sources, weights, tok, cfg, args.packing_batches, args.packing))
            mixed = {**sources, "pairs": caption_pairs(sources["mmc4"], args.docs)}
            print("MMC4-like + caption pairs 1:1", packing_line(mixed, {"mmc4": 1.0, "pairs": 1.0}, tok, cfg,
                                                                 args.packing_batches, args.packing))
        if args.top:
            print(f"\ncProfile, threads=0, {args.batches} batches (tottime: time in the function itself):")
            print(profile(sources, weights, tok, pipeline_config(args, read_threads=0), args.batches, args.top))
    print(f"load average at end: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
