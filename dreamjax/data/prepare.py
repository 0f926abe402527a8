"""`dreamjax prepare FORMAT --input PATH --output DIR`: raw data sets -> ArrayRecord shards (DESIGN 5).

Formats (one reader each in `data/sources/`): `mmc4` (JSONL documents + image folder), `webdataset` (tar
shards of MMC4 documents or pairs), `pairs` (TSV/JSONL/Parquet), `llava` (conversation JSON + image
folder), `synthetic` (the built-in shapes world). The output directory holds

    data-00000-of-0000N.array_record ...   one serialized record each (format in `data/prepared.py`),
                                           images as their original encoded bytes where possible
    info.json                              format, record kinds, shard names and counts (for the reader)
    report.json                            documents in / written, images written, skips by reason

We write ArrayRecord directly rather than through a TFDS builder (the plan in DESIGN 5): a builder needs
TensorFlow at preparation time and a fixed feature spec, stores tf.train.Example protos that only TF (or a
TFDS decoder) can parse, and hides the shard layout. Our records are plain bytes that
`grain.sources.ArrayRecordDataSource` reads in any process without TensorFlow, and `data/prepared.py`
decodes them into the typed records the tokenizer consumes.

Deterministic and idempotent: a record's shard is a stable hash of (input file name relative to the
input, record index in that file), each shard is written in (file, index) order, and nothing depends on
the number of workers, timing or absolute paths, so the same input gives byte-identical shards and
report. Bad input never crashes the run and is never dropped silently: each skipped record or image is
counted under its reason (`sources/base.py: REASONS`). Only an input that is missing or empty is an error.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import multiprocessing
import os
import shutil
import struct
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dreamjax.data.prepared import INFO_FILE, REPORT_FILE, encode_record
from dreamjax.data.sources import FORMATS, READERS
from dreamjax.data.sources.base import NOTES, Context, Counts

DEFAULT_NUM_SHARDS = 4
DEFAULT_MAX_IMAGE_SIDE = 1024  # keeps a 2:1 image's short side at 512, the diffusion resolution
ARRAY_RECORD_OPTIONS = "group_size:1"  # one record per chunk: cheap random access, as Grain recommends
TMP_DIR = ".prepare-tmp"
_FRAME = struct.Struct("<QIQ")  # record index in its file, shard, payload length


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def shard_name(shard: int, num_shards: int) -> str:
    return f"data-{shard:05d}-of-{num_shards:05d}.array_record"


def shard_of(name: str, index: int, num_shards: int) -> int:
    """A stable hash (same on every machine and Python) of (file name, record index) -> shard."""
    digest = hashlib.blake2b(f"{name}\0{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % num_shards


# ----------------------------------------------------------------------------------------------------------
# The entry point


def prepare(format: str, input: str | os.PathLike, output: str | os.PathLike, images: str | os.PathLike | None = None,
            num_shards: int = DEFAULT_NUM_SHARDS, workers: int | None = None,
            max_image_side: int = DEFAULT_MAX_IMAGE_SIDE, image_column: str | None = None,
            caption_column: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Convert `input` (a file, a folder, or for `synthetic` a spec) into shards in `output`; returns the
    report (also written to `output/report.json`). Raises ValueError for unusable arguments or input."""
    if format not in READERS:
        raise ValueError(f"unknown format {format!r}; choose from {', '.join(FORMATS)}")
    if num_shards < 1:
        raise ValueError(f"--num-shards must be >= 1, got {num_shards}")
    if max_image_side < 0:
        raise ValueError(f"--max-image-side must be >= 0 (0: never downscale), got {max_image_side}")
    workers = default_workers() if workers is None else max(1, int(workers))
    input, output = str(input), Path(output)
    ctx = Context(images=str(images) if images is not None else None, max_image_side=int(max_image_side))
    units = _units(format, input, ctx, workers, output, image_column, caption_column)
    output.mkdir(parents=True, exist_ok=True)
    tmp = output / TMP_DIR
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        jobs = [(format, unit, ctx, str(tmp / f"unit-{k:06d}.bin"), num_shards) for k, unit in enumerate(units)]
        totals = _run(jobs, workers, progress)
        shard_counts = _write_shards(jobs, output, num_shards)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report, info = _report(format, totals, shard_counts, num_shards, ctx)
    _write_json(output / INFO_FILE, info)
    _write_json(output / REPORT_FILE, report)
    return report


