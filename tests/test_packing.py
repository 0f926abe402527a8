"""Sequence packing (`data/packing.py`, `data.packing`): segment ids, restarting positions, boundary labels,
image order, attention that never crosses segments, and the packed stream: no sample lost or split,
deterministic, exact resume from its (JSON) state, disjoint hosts, packing off unchanged."""

import collections
import functools
import json

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from dreamjax.data.packing import (
    DEFAULT_OPEN_ROWS,
    FirstFitPacker,
    PackedBatches,
    RowBudget,
    open_rows_of,
    pack_row,
)
from dreamjax.data.pipeline import (
    SKIPS_KEY,
    Example,
    HostRows,
    PipelineConfig,
    PrepareExample,
    make_dataset,
    mixture,
)
from dreamjax.data.synthetic import ShapesWorld
from dreamjax.data.tokenize import IGNORE_INDEX, LayoutConfig, TokenizedSample
from dreamjax.data.tokenizer import SpecialIds, build_word_tokenizer
from dreamjax.models.llama import Llama, LlamaConfig, init_params


def _sample(n, n_in=0, n_out=0, base=10, kind="t"):
    ids = list(range(base, base + n))
    return TokenizedSample(ids, [IGNORE_INDEX] + ids[1:], [f"{kind}in{k}" for k in range(n_in)],
                           [f"{kind}out{k}" for k in range(n_out)], kind)


def test_pack_row_segments_positions_labels_images():
    a, b, c = _sample(3, 1, 0, 10, "a"), _sample(4, 0, 1, 20, "b"), _sample(2, 1, 1, 30, "c")
    row = pack_row([a, b, c])
    assert row.sample.ids == a.ids + b.ids + c.ids
    np.testing.assert_array_equal(row.segment_ids, [1, 1, 1, 2, 2, 2, 2, 3, 3])
    np.testing.assert_array_equal(row.positions, [0, 1, 2, 0, 1, 2, 3, 0, 1])
    # each segment start is ignored (never predicted from the previous segment); the rest is kept
    assert row.sample.labels == [IGNORE_INDEX, 11, 12, IGNORE_INDEX, 21, 22, 23, IGNORE_INDEX, 31]
    assert row.sample.images_in == ["ain0", "cin0"] and row.sample.images_out == ["bout0", "cout0"]


def test_first_fit_respects_every_budget_emits_full_rows_and_evicts_the_oldest():
    budget = RowBudget(max_length=10, max_images_in=2, max_images_out=1)
    packer = FirstFitPacker(budget, open_rows=2)
    sizes = [(6, 0, 0), (5, 1, 0), (4, 0, 0), (3, 1, 1), (2, 1, 1), (9, 0, 0), (10, 0, 0), (0, 0, 0), (1, 0, 0)]
    emitted = []
    for i, size in enumerate(sizes):
        emitted += [[j for j, _ in row] for row in packer.add(i, f"r{i}", size)]
    # 0 -> row A; 1 -> row B; 2 fills A (6 + 4 = 10: emitted); 3 -> B (8 tokens, 2 in, 1 out); 4 fits no
    # row (B has no output slot left): A is gone, so it opens a row; 5 fits nowhere with 2 rows open: the
    # oldest (B) goes; 6 is a full row alone; 7 is empty (nothing); 8 joins the first row it fits (4's)
    assert emitted == [[0, 2], [1, 3], [6]]
    assert [[j for j, _ in row.items] for row in packer.rows] == [[4, 8], [5]]
    assert [[j for j, _ in row] for row in packer.flush()] == [[4, 8], [5]] and packer.rows == []
    with pytest.raises(ValueError, match="exceeds a row"):
        budget.size(_sample(11))
    with pytest.raises(ValueError, match="open_rows must be >= 1"):
        FirstFitPacker(budget, 0)


@pytest.mark.parametrize("packing, rows, want", [(False, 16, 0), (False, -3, 0), (True, 16, 16), (True, 3, 3)])
def test_config_values(packing, rows, want):
    assert open_rows_of(packing, rows) == want


@pytest.mark.parametrize("packing, rows, needle", [
    (1, 16, "config.data.packing must be False"), ("yes", 16, "config.data.packing must be False"),
    (None, 16, "config.data.packing must be False"), (True, 0, "config.data.packing_rows must be an integer"),
    (True, 2.5, "config.data.packing_rows must be an integer"), (True, True, "packing_rows must be an integer"),
])
def test_bad_config_values_are_one_line_errors(packing, rows, needle):
    with pytest.raises(ValueError, match=needle):
        open_rows_of(packing, rows)


