"""The InceptionV3 that FID is defined with (pytorch-fid's `fid_inception_v3`, the TF 2015-12-05 graph ported to
PyTorch), in Flax linen, returning the 2048-d pool3 features.

It mirrors pytorch-fid module for module, so the parameter tree has the PyTorch state dict's names
(`Mixed_5b/branch1x1/conv/kernel` <- `Mixed_5b.branch1x1.conv.weight`) and `load_fid_weights` needs no table:
- `FIDInceptionA` / `FIDInceptionC` / `FIDInceptionE_1`: average pools that do not count the padding (TF's);
- `FIDInceptionE_2`: a max pool in the pool branch (a bug in the TF graph that FID numbers depend on);
- BatchNorm eps 1e-3 in inference form (running statistics), convolutions without bias;
- the input: images in [0, 1], resized bilinearly to 299 (PyTorch's `align_corners=False`, no antialias), then
  scaled to [-1, 1].

Weights: the pytorch-fid file `pt_inception-2015-12-05-6726825d.pth` that you provide (never downloaded).
"""

from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FEATURE_DIM = 2048
INPUT_SIZE = 299


def _pad(p):
    ph, pw = (p, p) if isinstance(p, int) else p
    return ((ph, ph), (pw, pw))


class FrozenBatchNorm(nn.Module):
    """BatchNorm2d in eval mode, its four tensors named as PyTorch's so weights load name for name."""

    features: int
    eps: float = 1e-3

    @nn.compact
    def __call__(self, x):
        f = self.features
        weight = self.param("weight", nn.initializers.ones, (f,))
        bias = self.param("bias", nn.initializers.zeros, (f,))
        mean = self.param("running_mean", nn.initializers.zeros, (f,))
        var = self.param("running_var", nn.initializers.ones, (f,))
        return (x - mean) * (weight * jax.lax.rsqrt(var + self.eps)) + bias


class BasicConv2d(nn.Module):
    features: int
    kernel: tuple[int, int] | int
    stride: int = 1
    padding: tuple[int, int] | int = 0

    @nn.compact
    def __call__(self, x):
        k = (self.kernel, self.kernel) if isinstance(self.kernel, int) else self.kernel
        x = nn.Conv(self.features, k, strides=self.stride, padding=_pad(self.padding), use_bias=False,
                    name="conv")(x)
        return nn.relu(FrozenBatchNorm(self.features, name="bn")(x))


def _avg_pool(x):
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=_pad(1), count_include_pad=False)


def _max_pool(x, stride=2, padding=0):
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=_pad(padding))


class FIDInceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, 1, name="branch1x1")(x)
        b5 = BasicConv2d(48, 1, name="branch5x5_1")(x)
        b5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, 1, name="branch_pool")(_avg_pool(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, 3, stride=2, name="branch3x3")(x)
        bd = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, 3, stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


class FIDInceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        b1 = BasicConv2d(192, 1, name="branch1x1")(x)
        b7 = BasicConv2d(c, 1, name="branch7x7_1")(x)
        b7 = BasicConv2d(c, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c, 1, name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, 1, name="branch_pool")(_avg_pool(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, 1, name="branch3x3_1")(x)
        b3 = BasicConv2d(320, 3, stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, 1, name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, 3, stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class FIDInceptionE(nn.Module):
    """`FIDInceptionE_1` (max_pool False: average pool without padding counts) or `FIDInceptionE_2` (max pool)."""

    max_pool: bool = False

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, 1, name="branch1x1")(x)
        b3 = BasicConv2d(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv2d(448, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        pooled = _max_pool(x, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        bp = BasicConv2d(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """images [N, H, W, 3] in [0, 1] -> pool3 features [N, 2048] (pytorch-fid `InceptionV3([3])`)."""

    resize_input: bool = True

    @nn.compact
    def __call__(self, images):
        x = images.astype(jnp.float32)
        if self.resize_input:
            x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, x.shape[-1]), "bilinear", antialias=False)
        x = 2 * x - 1
        x = BasicConv2d(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = _max_pool(x)
        x = BasicConv2d(80, 1, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x)
        x = _max_pool(x)
        x = FIDInceptionA(32, name="Mixed_5b")(x)
        x = FIDInceptionA(64, name="Mixed_5c")(x)
        x = FIDInceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = FIDInceptionC(128, name="Mixed_6b")(x)
        x = FIDInceptionC(160, name="Mixed_6c")(x)
        x = FIDInceptionC(160, name="Mixed_6d")(x)
        x = FIDInceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = FIDInceptionE(max_pool=False, name="Mixed_7b")(x)
        x = FIDInceptionE(max_pool=True, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))  # adaptive average pool to 1x1


# ------------------------------------------------------------------------------------------------ weights


def random_params(seed: int = 0, side: int = 75) -> dict:
    """Random parameters (tests; nothing to download). The tree does not depend on the input side."""
    model = FIDInceptionV3(resize_input=False)
    return jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, side, side, 3)))["params"]


def param_shapes() -> dict:
    """The parameter tree as `jax.ShapeDtypeStruct`s: what `params_from_state_dict` checks a state dict against,
    traced without compiling or running an initialisation (`random_params` takes ~20 s on a small CPU)."""
    model = FIDInceptionV3(resize_input=False)
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 75, 75, 3)))["params"]


