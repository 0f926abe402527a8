"""The Grain pipeline split over processes: each host's batch is its contiguous block of the global batch, so
two (or four) processes build exactly the global batches of one process, row for row."""

import json

import numpy as np
import pytest

from dreamjax.data.pipeline import SKIPS_KEY, PipelineConfig, make_dataset
from dreamjax.data.synthetic import ShapesWorld
from dreamjax.data.tokenize import LayoutConfig
from dreamjax.data.tokenizer import build_word_tokenizer

GLOBAL = 8


def _iterator(world, tok, per_host, k, n, packing=0):
    cfg = PipelineConfig(layout=LayoutConfig(num_image_tokens=4, num_dream_queries=2, max_length=64),
                         per_host_batch=per_host, max_images_in=2, max_images_out=2, resolution_in=16,
                         resolution_out=16, seed=3, packing=packing)
    sources = dict(pairs=world.pairs("train", 100), documents=world.documents("train", 100))
    return iter(make_dataset(sources, dict(pairs=0.5, documents=0.5), tok, cfg, process_index=k, process_count=n))


def _batches(world, tok, per_host, k, n, steps=3):
    it = _iterator(world, tok, per_host, k, n)
    out = []
    for _ in range(steps):
        b = next(it)
        b.pop(SKIPS_KEY)
        out.append(b)
    return out


@pytest.mark.parametrize("processes", [2, 4])
def test_hosts_together_build_the_single_process_batches(processes):
    world = ShapesWorld(seed=0, resolution=16)
    tok = build_word_tokenizer(world.vocabulary())
    one = _batches(world, tok, GLOBAL, 0, 1)
    per_host = [_batches(world, tok, GLOBAL // processes, k, processes) for k in range(processes)]
    for step, whole in enumerate(one):
        for key, value in whole.items():
            joined = np.concatenate([host[step][key] for host in per_host])
            np.testing.assert_array_equal(joined, value, err_msg=f"step {step} {key}")
    # and the hosts see disjoint data: their token rows differ
    assert not np.array_equal(per_host[0][0]["tokens"], per_host[1][0]["tokens"])


def test_host_rows_rejects_a_bad_split():
    import grain

    from dreamjax.data.pipeline import HostRows

    rows = HostRows(grain.MapDataset.range(64), 8, 4, 1)
    assert [rows[i] for i in range(6)] == [4, 5, 6, 7, 12, 13] and len(rows) == 32
    with pytest.raises(ValueError, match="process 2 with 4 of 8 rows"):
        HostRows(grain.MapDataset.range(64), 8, 4, 2)


def _save_as_processes(directory, iterators):
    """Each iterator's state where Grain's handler puts process K of N's (`data/process_K-of-N.json`)."""
    for k, it in enumerate(iterators):
        (directory / f"process_{k}-of-{len(iterators)}.json").write_text(json.dumps(it.get_state()))


def test_two_hosts_data_state_resumes_in_one_process(tmp_path):
    """The state the two hosts save after 2 batches restores in one process (`DataIteratorHandler`, the
    multi-host checkpoint read by one process), which then reads the third global batch."""
    from dreamjax.run.checkpoints import DataIteratorHandler

    world = ShapesWorld(seed=0, resolution=16)
    tok = build_word_tokenizer(world.vocabulary())
    hosts = [_iterator(world, tok, GLOBAL // 2, k, 2) for k in range(2)]
    for it in hosts:
        next(it), next(it)
    _save_as_processes(tmp_path, hosts)
    one = DataIteratorHandler().restore(tmp_path, item=_iterator(world, tok, GLOBAL, 0, 1))
    want = _batches(world, tok, GLOBAL, 0, 1)[2]
    got = next(one)
    got.pop(SKIPS_KEY)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_host_specific_data_states_are_refused(tmp_path):
    """Packed hosts keep their own open rows: their states differ, and one process refuses them by name;
    so does a set of process files with one missing."""
    from dreamjax.run.checkpoints import DataIteratorHandler, DataStateMismatch

    world = ShapesWorld(seed=0, resolution=16)
    tok = build_word_tokenizer(world.vocabulary())
    hosts = [_iterator(world, tok, GLOBAL // 2, k, 2, packing=2) for k in range(2)]
    for it in hosts:
        next(it)
    assert hosts[0].get_state() != hosts[1].get_state()
    _save_as_processes(tmp_path, hosts)
    with pytest.raises(DataStateMismatch, match="host-specific positions.*resume with 2 processes"):
        DataIteratorHandler().restore(tmp_path, item=_iterator(world, tok, GLOBAL, 0, 1, packing=2))
    (tmp_path / "process_1-of-2.json").unlink()
    with pytest.raises(DataStateMismatch, match=r"saved by 2 processes but only processes \[0\]"):
        DataIteratorHandler().restore(tmp_path, item=_iterator(world, tok, GLOBAL, 0, 1))
