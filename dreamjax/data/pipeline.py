"""The Grain input pipeline: sources -> seeded shuffle -> weighted mixture -> per-host shard ->
decode + tokenize (spec section 3 layouts, `data/tokenize.py`) -> static-shape batches (`data/collate.py`,
DESIGN section 3).

Deterministic for a given seed and host count, checkpointable (Grain iterator state), and lossless in
accounting: a record that cannot be used (nothing left after truncation, a pair whose image is bad, ...)
becomes an all-padding row of its batch and is counted by reason in the batch's `skips` entry, so batch
shapes stay static and nothing disappears silently. An image that fails to decode costs only that image
where the layout allows it (spec 3.2: an interleaved document keeps the rest).

Batches are built on the `MapDataset` (one element = one host batch), so the reading parallelism (threads
of `ReadOptions`, worker processes of `mp_prefetch`) only changes *when* a batch is made, never which
records it holds: any `read_threads` / `num_workers` gives the same batches, and Grain's iterator state
(the next batch index, per worker with `mp_prefetch`) resumes exactly.

With `PipelineConfig.packing` (off by default, as upstream) the host's records are read in order by those
threads / workers and packed into rows in the reading process (`data/packing.py`: its state, saved with
the rest, holds the record cursor and the records in open rows).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from dreamjax.data import images as imgs
from dreamjax.data.collate import collate, fit_sample
from dreamjax.data.documents import Conversation, ImageTextPair, Record
from dreamjax.data.packing import PackedBatches, RowBudget, apply_packed_layout, pack_row
from dreamjax.data.tokenize import LayoutConfig, Skips, TokenizedSample, tokenize
from dreamjax.data.tokenizer import SpecialIds

SKIPS_KEY = "skips"  # batch entry: {reason: count} for the records of this batch
# An image that failed to decode in the pipeline (counted once per image). What it cost is counted by the
# layout as well: `corrupt_image` (an interleaved image, both uses), `pair_corrupt_image` (the pair) or
# `conversation_corrupt_image` (the conversation).
IMAGE_DECODE_ERROR = "image_decode_error"


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    layout: LayoutConfig
    per_host_batch: int
    max_images_in: int
    max_images_out: int
    resolution_in: int = 224  # CLIP input side
    resolution_out: int = 512  # diffusion image side
    random_flip: bool = True  # diffusion-side flip, as upstream's SD processor (spec 1.1)
    seed: int = 0
    num_workers: int = 0  # Grain worker processes (0: in the training process)
    read_threads: int = 2  # threads building batches ahead, in each reading process (0: on demand)
    prefetch_batches: int = 4  # batches buffered ahead by those threads (bounds the memory they hold)
    # Sequence packing (`data/packing.py`; off as upstream): 0 = one sample per row, N > 0 = samples packed
    # first-fit into N open rows per host (segment ids, restarting positions).
    packing: int = 0
    # Fast image path: JPEGs decoded at a reduced DCT scale when at least twice the largest side they are
    # needed at (`images.decode_pil(draft_side=...)`), and only the crop windows resized (`images.resize_crop`).
    # Same shapes, pixels within a few levels of the exact path; False: exactly upstream's preprocessing.
    jpeg_draft: bool = True


@dataclasses.dataclass
class Example:
    """One tokenized record with its images already decoded and preprocessed (or why it was dropped)."""

    sample: TokenizedSample | None
    skips: dict[str, int]


class PrepareExample(grain.transforms.RandomMap):
    """record -> Example: tokenize, then decode + preprocess every image the layout kept.

    The sample is cut to the batch's length and image budget (`fit_sample`, as collation would) before any
    image is decoded, so images past the budget cost nothing, and each image is decoded once, even when the
    layout uses it twice (joint mode: DRM then IMG). An image that fails to decode is marked corrupt in the
    record and the record is tokenized again from the same random state, so the layout skips that image's
    CLIP and diffusion uses together and keeps the rest (spec 3.2; a pair or a conversation that needs the
    image is skipped by its layout), with the same random choices as if it had been flagged from the start.
    """

    def __init__(self, tokenizer, specials: SpecialIds, cfg: PipelineConfig):
        self.tokenizer, self.specials, self.cfg = tokenizer, specials, cfg

    def random_map(self, record: Any, rng: np.random.Generator) -> Example:
        start = rng.bit_generator.state
        # id(ref) -> (ref, pixels, the side the decode keeps); holding ref keeps its id unique
        decoded: dict[int, tuple[Any, Any, int]] = {}
        failed: set[int] = set()
        while True:
            skips = Skips()
            skips.add(IMAGE_DECODE_ERROR, len(failed))
            sample = tokenize(record, self.tokenizer, self.cfg.layout, rng=rng, skips=skips, specials=self.specials)
            if sample is None:
                return Example(None, skips.as_dict())
            sample = fit_sample(sample, self.cfg.layout.max_length, self.cfg.max_images_in, self.cfg.max_images_out,
                                self.specials, skips)
            new = self._decode(sample, decoded, self._draft_sides(sample))
            if not new:
                break
            failed |= new
            record = mark_corrupt(record, failed)
            rng.bit_generator.state = start
        pixels_in = [self._clip(decoded[id(ref)][1]) for ref in sample.images_in]
        pixels_out = [self._diffusion(decoded[id(ref)][1], rng) for ref in sample.images_out]
        return Example(dataclasses.replace(sample, images_in=pixels_in, images_out=pixels_out), skips.as_dict())

    def _draft_sides(self, sample: TokenizedSample) -> dict[int, int] | None:
        """With `cfg.jpeg_draft`: id(ref) -> the largest side the image is needed at (CLIP input, diffusion
        target or both), the least a reduced-scale JPEG decode must keep."""
        if not self.cfg.jpeg_draft:
            return None
        sides = {id(ref): self.cfg.resolution_in for ref in sample.images_in}
        for ref in sample.images_out:
            sides[id(ref)] = max(sides.get(id(ref), 0), self.cfg.resolution_out)
        return sides

    @staticmethod
    def _decode(sample: TokenizedSample, decoded: dict, sides: dict[int, int] | None = None) -> set[int]:
        """Decode every image of `sample` not decoded yet (or decoded at a reduced scale that is now too
        small for its uses); returns the ids of those that failed."""
        failed = set()
        for ref in (*sample.images_in, *sample.images_out):
            side = sides[id(ref)] if sides else None
            if id(ref) in failed or (id(ref) in decoded and (side or 0) <= decoded[id(ref)][2]):
                continue
            try:
                decoded[id(ref)] = (ref, load_image(ref, side), side or 1 << 30)
            except imgs.ImageDecodeError:
                failed.add(id(ref))
        return failed

    def _clip(self, pixels) -> np.ndarray:
        return imgs.clip_preprocess(pixels, self.cfg.resolution_in, window=self.cfg.jpeg_draft)

    def _diffusion(self, pixels, rng) -> np.ndarray:
        return imgs.diffusion_preprocess(pixels, self.cfg.resolution_out, random_flip=self.cfg.random_flip, rng=rng,
                                         window=self.cfg.jpeg_draft)


def load_image(ref, draft_side: int | None = None) -> np.ndarray | Image.Image:
    """The image loader of both record sources: synthetic records carry uint8 arrays (used as they are),
    prepared ones carry encoded bytes, decoded here into an RGB PIL image that both preprocessing paths
    resize directly (`ImageDecodeError` when the bytes cannot be decoded); with `draft_side`, a large JPEG
    is decoded at a reduced scale that keeps its shortest side >= `draft_side` (`images.decode_pil`)."""
    if isinstance(ref, np.ndarray) and ref.dtype == np.uint8 and ref.ndim == 3:
        return ref
    return imgs.decode_pil(ref, draft_side=draft_side)


def mark_corrupt(record: Record, failed: set[int]) -> Record:
    """`record` with every image whose `id()` is in `failed` flagged corrupt (the layouts skip those)."""
    if isinstance(record, ImageTextPair):
        return dataclasses.replace(record, corrupt=record.corrupt or id(record.image) in failed)
    if isinstance(record, Conversation):
        refs = list(record.images)
    else:  # InterleavedDoc, InstructInterleavedDoc: (image, matched_text_index) pairs
        refs = [image for image, _ in record.images]
    bad = frozenset(k for k, ref in enumerate(refs) if id(ref) in failed)
    return dataclasses.replace(record, corrupt=frozenset(record.corrupt) | bad)


def collate_examples(examples: Sequence[Example], cfg: PipelineConfig, specials: SpecialIds) -> dict[str, Any]:
    """Examples -> one static-shape batch; dropped records become all-padding rows."""
    skips = Skips()
    empty = TokenizedSample(ids=[], labels=[])
    samples = []
    for ex in examples:
        skips.merge(ex.skips)
        samples.append(ex.sample if ex.sample is not None else empty)
    batch = _collate(samples, cfg, specials, skips)
    batch[SKIPS_KEY] = skips.as_dict()
    return batch


def _collate(samples: Sequence[TokenizedSample], cfg: PipelineConfig, specials: SpecialIds,
             skips: Skips) -> dict[str, Any]:
    """`collate` at this pipeline's sizes, on samples whose images are already preprocessed arrays."""
    r_in, r_out = cfg.resolution_in, cfg.resolution_out
    return collate(
        samples, cfg.layout.max_length, cfg.max_images_in, cfg.max_images_out, specials=specials,
        load_in=lambda x: x, load_out=lambda x: x, in_shape=(r_in, r_in, 3), out_shape=(r_out, r_out, 3),
        skips=skips,
    )


