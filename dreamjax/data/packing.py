"""Optional sequence packing (`data.packing`; off by default because upstream DreamLLM does not pack).

Several short samples share one row of `max_length` tokens. The batch contract (DESIGN section 3) already
carries what the model needs: `segment_ids` (1, 2, 3, ... per packed sample, 0 = padding) make the LLM's
attention block-diagonal causal (`models/llama.py _segment_mask`: same nonzero segment), and `positions`
restart at 0 for each sample, so every sample sees exactly the RoPE phases and keys it would see alone.
Images stay in sample order within the row (the k-th `<im_start>` of the row takes `images_in[k]`, the k-th
`<dream_start>` `images_out[k]`), so a packed row's image slots are its samples' images, concatenated.

Loss: `lm_loss_sum` predicts `labels[p + 1]` from position p, so the first token of a segment would be a
target of the previous segment's last token. Its label is set to IGNORE_INDEX: nothing is learned across
a boundary, and a sample alone never has its first label as a target either, so each sample's loss terms
are exactly the ones it has unpacked.

Nothing is dropped. A sample reaches the packer already cut to one row (`PrepareExample` runs the layout's
length rules and `fit_sample`, and counts what they cut exactly as the unpacked pipeline does), so every
sample fits an empty row; a record with nothing left (`Example.sample is None`) is counted in `skips` as
unpacked and simply takes no room (unpacked, it would be an all-padding row).

The packer is a stream: this host's records, in order (`HostRows`: the same contiguous record blocks as
unpacked, so hosts read disjoint records), go first-fit into at most `open_rows` open rows (a row takes a
sample while its tokens and both image counts fit). A row is emitted when it is full (`max_length`
tokens) or when a sample fits no open row and every slot is taken: then the oldest open row goes, which
bounds how long a sample waits (at most `open_rows` evictions); a sample that fills a row on its own goes
out at once. Emitted rows fill batches of
`per_host_batch` rows in emission order.

Resume: the packer's state is small and JSON (`PackedBatchIterator.get_state`): the parent iterator's
state (the record cursor, whatever reads the records: threads or worker processes), the record indices
held in open rows and in emitted rows not yet batched, and the skips counted but not yet reported. The
records themselves are re-made on restore by random access (`host_records[i]`: every record is a pure
function of its global index and the seed), so a resumed run sees exactly the batches it would have seen.
Those indices are the host's own, so the state also names the host ([process index, count]) and resumes
only there: a packed run restarts on the process count it saved with.

With packing the hosts' batches are not slices of one global packing: each host packs its own records.
Hosts still read disjoint records, and over the records the union of all hosts is the single-process
record stream; what is no longer the same is which records share a row (it depends on the host count).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from dreamjax.data.tokenize import IGNORE_INDEX, Skips, TokenizedSample

DEFAULT_OPEN_ROWS = 16  # configs/common.py's `data.packing_rows`


def open_rows_of(packing: Any, packing_rows: Any = DEFAULT_OPEN_ROWS) -> int:
    """`config.data.packing` (a bool) and `config.data.packing_rows` (open rows, an integer >= 1) -> the
    pipeline's `packing` (open rows; 0: off). Anything else is a one-line ValueError."""
    if not isinstance(packing, (bool, np.bool_)):
        raise ValueError(f"config.data.packing must be False (off, as upstream) or True, got {packing!r} (the "
                         f"number of open rows is config.data.packing_rows)")
    if not packing:
        return 0
    if isinstance(packing_rows, (bool, np.bool_)) or not isinstance(packing_rows, (int, np.integer)) \
            or packing_rows < 1:
        raise ValueError(f"config.data.packing_rows must be an integer >= 1 (rows kept open for first-fit "
                         f"packing), got {packing_rows!r}")
    return int(packing_rows)


