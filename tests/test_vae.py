"""AutoencoderKL vs diffusers' AutoencoderKL on a tiny random model (fp32, no downloads)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL

from dreamjax.convert.diffusers import vae_from_torch
from dreamjax.models import vae as vae_lib
from dreamjax.models.vae import AutoencoderKL, VAEConfig, sample_latent
from tests.helpers import assert_close
from tests.test_unet import nchw, nhwc, perturb

# Three blocks (two downsamplings), channel changes inside blocks (conv_shortcut), mid attention.
VAE_TINY = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16, 16],
    down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
    layers_per_block=1, norm_num_groups=4, sample_size=16,
)


def make_torch_vae(config: dict = VAE_TINY, seed: int = 0) -> TorchAutoencoderKL:
    torch.manual_seed(seed)
    return perturb(TorchAutoencoderKL(**config), seed)


@pytest.fixture(scope="module")
def models():
    tm = make_torch_vae()
    cfg = VAEConfig.from_diffusers(tm.config)
    model = AutoencoderKL(cfg)
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))
    decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode))
    return tm, cfg, encode, decode


def test_encode_decode_match_diffusers(models):
    tm, cfg, encode, decode = models
    params = vae_from_torch(tm.state_dict(), cfg)
    rng = np.random.RandomState(0)
    x = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    z = rng.randn(2, 4, 4, 4).astype(np.float32)
    with torch.no_grad():
        posterior = tm.encode(torch.from_numpy(x)).latent_dist
        ref_x = tm.decode(torch.from_numpy(z)).sample.numpy()
    mean, logvar = encode(params, nhwc(x))
    assert mean.shape == (2, 4, 4, 4)
    errs = [
        assert_close(nchw(mean), posterior.mean.numpy(), 1e-4, what="mean"),
        assert_close(nchw(logvar), posterior.logvar.numpy(), 1e-4, what="logvar"),
        assert_close(nchw(decode(params, nhwc(z))), ref_x, 1e-4, what="decode"),
    ]
    print("max rel err mean / logvar / decode: " + " / ".join(f"{e:.2e}" for e in errs))


def test_logvar_is_clipped_like_diffusers(models):
    _, cfg, encode, _ = models
    tm = make_torch_vae()
    with torch.no_grad():  # push logvar channels to +-1000 before the clamp
        tm.quant_conv.bias[4:6] += 1000.0
        tm.quant_conv.bias[6:] -= 1000.0
    params = vae_from_torch(tm.state_dict(), cfg)
    x = np.random.RandomState(1).uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        ref = tm.encode(torch.from_numpy(x)).latent_dist.logvar.numpy()
    _, logvar = encode(params, nhwc(x))
    np.testing.assert_array_equal(nchw(logvar), ref)
    assert float(logvar.max()) == 20.0 and float(logvar.min()) == -30.0


def test_parent_can_call_encode_and_decode():
    cfg = VAEConfig.from_diffusers(VAE_TINY)

    class Parent(nn.Module):
        @nn.compact
        def __call__(self, x):
            vae = AutoencoderKL(cfg, name="vae")
            mean, logvar = vae.encode(x)
            return vae.decode(mean), logvar

    x = vae_lib.init_inputs(cfg, batch=2)
    variables = jax.eval_shape(Parent().init, jax.random.PRNGKey(0), x)
    params = nn.meta.unbox(variables)["params"]["vae"]
    shapes = jax.tree_util.tree_map(lambda s: s.shape, params)
    assert shapes == jax.tree_util.tree_map(lambda s: s.shape, vae_lib.param_shapes(cfg))
    (out, logvar) = jax.eval_shape(Parent().apply, variables, x)
    assert out.shape == x.shape and logvar.shape == (2, 1, 1, 4)


def test_sample_latent_statistics():
    mean = jnp.full((4, 32, 32, 4), 0.5)
    logvar = jnp.full((4, 32, 32, 4), np.log(4.0))
    z = sample_latent(jax.random.PRNGKey(0), mean, logvar)
    assert abs(float(z.mean()) - 0.5) < 0.05 and abs(float(z.std()) - 2.0) < 0.05


def test_config_roundtrip_and_errors():
    tm = make_torch_vae()
    cfg = VAEConfig.from_diffusers(tm.config)
    assert cfg.scaling_factor == 0.18215 and cfg.downsample_factor == 4
    again = TorchAutoencoderKL.from_config(cfg.to_diffusers_dict())
    assert VAEConfig.from_diffusers(again.config) == cfg
    with pytest.raises(ValueError, match="shift_factor"):
        VAEConfig.from_diffusers({**VAE_TINY, "shift_factor": 0.1})
    with pytest.raises(ValueError, match="down_block_types"):
        VAEConfig.from_diffusers({**VAE_TINY, "down_block_types": ["AttnDownEncoderBlock2D"] * 3})