def _units(format: str, input: str, ctx: Context, workers: int, output: Path, image_column, caption_column):
    """The work list; files are split into parts only when there are fewer files than workers."""
    reader = READERS[format]
    if format != "synthetic":
        _check_input(input)
    extra = {"image_column": image_column, "caption_column": caption_column} if format == "pairs" else {}
    units = reader.units(input, ctx, 1, **extra)
    files = len({u.file_index for u in units})
    if 0 < files < workers:
        units = reader.units(input, ctx, -(-workers // files), **extra)
    out = output.resolve()
    units = [u for u in units if format == "synthetic" or out not in Path(u.path).resolve().parents]
    if not units:
        suffixes = ", ".join(f"*{s}" for s in getattr(reader, "SUFFIXES", ()))
        raise ValueError(f"no {format} input files ({suffixes}) found under {input}")
    return units


def _check_input(input: str) -> None:
    path = Path(input)
    if not path.exists():
        raise ValueError(f"input {input} does not exist")
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"input file {input} is empty")
    if path.is_dir() and not any(path.iterdir()):
        raise ValueError(f"input folder {input} is empty")


# ----------------------------------------------------------------------------------------------------------
# Reading (in worker processes): one unit -> a temporary file of framed records + counts


def _run_unit(job) -> dict[str, Any]:
    """Read one unit; write its records, in index order, to the job's temporary file."""
    format, unit, ctx, tmp_path, num_shards = job
    counts = Counts()
    docs_in, written, images = 0, 0, 0
    doc_skips: Counter = Counter()
    kinds: Counter = Counter()
    with open(tmp_path, "wb") as f:
        for index, outcome in READERS[format].read(unit, ctx, counts):
            docs_in += 1
            if isinstance(outcome, str):
                doc_skips[outcome] += 1
                continue
            outcome.fields.setdefault("id", f"{unit.name}#{index}")
            payload = encode_record(outcome.kind, outcome.fields, outcome.images)
            f.write(_FRAME.pack(index, shard_of(unit.name, index, num_shards), len(payload)))
            f.write(payload)
            written += 1
            images += len(outcome.images)
            kinds[outcome.kind] += 1
    return {"documents_in": docs_in, "documents_written": written, "images_written": images,
            "document_skips": doc_skips, "image_skips": counts.skipped, "reencoded": counts.reencoded,
            "kinds": kinds}


def _run(jobs: list, workers: int, progress: bool) -> dict[str, Any]:
    """Run every job (in a process pool when workers > 1) and sum the counts (order-independent)."""
    from tqdm import tqdm

    totals: dict[str, Any] = {"documents_in": 0, "documents_written": 0, "images_written": 0,
                              "document_skips": Counter(), "image_skips": Counter(), "reencoded": Counter(),
                              "kinds": Counter()}
    bar = tqdm(total=len(jobs), unit="part", desc="prepare", file=sys.stderr, disable=not progress)
    pool = None
    if workers > 1 and len(jobs) > 1:
        # spawn, not fork: the caller may have started threads (JAX, Grain) that fork would copy broken
        pool = multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)))
        results: Iterator = pool.imap_unordered(_run_unit, jobs)
    else:
        results = map(_run_unit, jobs)
    try:
        for res in results:
            for key, value in res.items():
                totals[key] += value
            bar.update(1)
            bar.set_postfix(docs=totals["documents_written"], skipped=sum(totals["document_skips"].values()))
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    return totals


# ----------------------------------------------------------------------------------------------------------
# Writing: merge the temporary files in (file, index) order into the shards


def _frames(tmp_path: str, file_index: int) -> Iterator[tuple[int, int, int, bytes]]:
    with open(tmp_path, "rb") as f:
        while head := f.read(_FRAME.size):
            index, shard, size = _FRAME.unpack(head)
            yield file_index, index, shard, f.read(size)