@dataclasses.dataclass(frozen=True)
class RowBudget:
    """What one row can hold: tokens and image slots of each kind."""

    max_length: int
    max_images_in: int
    max_images_out: int

    def size(self, sample: TokenizedSample) -> tuple[int, int, int]:
        """(tokens, input images, output images) a sample takes in a row; a ValueError when it exceeds an
        empty row (the pipeline cuts samples to one row before packing, so this is a bug upstream)."""
        size = (len(sample.ids), len(sample.images_in), len(sample.images_out))
        if any(s > c for s, c in zip(size, self.caps)):
            raise ValueError(f"packing: a sample of {size} (tokens, images in, images out) exceeds a row {self.caps}")
        return size

    @property
    def caps(self) -> tuple[int, int, int]:
        return self.max_length, self.max_images_in, self.max_images_out


@dataclasses.dataclass
class OpenRow:
    """A row being filled: its items (any payload, with the record index) in arrival order and what they use."""

    items: list[tuple[int, Any]]
    used: list[int]


class FirstFitPacker:
    """Streaming first-fit over at most `open_rows` rows (see the module doc). `add` returns the rows it
    emits (lists of (index, item)); `flush` emits the open rows. Deterministic: a pure function of the
    sequence of (index, size) it is given."""

    def __init__(self, budget: RowBudget, open_rows: int):
        if open_rows < 1:
            raise ValueError(f"packing: open_rows must be >= 1, got {open_rows}")
        self.budget, self.open_rows = budget, open_rows
        self.rows: list[OpenRow] = []  # oldest first

    def add(self, index: int, item: Any, size: tuple[int, int, int]) -> list[list[tuple[int, Any]]]:
        caps = self.budget.caps
        if size[0] == 0:
            return []
        emitted = []
        for r, row in enumerate(self.rows):
            if all(u + s <= c for u, s, c in zip(row.used, size, caps)):
                row.items.append((index, item))
                row.used = [u + s for u, s in zip(row.used, size)]
                if row.used[0] >= caps[0]:
                    emitted.append(self.rows.pop(r).items)
                return emitted
        row = OpenRow([(index, item)], list(size))
        if row.used[0] >= caps[0]:  # a full row on its own: out at once, the open rows stay
            return [row.items]
        if len(self.rows) >= self.open_rows:
            emitted.append(self.rows.pop(0).items)
        self.rows.append(row)
        return emitted

    def flush(self) -> list[list[tuple[int, Any]]]:
        out = [row.items for row in self.rows]
        self.rows = []
        return out


@dataclasses.dataclass
class PackedRow:
    """One row's samples concatenated, with per-token segment ids (1, 2, ...) and restarting positions."""

    sample: TokenizedSample
    segment_ids: np.ndarray  # [n] int32
    positions: np.ndarray  # [n] int32


def pack_row(samples: Sequence[TokenizedSample]) -> PackedRow:
    """Concatenate `samples` into one row. The label at each segment start becomes IGNORE_INDEX so that the
    shifted LM loss never predicts a sample's first token from the previous sample (see module doc)."""
    ids, labels, images_in, images_out, segs, pos = [], [], [], [], [], []
    for s in samples:
        if not s.ids:
            continue
        ids += s.ids
        labels += [IGNORE_INDEX, *s.labels[1:]]
        images_in += s.images_in
        images_out += s.images_out
        segs.append(np.full(len(s.ids), len(segs) + 1, np.int32))
        pos.append(np.arange(len(s.ids), dtype=np.int32))
    kind = "+".join(s.kind for s in samples if s.ids)
    empty = np.zeros(0, np.int32)
    return PackedRow(TokenizedSample(ids, labels, images_in, images_out, kind),
                     np.concatenate(segs) if segs else empty, np.concatenate(pos) if pos else empty)


def apply_packed_layout(batch: dict[str, np.ndarray], rows: Sequence[PackedRow]) -> dict[str, np.ndarray]:
    """Overwrite a collated batch's `segment_ids` and `positions` (padding: 0) with the packed rows' ones;
    tokens, labels and images were already laid out by `collate` from the rows' concatenated samples."""
    batch["segment_ids"][:] = 0
    batch["positions"][:] = 0
    for r, row in enumerate(rows):
        n = len(row.segment_ids)
        batch["segment_ids"][r, :n] = row.segment_ids
        batch["positions"][r, :n] = row.positions
    return batch