# ---- the model ----------------------------------------------------------------------------------------------

VOCAB = 64
TINY = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, max_position_embeddings=64, initializer_range=0.3)


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, tokens, positions, segment_ids):
    return Llama(cfg).apply({"params": params}, tokens, positions, segment_ids=segment_ids, method=Llama.forward)


def test_llm_on_a_packed_row_gives_each_segment_its_solo_logits():
    """Block-diagonal causal attention + restarting positions: a segment's logits do not depend on its
    neighbours, so they equal the sample's logits alone (fp32)."""
    params = nn.unbox(init_params(TINY, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    samples = [TokenizedSample(list(rng.integers(1, VOCAB, n)), [0] * n) for n in (5, 9, 3, 7)]
    length = 32
    row = pack_row(samples)
    n = len(row.sample.ids)
    tokens, seg, pos = (np.zeros((1, length), np.int32) for _ in range(3))
    tokens[0, :n], seg[0, :n], pos[0, :n] = row.sample.ids, row.segment_ids, row.positions
    packed = np.asarray(_forward(TINY, params, jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg)))[0]
    start = 0
    for s in samples:
        m = len(s.ids)
        alone_tokens = np.zeros((1, length), np.int32)
        alone_tokens[0, :m] = s.ids
        alone_seg = (np.arange(length) < m).astype(np.int32)[None]
        alone_pos = np.arange(length, dtype=np.int32)[None]
        alone = np.asarray(_forward(TINY, params, jnp.asarray(alone_tokens), jnp.asarray(alone_pos),
                                    jnp.asarray(alone_seg)))[0]
        np.testing.assert_allclose(packed[start:start + m], alone[:m], atol=1e-5, rtol=1e-5)
        start += m
    # control: with one segment for the whole row the later segments' logits change (attention crosses)
    crossed = np.asarray(_forward(TINY, params, jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray((seg > 0) * 1)))[0]
    assert np.abs(crossed[5:n] - packed[5:n]).max() > 1e-2


# ---- the packed stream on its own (records are their own indices) -----------------------------------------

TOY_BUDGET = RowBudget(max_length=32, max_images_in=2, max_images_out=2)


def _toy_example(i):
    """Record i: a deterministic size (0 tokens = skipped by its layout, 32 = a full row), tagged with i."""
    rng = np.random.default_rng(i)
    n = int(rng.choice([0, 3, 7, 12, 20, 32], p=[0.1, 0.25, 0.25, 0.2, 0.15, 0.05]))
    if n == 0:
        return Example(None, {"empty_sample": 1})
    n_in, n_out = int(rng.integers(0, 2)), int(rng.integers(0, 2))
    return Example(TokenizedSample([i] * n, [i] * n, ["x"] * n_in, ["y"] * n_out, str(i)), {"seen": 1})


def _toy_rows(rows, num_rows, skips):
    return {"rows": [[int(ex.sample.kind) for ex in row] for row in rows], SKIPS_KEY: skips.as_dict()}


def _toy_iter(open_rows=3, rows=4, threads=0):
    records = grain.MapDataset.range(10_000).map(_toy_example)
    parent = records.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=8 if threads else 0))
    return iter(PackedBatches(parent, records, TOY_BUDGET, open_rows, rows, _toy_rows))


def test_packed_stream_loses_nothing_and_never_splits_a_record():
    it = _toy_iter()
    seen, skips = [], collections.Counter()
    for _ in range(60):
        batch = next(it)
        assert len(batch["rows"]) == 4
        for row in batch["rows"]:
            sizes = np.sum([(len(ex.sample.ids), len(ex.sample.images_in), len(ex.sample.images_out))
                            for ex in map(_toy_example, row)], axis=0)
            assert all(sizes <= TOY_BUDGET.caps) and row == sorted(row)  # fits, arrival order
        seen += [i for row in batch["rows"] for i in row]
        skips.update(batch[SKIPS_KEY])
    state = it.get_state()
    held = [i for row in state["open"] + state["ready"] for i in row]
    cursor = state["cursor"]
    nonempty = [i for i in range(cursor) if _toy_example(i).sample is not None]
    assert sorted(seen + held) == nonempty and len(set(seen + held)) == len(seen + held)  # each exactly once
    # every record's skips are reported once: in a batch, or pending in the state
    assert skips["seen"] + state["skips"].get("seen", 0) == len(nonempty)
    assert skips["empty_sample"] + state["skips"].get("empty_sample", 0) == cursor - len(nonempty) > 0
    assert len(state["open"]) <= 3
    assert len(seen) / (60 * 4) > 1.5  # it does pack