def _write_shards(jobs: list, output: Path, num_shards: int) -> list[int]:
    """Write every shard; returns the record count of each. Old shards in `output` are removed first, so a
    rerun with fewer shards leaves nothing stale behind."""
    from array_record.python.array_record_module import ArrayRecordWriter

    for old in output.glob("data-*-of-*.array_record"):
        old.unlink()
    writers = [ArrayRecordWriter(str(output / shard_name(s, num_shards)), ARRAY_RECORD_OPTIONS)
               for s in range(num_shards)]
    counts = [0] * num_shards
    by_file: dict[int, list[str]] = {}
    for _format, unit, _ctx, tmp_path, _n in jobs:
        by_file.setdefault(unit.file_index, []).append(tmp_path)
    try:
        for file_index in sorted(by_file):
            # the parts of one file hold interleaved indices, each part in order: merge them
            streams = [_frames(p, file_index) for p in by_file[file_index]]
            for _f, _index, shard, payload in heapq.merge(*streams, key=lambda r: r[1]):
                writers[shard].write(payload)
                counts[shard] += 1
    finally:
        for w in writers:
            w.close()
    return counts


def _report(format: str, totals: dict[str, Any], shard_counts: list[int], num_shards: int,
            ctx: Context) -> tuple[dict[str, Any], dict[str, Any]]:
    image_skips = totals["image_skips"]
    skipped = Counter(totals["document_skips"])
    skipped.update(image_skips)
    shards = [{"name": shard_name(s, num_shards), "num_records": n} for s, n in enumerate(shard_counts)]
    report = {
        "format": format,
        "documents_in": totals["documents_in"],
        "documents_written": totals["documents_written"],
        "documents_skipped": sum(totals["document_skips"].values()),
        "images_written": totals["images_written"],
        "images_skipped": sum(n for r, n in image_skips.items() if r not in NOTES),
        "images_reencoded": dict(sorted(totals["reencoded"].items())),
        "skipped": dict(sorted(skipped.items())),
        "kinds": dict(sorted(totals["kinds"].items())),
        "shards": [s["name"] for s in shards],
    }
    info = {
        "dreamjax_prepared": 1,
        "format": format,
        "kinds": report["kinds"],
        "num_records": totals["documents_written"],
        "num_images": totals["images_written"],
        "shards": shards,
        "max_image_side": ctx.max_image_side,
        "array_record_options": ARRAY_RECORD_OPTIONS,
        "record_encoding": "MAGIC 'DJX1' + uint32 LE header length + JSON header + image bytes (data/prepared.py)",
    }
    return report, info


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `dreamjax prepare` (the CLI calls this, then `main(args)`)."""
    parser.add_argument("format", choices=FORMATS, help="input format")
    parser.add_argument("--input", required=True,
                        help="input file or folder (synthetic: KIND:SPLIT:N[:SEED[:RESOLUTION]])")
    parser.add_argument("--output", required=True, help="output folder for the shards, info.json, report.json")
    parser.add_argument("--images", default=None,
                        help="image folder (default: INPUT/images for an mmc4 folder, else the input file's folder)")
    parser.add_argument("--num-shards", type=int, default=DEFAULT_NUM_SHARDS, help="number of output shards")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="worker processes (default: min(4, CPU count))")
    parser.add_argument("--max-image-side", type=int, default=DEFAULT_MAX_IMAGE_SIDE,
                        help="downscale images whose longer side exceeds this (0: never)")
    parser.add_argument("--image-column", default=None,
                        help="pairs: image column (default image, else url, image_path, filepath)")
    parser.add_argument("--caption-column", default=None, help="pairs: caption column (default caption, else text)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    """Run `prepare` from parsed flags; a user error is one line on stderr and exit code 2."""
    try:
        report = prepare(args.format, args.input, args.output, images=args.images, num_shards=args.num_shards,
                         workers=args.workers, max_image_side=args.max_image_side,
                         image_column=args.image_column, caption_column=args.caption_column,
                         progress=not args.quiet)
    except ValueError as e:
        print(f"dreamjax prepare: error: {e}", file=sys.stderr)
        return 2
    skipped = ", ".join(f"{k}={v}" for k, v in report["skipped"].items()) or "none"
    print(f"prepared {report['documents_written']}/{report['documents_in']} documents, "
          f"{report['images_written']} images into {args.output} (skipped: {skipped})", file=sys.stderr)
    if report["documents_written"] == 0:
        print(f"dreamjax prepare: error: no usable documents in {args.input} (see {args.output}/report.json)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m dreamjax.data.prepare")
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
