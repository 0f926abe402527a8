"""The FID InceptionV3 builds and runs on random weights ([N, 2048] pool3 features), loads a pytorch-fid-style
state dict name for name, resizes its input as PyTorch's bilinear `align_corners=False` does, and gives the
features of pytorch-fid's InceptionV3 (written out in `tests/torch_reference/fid_inception.py`) with the same
weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from dreamjax.eval import inception
from tests.torch_reference import fid_inception


@pytest.fixture(scope="module")
def params():
    return inception.random_params(seed=0)


def _state_dict(params):
    """The inverse of `params_from_state_dict`: a PyTorch-layout state dict of Flax params."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        names = [p.key for p in path]
        arr = np.asarray(leaf)
        if names[-1] == "kernel":
            names[-1], arr = "weight", arr.transpose(3, 2, 0, 1)
        out[".".join(names)] = torch.from_numpy(np.array(arr))
    out["fc.weight"] = torch.zeros(1008, 2048)  # the classifier pytorch-fid's file carries: skipped
    out["Conv2d_1a_3x3.bn.num_batches_tracked"] = torch.tensor(0)
    return out


def test_builds_runs_and_loads_a_state_dict(params, tmp_path):
    n = sum(x.size for x in jax.tree.leaves(params))
    assert 21_000_000 < n < 22_500_000, n  # InceptionV3 without its classifier: ~21.8M parameters
    state = _state_dict(params)
    assert state["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    path = tmp_path / inception.FID_WEIGHTS_NAME
    torch.save(state, path)
    loaded = inception.load_fid_weights(str(tmp_path))  # the folder holding the file works too
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, params))

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 75, 75, 3), dtype=np.uint8)
    model = inception.FIDInceptionV3(resize_input=False)
    feats = np.asarray(model.apply({"params": params}, images.astype(np.float32) / 255))
    assert feats.shape == (3, inception.FEATURE_DIM) and np.isfinite(feats).all()
    assert (feats >= 0).all()  # pool3 averages ReLU outputs
    assert not np.allclose(feats[0], feats[1])


def test_rejects_a_foreign_state_dict(params):
    state = {k: v.numpy() for k, v in _state_dict(params).items()}
    del state["Mixed_5b.branch1x1.conv.weight"]
    with pytest.raises(ValueError, match="missing"):
        inception.params_from_state_dict(state, reference=params)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        inception.load_fid_weights("/nonexistent/pt_inception.pth")


@pytest.mark.parametrize("side", [64, 256, 512])
def test_resize_matches_torch_bilinear(side):
    x = np.random.default_rng(side).random((1, side, side, 3), dtype=np.float32)
    got = jax.image.resize(jnp.asarray(x), (1, 299, 299, 3), "bilinear", antialias=False)
    want = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
                                           align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def _randomize(net: nn.Module, seed: int) -> None:
    """Non-trivial random weights: He-normal convolutions and BatchNorms whose four tensors are all away from
    their defaults (scale, shift, running mean and variance), so a swapped or ignored statistic shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / m.weight[0].numel()) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))


@pytest.fixture(scope="module")
def torch_fid():
    """pytorch-fid's Inception with random weights, two uint8 images and its pool3 features of them."""
    torch.manual_seed(0)
    net = fid_inception.fid_inception_v3().eval()
    _randomize(net, seed=0)
    images = np.random.default_rng(0).integers(0, 256, (2, 72, 96, 3), dtype=np.uint8)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        (want,) = fid_inception.InceptionV3([3], inception=net).eval()(pixels)
    return net, images, pixels, want.reshape(len(images), -1).numpy()


def test_features_match_pytorch_fid_inception(torch_fid, tmp_path):
    """pytorch-fid's InceptionV3([3]) and ours, same random weights (through pytorch-fid's state dict file and
    `load_fid_weights`), same uint8 images resized 72x96 -> 299x299: pool3 features agree to 1e-4 relative
    (~10 s of CPU)."""
    net, images, _, want = torch_fid
    state = net.state_dict()
    assert "fc.weight" in state and "Mixed_7c.branch_pool.bn.running_var" in state  # pytorch-fid's file's keys
    torch.save(state, tmp_path / inception.FID_WEIGHTS_NAME)
    params = inception.load_fid_weights(str(tmp_path / inception.FID_WEIGHTS_NAME))
    got = inception.InceptionFeatures(params, batch=2)(images)

    scale = np.abs(want).max()
    assert got.shape == want.shape == (2, inception.FEATURE_DIM)
    assert (want > 0).mean() > 0.5 and not np.allclose(want[0], want[1])  # features are not trivial
    rel = np.abs(got - want).max() / scale
    assert rel <= 1e-4, rel
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)


def test_fid_patches_matter_at_the_parity_tolerance(torch_fid):
    """torchvision's blocks (padding counted in the average pools, an average pool in Mixed_7c) with the same
    weights give features far outside the parity test's tolerance: that test sees the FID patches."""
    net, _, pixels, want = torch_fid
    plain = fid_inception.Inception3(num_classes=1008).eval()
    plain.load_state_dict(net.state_dict())
    with torch.no_grad():
        (other,) = fid_inception.InceptionV3([3], inception=plain).eval()(pixels)
    assert np.abs(other.reshape(len(pixels), -1).numpy() - want).max() / np.abs(want).max() > 1e-2
