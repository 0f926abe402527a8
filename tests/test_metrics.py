"""Training metrics beyond the losses: images/s, step time, MFU (from the compiled step's FLOPs and a peak
FLOP/s), how long a checkpoint save blocks the loop, and sample images in TensorBoard."""

import io
import json
import os
import struct
import types

import numpy as np
import pytest
from PIL import Image

from dreamjax.cli import load_config
from dreamjax.infer.text_to_image import text_to_image
from dreamjax.train import metrics
from dreamjax.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
NEW = ("images_per_s", "step_time_s", "mfu", "tokens_per_s")


# ------------------------------------------------------------------------------------------------ units


class _Compiled:
    def __init__(self, cost):
        self.cost = cost

    def cost_analysis(self):
        if isinstance(self.cost, Exception):
            raise self.cost
        return self.cost


@pytest.mark.parametrize("cost, flops", [
    ({"flops": 12.0, "bytes accessed": 3.0}, 12.0),
    ([{"flops": 7.0}], 7.0),  # a list of one dict per program (older JAX)
    (None, None), ([], None), ({"bytes accessed": 3.0}, None), ({"flops": -1.0}, None), ({"flops": float("nan")}, None),
    (NotImplementedError("no cost model"), None),
])
def test_compiled_flops_takes_every_shape_of_cost_analysis(cost, flops):
    assert metrics.compiled_flops(_Compiled(cost)) == flops


@pytest.mark.parametrize("kind, peak", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12), ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("TPU v3", None), ("NVIDIA GeForce GTX 1080", None),
])
def test_peak_flops_by_device_kind(kind, peak):
    got, source = metrics.peak_flops_per_device(types.SimpleNamespace(platform="tpu", device_kind=kind))
    assert got == peak
    assert (kind in source) and (source.startswith("spec_sheet") == (peak is not None))


def test_cpu_peak_is_measured_once_and_shared_by_the_host_devices():
    import jax

    host = metrics.measured_cpu_matmul_flops()
    assert np.isfinite(host) and host > 1e8  # any CPU does more than 0.1 GFLOP/s
    assert metrics.measured_cpu_matmul_flops() == host  # cached: measured once per process
    per_device, source = metrics.peak_flops_per_device(jax.devices("cpu")[0])
    assert source == metrics.MEASURED_CPU and per_device == pytest.approx(host / jax.local_device_count())


def test_mfu():
    assert metrics.mfu(2e12, 0.5, 8e12) == pytest.approx(0.5)
    assert metrics.mfu(None, 0.5, 8e12) is None and metrics.mfu(2e12, 0.5, None) is None


# ------------------------------------------------------------------------------------------------ a run


def _events(path: str):
    """The records of a TensorBoard event file (TFRecord framing: length, its CRC, data, its CRC)."""
    from tensorboardX.proto import event_pb2

    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos : pos + 8])
        event = event_pb2.Event()
        event.ParseFromString(data[pos + 12 : pos + 12 + n])
        yield event
        pos += 12 + n + 4


def _tensorboard(workdir: str) -> tuple[dict, dict]:
    """({scalar tag: {step: value}}, {image tag: {step: decoded uint8 image}}) of a run's TensorBoard files."""
    scalars, images = {}, {}
    tb = os.path.join(workdir, "tensorboard")
    for name in sorted(os.listdir(tb)):
        for event in _events(os.path.join(tb, name)):
            for v in event.summary.value:
                if v.HasField("image"):
                    img = np.asarray(Image.open(io.BytesIO(v.image.encoded_image_string)))
                    images.setdefault(v.tag, {})[event.step] = img
                elif v.HasField("simple_value"):
                    scalars.setdefault(v.tag, {})[event.step] = v.simple_value
    return scalars, images


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Three steps of the tiny config, a checkpoint at 2 and 3 (the last), sample images at step 2."""
    wd = str(tmp_path_factory.mktemp("metrics"))
    config = load_config(TINY + ":smoke", ["--config.train.sample_every=2"])
    train(config, wd, progress=False, sampler=text_to_image)
    lines = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))]
    return wd, lines, config


def test_throughput_step_time_and_mfu_are_logged(run):
    wd, lines, _ = run
    assert [m["step"] for m in lines] == [1, 2, 3]
    for m in lines:
        for k in NEW:
            assert np.isfinite(m[k]) and m[k] > 0, (k, m)
        assert m["mfu"] < 1.0  # against this host's measured matmul rate
        assert m["peak_flops_source"] == metrics.MEASURED_CPU
    # the steps' own rates: images in + out per second of step time, over the 16-row global batch
    assert all(m["images_per_s"] * m["step_time_s"] <= 16 * 3 for m in lines)
    scalars, _ = _tensorboard(wd)
    for k in NEW:
        assert sorted(scalars[f"train/{k}"]) == [1, 2, 3], k


def test_checkpoint_block_time_is_logged_with_the_save(run):
    wd, lines, _ = run
    blocked = {m["step"]: m.get("checkpoint_block_s") for m in lines}
    assert blocked[1] is None  # no save in step 1's interval
    assert blocked[2] > 0 and blocked[3] > 0, blocked
    assert sorted(os.listdir(os.path.join(wd, "checkpoints")))[-2:] == ["2", "3"]


def test_sample_images_go_to_tensorboard(run):
    wd, _, config = run
    _, images = _tensorboard(wd)
    assert list(images) == ["samples/text_to_image"] and list(images["samples/text_to_image"]) == [2]
    grid = images["samples/text_to_image"][2]
    side = config.model.unet.sample_size
    assert grid.dtype == np.uint8 and grid.shape[0] >= side and grid.shape[1] >= side * len(config.train.sample_prompts)


def test_without_a_sampler_sample_images_are_off_with_a_warning(tmp_path, caplog):
    from dreamjax.run.assembly import new_run
    from dreamjax.train.loop import _SampleLogger
    from dreamjax.train.metrics import MetricsWriter

    config = load_config(TINY + ":smoke", ["--config.train.sample_every=2"])
    logger = _SampleLogger(new_run(config), config, MetricsWriter(str(tmp_path), enabled=False), None)
    assert not logger.due(2)
    assert "no sampler" in caplog.text
