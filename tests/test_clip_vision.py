"""CLIP vision parity against transformers `CLIPVisionModel(output_hidden_states=True)`."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import Mesh, NamedSharding

from dreamjax.convert.hf import clip_vision_from_torch
from dreamjax.models.clip_vision import ClipVision, ClipVisionConfig, init_params, select_features
from tests.helpers import assert_close

LAYERS = 3


@functools.cache
def hf_model() -> transformers.CLIPVisionModel:
    cfg = transformers.CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4, image_size=28,
        patch_size=7, layer_norm_eps=1e-5, hidden_act="quick_gelu", attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.CLIPVisionModel(cfg).eval()
    with torch.no_grad():  # non-trivial layer norms
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@functools.cache
def reference():
    """pixels NCHW -> (pixels NHWC, hidden_states [Ly+1, B, 1+P, D], pooler_output [B, D])."""
    pixels = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 28, 28)).astype(np.float32))
    with torch.no_grad():
        out = hf_model()(pixel_values=pixels, output_hidden_states=True)
    hidden = np.stack([h.numpy() for h in out.hidden_states])
    return pixels.permute(0, 2, 3, 1).numpy(), hidden, out.pooler_output.numpy()


@functools.cache
def jax_model(scan_layers: bool):
    cfg = ClipVisionConfig.from_hf(hf_model().config, scan_layers=scan_layers)
    params = jax.tree.map(jnp.asarray, clip_vision_from_torch(hf_model().state_dict(), cfg))
    return cfg, params


@functools.partial(jax.jit, static_argnums=(0, 3))
def _apply(cfg, params, pixels, output_layer):
    return ClipVision(cfg).apply({"params": params}, pixels, output_layer=output_layer)


def test_config_from_hf_and_back():
    cfg = ClipVisionConfig.from_hf(hf_model().config)
    got = (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.patch_size, cfg.num_patches)
    assert got == (64, 3, 4, 7, 16)
    assert ClipVisionConfig.from_hf(cfg.to_hf_dict()) == cfg
    assert ClipVisionConfig.from_hf(transformers.CLIPVisionConfig(**cfg.to_hf_dict())) == cfg
    full = {"model_type": "clip", "vision_config": cfg.to_hf_dict(), "text_config": {}}
    assert ClipVisionConfig.from_hf(full) == cfg


@pytest.mark.parametrize("scan_layers", [True, False])
def test_every_hidden_state_and_penultimate(scan_layers):
    cfg, params = jax_model(scan_layers)
    pixels, hidden, pooled = reference()
    ours = _apply(cfg, params, pixels, None)
    assert ours.shape == (LAYERS + 1, 2, 17, 64)
    for i in range(LAYERS + 1):
        err = assert_close(ours[i], hidden[i], 1e-4, f"hidden_states[{i}]")
        print(f"[clip] scan={scan_layers} hidden_states[{i}]: max rel err {err:.2e}")
    # stopping early: only the requested state, same values
    for layer in (-2, 0, 1, LAYERS):
        single = _apply(cfg, params, pixels, layer)
        assert single.shape == (2, 17, 64)
        assert_close(single, hidden[layer], 1e-4, f"output_layer={layer}")
    feats = select_features(_apply(cfg, params, pixels, -2), -2)
    err = assert_close(feats, hidden[-2][:, 1:], 1e-4, "select_features(output_layer=-2)")
    print(f"[clip] scan={scan_layers} penultimate features (no CLS): max rel err {err:.2e}")
    np.testing.assert_array_equal(select_features(ours, -2), ours[-2][:, 1:])
    assert feats.shape == (2, 16, 64)
    pooled_ours = ClipVision(cfg).apply({"params": params}, ours[-1], method=ClipVision.pooled_output)
    assert_close(pooled_ours, pooled, 1e-4, "pooled_output")


def test_output_layer_out_of_range():
    cfg, params = jax_model(True)
    with pytest.raises(ValueError, match="output_layer"):
        _apply(cfg, params, reference()[0], LAYERS + 1)


def test_sharded_matches_single_device():
    """Params placed by their logical axes on a (data, fsdp, tensor) = (2, 1, 4) mesh of the 8 CPU devices."""
    cfg, params = jax_model(True)
    pixels, hidden, _ = reference()
    rules = (("batch", ("data", "fsdp")), ("length", None), ("act_embed", None), ("act_mlp", "tensor"),
             ("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"), ("layers", None), ("norm", None),
             ("conv_height", None), ("conv_width", None), ("conv_in", None), ("conv_out", "fsdp"))
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 1, 4), ("data", "fsdp", "tensor"))
    specs = nn.get_partition_spec(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, nn.logical_to_mesh_axes(s, rules)), specs)
    forward = lambda p: ClipVision(cfg).apply({"params": p}, pixels, output_layer=-2)
    with mesh, nn.logical_axis_rules(rules):
        out = jax.jit(forward)(jax.device_put(params, shardings))
    assert_close(out, hidden[-2], 1e-4, "sharded CLIP")