@dataclasses.dataclass(frozen=True)
class CollateExamples:
    """`collate_examples` as a picklable batch function (Grain worker processes)."""

    cfg: PipelineConfig
    specials: SpecialIds

    def __call__(self, examples: Sequence[Example]) -> dict[str, Any]:
        return collate_examples(examples, self.cfg, self.specials)


def collate_packed(rows: Sequence[Sequence[Example]], num_rows: int, skips: Skips, cfg: PipelineConfig,
                   specials: SpecialIds) -> dict[str, Any]:
    """Packed rows (each a list of Examples, in order) -> one static-shape batch of `num_rows` rows (rows
    past `rows` are all padding): each row's samples concatenated (`pack_row`), laid out by `collate` like
    single samples, then given their segment ids and restarting positions."""
    packed = [pack_row([ex.sample for ex in row]) for row in rows]
    packed += [pack_row([])] * (num_rows - len(packed))
    batch = apply_packed_layout(_collate([row.sample for row in packed], cfg, specials, skips), packed)
    batch[SKIPS_KEY] = skips.as_dict()
    return batch


@dataclasses.dataclass(frozen=True)
class CollatePacked:
    """`collate_packed` as the batch function of `PackedBatches`."""

    cfg: PipelineConfig
    specials: SpecialIds

    def __call__(self, rows: Sequence[Sequence[Example]], num_rows: int, skips: Skips) -> dict[str, Any]:
        return collate_packed(rows, num_rows, skips, self.cfg, self.specials)