def test_packed_stream_is_deterministic_and_resumes_exactly_from_its_json_state():
    reference = [next(it) for it in [_toy_iter()] for _ in range(12)]
    assert [next(it) for it in [_toy_iter(threads=2)] for _ in range(12)] == reference  # threads change nothing
    for k in (1, 5):
        it = _toy_iter()
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        assert state["open"] or state["ready"]  # the records held in rows travel in the state
        resumed = _toy_iter(threads=2)
        resumed.set_state(state)
        assert [next(resumed) for _ in range(12 - k)] == reference[k:]


def test_a_finite_stream_ends_with_its_open_rows():
    records = grain.MapDataset.range(40).map(_toy_example)
    batches = list(PackedBatches(records.to_iter_dataset(), records, TOY_BUDGET, 3, 4, _toy_rows))
    seen = [i for b in batches for row in b["rows"] for i in row]
    assert sorted(seen) == [i for i in range(40) if _toy_example(i).sample is not None]


# ---- the pipeline -------------------------------------------------------------------------------------------

LENGTH = 96
WEIGHTS = dict(pairs=0.5, documents=0.5)


@functools.cache
def _world():
    world = ShapesWorld(seed=0, resolution=16)
    tok = build_word_tokenizer(world.vocabulary())
    sources = dict(pairs=world.pairs("train", 60), documents=world.documents("train", 60))
    return tok, sources


def _cfg(**kw):
    base = dict(layout=LayoutConfig(num_image_tokens=4, num_dream_queries=2, max_length=LENGTH), per_host_batch=4,
                max_images_in=3, max_images_out=2, resolution_in=16, resolution_out=16, seed=5, read_threads=0)
    return PipelineConfig(**{**base, **kw})


def _iter(cfg, process_index=0, process_count=1):
    tok, sources = _world()
    return iter(make_dataset(sources, WEIGHTS, tok, cfg, process_index=process_index, process_count=process_count))


def _take(it, steps):
    return [next(it) for _ in range(steps)]


def _host_examples(cfg, process_index=0, process_count=1):
    """This host's Examples by host-local index (what the packed pipeline reads), and their global indices."""
    tok, sources = _world()
    examples = mixture(sources, WEIGHTS, cfg.seed).random_map(
        PrepareExample(tok, SpecialIds.from_tokenizer(tok), cfg), seed=cfg.seed)
    args = (cfg.per_host_batch * process_count, cfg.per_host_batch, process_index)
    return HostRows(examples, *args), HostRows(grain.MapDataset.range(10**9), *args)


def _segments(batches):
    """Every packed segment: (tokens, labels, images_in, images_out), checking the row layout on the way."""
    out = []
    for b in batches:
        for r in range(b["tokens"].shape[0]):
            seg, pos = b["segment_ids"][r], b["positions"][r]
            n = int((seg > 0).sum())
            assert np.all(seg[n:] == 0) and np.all(pos[n:] == 0) and np.all(b["labels"][r, n:] == IGNORE_INDEX)
            k_in = k_out = 0
            for s in range(1, int(seg.max()) + 1):
                idx = np.flatnonzero(seg == s)
                assert idx.size and np.array_equal(idx, np.arange(idx[0], idx[0] + idx.size))  # contiguous
                np.testing.assert_array_equal(pos[idx], np.arange(idx.size))
                toks = b["tokens"][r, idx]
                labels = b["labels"][r, idx]
                assert labels[0] == IGNORE_INDEX  # never a target of the previous segment
                specials = SpecialIds.from_tokenizer(_world()[0])
                m_in, m_out = int((toks == specials.im_start).sum()), int((toks == specials.dream_start).sum())
                out.append((toks.tolist(), labels[1:].tolist(), b["images_in"][r, k_in:k_in + m_in],
                            b["images_out"][r, k_out:k_out + m_out]))
                k_in, k_out = k_in + m_in, k_out + m_out
            assert b["images_in_mask"][r].sum() == k_in and b["images_out_mask"][r].sum() == k_out
    return out


def _key(toks, labels):
    return json.dumps([toks, labels])


