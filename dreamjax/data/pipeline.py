"""The Grain input pipeline: sources -> seeded shuffle -> weighted mixture -> per-host shard ->
decode + tokenize (spec section 3 layouts, `data/tokenize.py`) -> static-shape batches (`data/collate.py`,
DESIGN section 3).

Deterministic for a given seed and host count, checkpointable (Grain iterator state), and lossless in
accounting: a record that cannot be used (corrupt image, nothing left after truncation, ...) becomes an
all-padding row of its batch and is counted by reason in the batch's `skips` entry, so batch shapes stay
static and nothing disappears silently.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from dreamjax.data import images as imgs
from dreamjax.data.collate import collate
from dreamjax.data.tokenize import LayoutConfig, Skips, TokenizedSample, tokenize
from dreamjax.data.tokenizer import SpecialIds

SKIPS_KEY = "skips"  # batch entry: {reason: count} for the records of this batch


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


@dataclasses.dataclass
class Example:
    """One tokenized record with its images already decoded and preprocessed (or why it was dropped)."""

    sample: TokenizedSample | None
    skips: dict[str, int]


class PrepareExample(grain.transforms.RandomMap):
    """record -> Example: tokenize, then decode + preprocess every image the layout kept."""

    def __init__(self, tokenizer, specials: SpecialIds, cfg: PipelineConfig):
        self.tokenizer, self.specials, self.cfg = tokenizer, specials, cfg

    def random_map(self, record: Any, rng: np.random.Generator) -> Example:
        skips = Skips()
        sample = tokenize(record, self.tokenizer, self.cfg.layout, rng=rng, skips=skips, specials=self.specials)
        if sample is None:
            return Example(None, skips.as_dict())
        try:
            pixels_in = [self._clip(ref) for ref in sample.images_in]
            pixels_out = [self._diffusion(ref, rng) for ref in sample.images_out]
        except imgs.ImageDecodeError:
            skips.add("image_decode_error")
            return Example(None, skips.as_dict())
        sample = dataclasses.replace(sample, images_in=pixels_in, images_out=pixels_out)
        return Example(sample, skips.as_dict())

    def _clip(self, ref) -> np.ndarray:
        return imgs.clip_preprocess(_as_uint8(ref), self.cfg.resolution_in)

    def _diffusion(self, ref, rng) -> np.ndarray:
        return imgs.diffusion_preprocess(
            _as_uint8(ref), self.cfg.resolution_out, random_flip=self.cfg.random_flip, rng=rng
        )


def _as_uint8(ref) -> np.ndarray:
    if isinstance(ref, np.ndarray) and ref.dtype == np.uint8 and ref.ndim == 3:
        return ref
    return imgs.decode_image(ref)


def collate_examples(examples: Sequence[Example], cfg: PipelineConfig, specials: SpecialIds) -> dict[str, Any]:
    """Examples -> one static-shape batch; dropped records become all-padding rows."""
    skips = Skips()
    empty = TokenizedSample(ids=[], labels=[])
    samples = []
    for ex in examples:
        skips.merge(ex.skips)
        samples.append(ex.sample if ex.sample is not None else empty)
    r_in, r_out = cfg.resolution_in, cfg.resolution_out
    batch = collate(
        samples, cfg.layout.max_length, cfg.max_images_in, cfg.max_images_out, specials=specials,
        load_in=lambda x: x, load_out=lambda x: x, in_shape=(r_in, r_in, 3), out_shape=(r_out, r_out, 3),
        skips=skips,
    )
    batch[SKIPS_KEY] = skips.as_dict()
    return batch


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
    ds = HostRows(ds, cfg.per_host_batch * process_count, cfg.per_host_batch, process_index)
    it = ds.to_iter_dataset()
    it = it.batch(cfg.per_host_batch, drop_remainder=True,
                  batch_fn=lambda exs: collate_examples(exs, cfg, specials))
    if cfg.num_workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    return it
