"""The FID InceptionV3 builds and runs on random weights ([N, 2048] pool3 features), loads a pytorch-fid-style
state dict name for name, and resizes its input as PyTorch's bilinear `align_corners=False` does."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dreamjax.eval import inception


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