def params_from_state_dict(state: dict, reference: dict | None = None) -> dict:
    """pytorch-fid state dict (name -> array) -> Flax params: the same names, conv weights [O, I, kh, kw] ->
    kernels [kh, kw, I, O]. The classifier (`fc.*`), aux head and `num_batches_tracked` are not FID's and are
    skipped; with `reference` (a params tree, or `param_shapes()`) every leaf must be present with its shape."""
    params: dict = {}
    for name, value in state.items():
        if name.startswith(("fc.", "AuxLogits.")) or name.endswith("num_batches_tracked"):
            continue
        arr = np.asarray(value, np.float32)
        *path, leaf = name.split(".")
        if leaf == "weight" and path[-1] == "conv":
            leaf, arr = "kernel", arr.transpose(2, 3, 1, 0)
        node = params
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = arr
    if reference is not None:
        want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(reference)}
        got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)}
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        wrong = sorted(k for k in set(want) & set(got) if tuple(want[k]) != tuple(got[k]))
        if missing or extra or wrong:
            raise ValueError(f"not a pytorch-fid Inception state dict: missing {missing[:3]}, unexpected {extra[:3]}, "
                             f"wrong shapes {wrong[:3]} ({len(missing)}/{len(extra)}/{len(wrong)})")
    return params


def load_fid_weights(path: str) -> dict:
    """Flax params from pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (a file you provide; torch reads it)."""
    if os.path.isdir(path):
        path = os.path.join(path, FID_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--inception: FID Inception weights not found: {path} (pytorch-fid's "
                                f"{FID_WEIGHTS_NAME}; nothing is downloaded)")
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v.numpy() for k, v in state.items()}
    return params_from_state_dict(state, reference=param_shapes())


@functools.partial(jax.jit, static_argnames=("model",))
def _features(model, params, images):
    return model.apply({"params": params}, images)


class InceptionFeatures:
    """pool3 features of uint8 images [N, H, W, 3] in batches (each batch sharded over `mesh`'s batch axes
    when given, its rows padded to a multiple of the data parallelism)."""

    def __init__(self, params: dict, batch: int = 50, mesh=None, rules=None):
        self.model = FIDInceptionV3()
        self.params = params
        self.batch = batch
        self.mesh, self.rules = mesh, rules

    def __call__(self, images: np.ndarray) -> np.ndarray:
        from dreamjax.infer.decode import pad_batch, put_batch

        out = []
        for start in range(0, len(images), self.batch):
            chunk = np.asarray(images[start:start + self.batch], np.float32) / 255.0
            rows = pad_batch(len(chunk), self.mesh, self.rules)
            if rows > len(chunk):
                chunk = np.concatenate([chunk, np.zeros((rows - len(chunk),) + chunk.shape[1:], chunk.dtype)])
            feats = _features(self.model, self.params, put_batch(chunk, self.mesh, self.rules))
            out.append(np.asarray(jax.device_get(feats))[: min(self.batch, len(images) - start)])
        return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM), np.float32)