def _check_rows_are_the_host_records(batches, state, cfg, process_index=0, process_count=1):
    """The emitted segments plus the records held in the state are exactly this host's non-empty records
    [0, cursor), each once, whole (tokens, labels after the first, images); returns their global indices."""
    host, global_index = _host_examples(cfg, process_index, process_count)
    cursor = state["cursor"]
    held = {i for row in state["open"] + state["ready"] for i in row}
    expected = collections.defaultdict(list)
    for i in range(cursor):
        ex = host[i]
        if ex.sample is not None and i not in held:
            expected[_key(ex.sample.ids, ex.sample.labels[1:])].append(ex)
    segments = _segments(batches)
    assert len(segments) == sum(len(v) for v in expected.values())
    for toks, labels, im_in, im_out in segments:
        matches = expected[_key(toks, labels)]
        assert matches, "a packed segment is not one whole record of this host"
        ex = matches.pop()
        np.testing.assert_array_equal(im_in, np.stack(ex.sample.images_in) if ex.sample.images_in else im_in[:0])
        np.testing.assert_array_equal(im_out, np.stack(ex.sample.images_out) if ex.sample.images_out else im_out[:0])
    return {global_index[i] for i in range(cursor)}


def test_packed_batches_hold_every_record_once_whole_with_its_images_and_resume_exactly():
    cfg = _cfg(packing=4)
    it = _iter(cfg)
    batches = _take(it, 6)
    state = it.get_state()
    _check_rows_are_the_host_records(batches, state, cfg)
    assert batches[0]["tokens"].shape == (4, LENGTH)
    assert np.mean([(b["segment_ids"].max(axis=1)).mean() for b in batches]) > 1.3  # it does pack
    # determinism, threads, exact resume from the JSON state (re-made open rows)
    more = _take(it, 3)
    again = _take(_iter(_cfg(packing=4, read_threads=2, prefetch_batches=2)), 9)
    resumed = _iter(_cfg(packing=4, read_threads=2))
    resumed.set_state(json.loads(json.dumps(state)))
    for got, want in zip(again[6:] + _take(resumed, 3), more + more):
        for key in want:
            if key == SKIPS_KEY:
                assert got[key] == want[key]
            else:
                np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    for got, want in zip(again, batches):
        np.testing.assert_array_equal(got["tokens"], want["tokens"])


def test_worker_processes_give_the_same_packed_batches_and_resume_exactly():
    reference = _take(_iter(_cfg(packing=4)), 5)
    it = _iter(_cfg(packing=4, num_workers=2, read_threads=1))
    got = _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    del it
    resumed = _iter(_cfg(packing=4, num_workers=2, read_threads=1))
    resumed.set_state(state)
    got += _take(resumed, 2)
    for g, w in zip(got, reference):
        for key in w:
            if key != SKIPS_KEY:
                np.testing.assert_array_equal(g[key], w[key], err_msg=key)


def test_two_hosts_pack_disjoint_records():
    cfg = _cfg(per_host_batch=2, packing=3)
    seen = []
    for k in range(2):
        it = _iter(cfg, k, 2)
        batches = _take(it, 5)
        seen.append(_check_rows_are_the_host_records(batches, it.get_state(), cfg, k, 2))
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    # HostRows' blocks: host 0 reads global records 0, 1, 4, 5, ..., host 1 reads 2, 3, 6, 7, ...
    assert {i % 4 for i in seen[0]} == {0, 1} and {i % 4 for i in seen[1]} == {2, 3}


def test_packing_off_keeps_the_unpacked_layout():
    """Packing off (the default): one segment per row, positions 0..L-1, and `packing=0` is the default."""
    a, b = _take(_iter(_cfg()), 1)[0], _take(_iter(_cfg(packing=0)), 1)[0]
    for key in a:
        if key != SKIPS_KEY:
            np.testing.assert_array_equal(a[key], b[key])
    assert a["segment_ids"].max() <= 1
    np.testing.assert_array_equal(a["positions"], np.broadcast_to(np.arange(LENGTH), a["positions"].shape))


def test_train_config_wires_data_packing():
    from configs.common import base_config
    from dreamjax.train.loop import pipeline_config

    config = base_config()
    assert config.data.packing is False
    mcfg = ConfigDict(dict(num_image_tokens=4, num_dream_queries=2, vision=ConfigDict(dict(image_size=16))))
    assert pipeline_config(config, mcfg, 4).packing == 0
    config.data.packing = True
    assert pipeline_config(config, mcfg, 4).packing == DEFAULT_OPEN_ROWS == config.data.packing_rows
    config.data.packing_rows = 8
    assert pipeline_config(config, mcfg, 4).packing == 8
    config.data.packing_rows = 0
    with pytest.raises(ValueError, match="config.data.packing_rows must be an integer >= 1"):
        pipeline_config(config, mcfg, 4)