class PackedBatches(grain.IterDataset):
    """This host's Examples (an IterDataset over `host_records`, in order) -> packed batches.

    parent: iterates `host_records` from index 0 in order (possibly with read threads or worker processes);
    host_records: random access to the same Examples, for re-making the open rows on restore;
    collate_rows: list of lists of Examples (one list per row, `rows` of them) + skips -> batch dict."""

    def __init__(self, parent: grain.IterDataset, host_records: grain.MapDataset, budget: RowBudget,
                 open_rows: int, rows: int, collate_rows):
        super().__init__(parent)
        if rows < 1:
            raise ValueError(f"packing: rows per batch must be >= 1, got {rows}")
        FirstFitPacker(budget, open_rows)  # validates open_rows
        self._records, self._budget, self._open_rows = host_records, budget, open_rows
        self._rows, self._collate = rows, collate_rows

    def __iter__(self) -> PackedBatchIterator:
        return PackedBatchIterator(self._parent.__iter__(), self._records, self._budget, self._open_rows,
                                   self._rows, self._collate)


class PackedBatchIterator(grain.DatasetIterator):
    """See `PackedBatches`; its state: {"parent", "cursor", "open", "ready", "skips", "host"} (module doc).

    Its record indices are this host's (`HostRows`), so the state names the host, [process index, count],
    and only that host resumes it: another split of the global batch would read other records."""

    def __init__(self, parent: grain.DatasetIterator, host_records: grain.MapDataset, budget: RowBudget,
                 open_rows: int, rows: int, collate_rows):
        super().__init__(parent)
        self._records, self._budget, self._rows, self._collate = host_records, budget, rows, collate_rows
        self._packer = FirstFitPacker(budget, open_rows)
        self._ready: list[list[tuple[int, Any]]] = []  # emitted rows not batched yet
        self._cursor = 0  # host records consumed from the parent
        self._skips = Skips()  # counted, not reported in a batch yet
        self._exhausted = False
        self._host = getattr(host_records, "host", None)

    def _add(self, index: int, example) -> None:
        self._skips.merge(example.skips)
        if example.sample is None:
            return
        self._ready += self._packer.add(index, example, self._budget.size(example.sample))

    def __next__(self) -> dict[str, Any]:
        while len(self._ready) < self._rows and not self._exhausted:
            try:
                example = next(self._parent)
            except StopIteration:  # a finite source: the open rows go into a last, partly empty batch
                self._exhausted = True
                self._ready += self._packer.flush()
                break
            index, self._cursor = self._cursor, self._cursor + 1
            self._add(index, example)
        if not self._ready:
            raise StopIteration
        rows, self._ready = self._ready[: self._rows], self._ready[self._rows:]
        skips, self._skips = self._skips, Skips()
        return self._collate([[ex for _, ex in row] for row in rows], self._rows, skips)

    def get_state(self) -> dict[str, Any]:
        indices = lambda rows: [[int(i) for i, _ in row] for row in rows]  # noqa: E731
        return {"parent": self._parent.get_state(), "cursor": self._cursor,
                "open": indices(row.items for row in self._packer.rows), "ready": indices(self._ready),
                "skips": self._skips.as_dict(), "host": list(self._host) if self._host else None}

    def set_state(self, state: dict[str, Any]) -> None:
        saved = state.get("host")
        if saved and self._host and tuple(saved) != tuple(self._host):
            raise ValueError(f"packed data state of process {saved[0]} of {saved[1]} cannot resume on process "
                             f"{self._host[0]} of {self._host[1]}: its record indices are that host's")
        self._parent.set_state(state["parent"])
        self._cursor = int(state["cursor"])
        self._skips = Skips(state["skips"])
        self._exhausted = False
        remake = lambda row: [(int(i), self._records[int(i)]) for i in row]  # noqa: E731
        self._ready = [remake(row) for row in state["ready"]]
        self._packer.rows = []
        for row in state["open"]:
            items = remake(row)
            used = np.sum([self._budget.size(ex.sample) for _, ex in items], axis=0).tolist()
            self._packer.rows.append(OpenRow(items, [int(u) for u in used]))