def mixture(sources: Mapping[str, Sequence], weights: Mapping[str, float], seed: int) -> grain.MapDataset:
    """Each source shuffled with its own seed and repeated, then mixed by weight (an endless dataset)."""
    names = [n for n in sources if weights.get(n, 0) > 0]
    if not names:
        raise ValueError(f"mixture: no source has a positive weight (sources {list(sources)}, weights "
                         f"{dict(weights)})")
    for n in names:
        if len(sources[n]) == 0:
            raise ValueError(f"mixture: source {n!r} is empty")
    parts = [grain.MapDataset.source(sources[n]).shuffle(seed=seed + i).repeat() for i, n in enumerate(names)]
    if len(parts) == 1:
        return parts[0]
    return grain.MapDataset.mix(parts, weights=[float(weights[n]) for n in names])


class HostRows(grain.MapDataset):
    """This host's rows of every global batch: record `b * G + k * per_host + j` of the global stream (global
    batch `b`, host `k`, row `j`) is this host's record `b * per_host + j`. Hosts read contiguous row blocks,
    which is the order `jax.make_array_from_process_local_data` puts them in, so any number of processes
    builds exactly the global batches (rows in the same order) of a single process."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, per_host: int, process_index: int):
        super().__init__(parent)
        if global_batch % per_host or not 0 <= process_index < global_batch // per_host:
            raise ValueError(f"HostRows: process {process_index} with {per_host} of {global_batch} rows per batch")
        self._global, self._per_host, self._offset = global_batch, per_host, process_index * per_host
        self.host = (process_index, global_batch // per_host)  # (process index, process count)

    def __len__(self) -> int:
        return len(self._parent) // self._global * self._per_host

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, self._per_host)
        return self._parent[batch * self._global + self._offset + row]


def make_dataset(sources: Mapping[str, Sequence], weights: Mapping[str, float], tokenizer, cfg: PipelineConfig,
                 *, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """The full pipeline for this host: an iterable of batches (numpy dicts + `skips`)."""
    specials = SpecialIds.from_tokenizer(tokenizer)
    ds = mixture(sources, weights, cfg.seed)
    # Per-record randomness is drawn from the record's index in the *global* stream, before the host split,
    # so the batches do not depend on how many hosts read them.
    ds = ds.random_map(PrepareExample(tokenizer, specials, cfg), seed=cfg.seed)
    if cfg.packing:
        return _packed_dataset(ds, cfg, specials, process_index, process_count)
    ds = HostRows(ds, cfg.per_host_batch * process_count, cfg.per_host_batch, process_index)
    # Batch before going iterable: threads and worker processes then share out whole batches, so they
    # cannot change a batch's rows (IterDataset.batch after mp_prefetch's slicing would).
    ds = ds.batch(cfg.per_host_batch, drop_remainder=True, batch_fn=CollateExamples(cfg, specials))
    threads = max(0, int(cfg.read_threads))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(0, cfg.prefetch_batches)
                                              if threads else 0))
    if cfg.num_workers > 0:
        _absl_flags_ready()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    return it


def _packed_dataset(ds: grain.MapDataset, cfg: PipelineConfig, specials: SpecialIds, process_index: int,
                    process_count: int) -> grain.IterDataset:
    """Examples -> this host's records (the contiguous blocks of `HostRows`, as unpacked), read in order by
    threads / worker processes -> packed batches (`data/packing.py`; the packer itself runs here, in order,
    so its rows do not depend on `read_threads` or `num_workers`)."""
    if int(cfg.packing) < 0:
        raise ValueError(f"PipelineConfig.packing must be >= 0 (open rows; 0: off), got {cfg.packing}")
    host = HostRows(ds, cfg.per_host_batch * process_count, cfg.per_host_batch, process_index)
    threads = max(0, int(cfg.read_threads))
    buffer = max(0, cfg.prefetch_batches) * cfg.per_host_batch if threads else 0
    it = host.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer))
    if cfg.num_workers > 0:
        _absl_flags_ready()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    budget = RowBudget(cfg.layout.max_length, cfg.max_images_in, cfg.max_images_out)
    return PackedBatches(it, host, budget, int(cfg.packing), cfg.per_host_batch, CollatePacked(cfg, specials))


def _absl_flags_ready() -> None:
    """Grain's worker processes read absl flags (their defaults here); a program that does not parse absl
    flags itself (our CLI uses argparse, or pytest) would otherwise fail with UnparsedFlagAccessError."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
