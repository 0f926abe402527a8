"""UNet2DCondition vs diffusers' UNet2DConditionModel on tiny random models (fp32, no downloads)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dreamjax.convert.diffusers import unet_from_torch
from dreamjax.models import unet as unet_lib
from dreamjax.models.unet import UNet2DCondition, UNetConfig
from tests.helpers import assert_close, max_rel_err

# SD 2.1-base in miniature: linear proj_in/out, a head count per block, first block with attention.
SD21_TINY = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=[16, 32],
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    layers_per_block=2, attention_head_dim=[2, 4], cross_attention_dim=32, use_linear_projection=True,
    norm_num_groups=8,
)
# SD 1.5 in miniature: 1x1-conv proj_in/out, one head count; plus options SD leaves at defaults
# (two transformer layers per block, fp32 upcast, other sinusoid settings) for coverage.
SD15_TINY = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=[16, 32],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    layers_per_block=1, attention_head_dim=2, cross_attention_dim=24, use_linear_projection=False,
    norm_num_groups=8, transformer_layers_per_block=2, upcast_attention=True,
    flip_sin_to_cos=False, freq_shift=1,
)


def perturb(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter so zero biases / unit norms are not special cases."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def make_torch_unet(config: dict, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return perturb(UNet2DConditionModel(**config), seed)


def nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


def nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


@pytest.mark.parametrize(
    "config, timesteps",
    [
        (SD21_TINY, [np.array([0, 999], np.int32), np.array([500, 37], np.int32)]),
        (SD15_TINY, [np.array([12.5, 700.0], np.float32), np.array([999.0, 1.0], np.float32)]),
    ],
    ids=["sd21-like", "sd15-like"],
)
def test_unet_matches_diffusers(config, timesteps):
    tm = make_torch_unet(config)
    cfg = UNetConfig.from_diffusers(tm.config)
    params = unet_from_torch(tm.state_dict(), cfg)
    rng = np.random.RandomState(0)
    sample = rng.randn(2, 4, 16, 16).astype(np.float32)  # NCHW, as torch takes it
    context = rng.randn(2, 5, config["cross_attention_dim"]).astype(np.float32)
    apply = jax.jit(UNet2DCondition(cfg).apply)
    for t in timesteps:
        with torch.no_grad():
            ref = tm(torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(context)).sample.numpy()
        out = apply({"params": params}, nhwc(sample), t, context)
        err = assert_close(nchw(out), ref, 1e-4, what=f"UNet t={t}")
        print(f"max rel err t={t}: {err:.2e}")


def test_config_roundtrip_and_heads():
    tm = make_torch_unet(SD21_TINY)
    cfg = UNetConfig.from_diffusers(tm.config)
    assert cfg.attention_head_dim == (2, 4) and cfg.num_heads(-1) == 4  # heads, not head size
    assert cfg.layers_per_block == (2, 2) and cfg.transformer_layers_per_block == (1, 1)
    again = UNet2DConditionModel.from_config(cfg.to_diffusers_dict())
    assert UNetConfig.from_diffusers(again.config) == cfg
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}
    assert shapes(again) == shapes(tm)
    # JAX-only overrides pass through
    assert UNetConfig.from_diffusers(tm.config, dtype=jnp.bfloat16, remat=True).remat


def test_unsupported_options_are_named():
    with pytest.raises(ValueError, match="class_embed_type='timestep'"):
        UNetConfig.from_diffusers({**SD21_TINY, "class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="unsupported block types"):
        UNetConfig.from_diffusers({**SD21_TINY, "down_block_types": ["AttnDownBlock2D", "DownBlock2D"]})
    with pytest.raises(ValueError, match="attention_head_dim has 3 entries for 2 blocks"):
        UNetConfig.from_diffusers({**SD21_TINY, "attention_head_dim": [2, 4, 8]})


def test_every_param_has_logical_axes():
    cfg = UNetConfig.from_diffusers(SD21_TINY)
    init = lambda: UNet2DCondition(cfg).init(jax.random.PRNGKey(0), *unet_lib.init_inputs(cfg))
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
    leaves = jax.tree_util.tree_leaves(jax.eval_shape(init)["params"], is_leaf=is_box)
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    assert all(len(x.names) == x.value.ndim and len(set(x.names)) == x.value.ndim for x in leaves)


def smallest_config() -> dict:
    """The smallest config that still has every block kind, for the checks below."""
    return dict(SD21_TINY, block_out_channels=[8, 16], layers_per_block=1, attention_head_dim=[1, 2],
                cross_attention_dim=8, norm_num_groups=4)


def test_remat_wraps_blocks_without_changing_params():
    cfg = UNetConfig.from_diffusers(smallest_config())
    remat = dataclasses.replace(cfg, remat=True)
    assert jax.tree_util.tree_structure(unet_lib.param_shapes(remat)) == \
        jax.tree_util.tree_structure(unet_lib.param_shapes(cfg))
    inputs = unet_lib.init_inputs(cfg, batch=2)

    def grad_jaxpr(c):
        params = unet_lib.param_shapes(c)
        loss = lambda p: jnp.mean(UNet2DCondition(c).apply({"params": p}, *inputs) ** 2)
        return str(jax.make_jaxpr(jax.grad(loss))(params))  # traced only, nothing compiled

    with_remat, without = grad_jaxpr(remat), grad_jaxpr(cfg)
    assert "remat" in with_remat or "checkpoint" in with_remat
    assert "remat" not in without and "checkpoint" not in without


def test_bf16_on_a_sharded_batch():
    """bf16 compute on a batch sharded over the 8 host devices stays close to the fp32 result
    (one compile for both checks: a sharding bug would show as an error far above bf16 noise)."""
    config = smallest_config()
    cfg = UNetConfig.from_diffusers(config)
    params = unet_from_torch(make_torch_unet(config).state_dict(), cfg)
    rng = np.random.RandomState(1)
    x = rng.randn(8, 8, 8, 4).astype(np.float32)
    t = np.arange(8, dtype=np.int32) * 120
    ctx = rng.randn(8, 3, 8).astype(np.float32)
    ref = jax.jit(UNet2DCondition(cfg).apply)({"params": params}, x, t, ctx)

    batch = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
    bf16_apply = jax.jit(UNet2DCondition(dataclasses.replace(cfg, dtype=jnp.bfloat16)).apply)
    out = bf16_apply({"params": params}, *(jax.device_put(a, batch) for a in (x, t, ctx)))
    assert out.dtype == jnp.bfloat16 and out.sharding.is_equivalent_to(batch, out.ndim)
    err = max_rel_err(out.astype(jnp.float32), ref)
    assert err < 5e-2, err


def test_chunked_self_attention_matches_diffusers():
    """attention_chunk (the 7B configs' memory-efficient attention) computes the same UNet: 16x16 latents
    are 256 query positions in 4 chunks of 64."""
    tm = make_torch_unet(SD21_TINY)
    cfg = UNetConfig.from_diffusers(tm.config, attention_chunk=64)
    params = unet_from_torch(tm.state_dict(), cfg)
    rng = np.random.RandomState(0)
    sample = rng.randn(2, 4, 16, 16).astype(np.float32)
    context = rng.randn(2, 5, SD21_TINY["cross_attention_dim"]).astype(np.float32)
    t = np.array([3, 800], np.int32)
    with torch.no_grad():
        ref = tm(torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(context)).sample.numpy()
    out = jax.jit(UNet2DCondition(cfg).apply)({"params": params}, nhwc(sample), t, context)
    assert_close(nchw(out), ref, 1e-4, what="chunked UNet")
    # and the gradient w.r.t. the condition (what score distillation trains through) is the unchunked one
    plain = dataclasses.replace(cfg, attention_chunk=None)
    grad = lambda c: jax.grad(lambda ctx: jnp.mean(UNet2DCondition(c).apply(
        {"params": params}, nhwc(sample), t, ctx) ** 2))(jnp.asarray(context))
    assert max_rel_err(grad(cfg), grad(plain)) < 1e-5
