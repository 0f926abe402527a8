"""diffusers <-> dreamjax weight conversion: bit-exact round trips, clear errors, real SD layouts."""

import json

import ml_dtypes
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers import UNet2DConditionModel

from dreamjax.convert.core import ConversionError, flatten, to_numpy
from dreamjax.convert.diffusers import (
    load_diffusers_unet,
    load_diffusers_vae,
    save_diffusers_unet,
    save_diffusers_vae,
    unet_from_torch,
    unet_rules,
    unet_to_torch,
    vae_from_torch,
    vae_rules,
    vae_to_torch,
)
from dreamjax.models import unet as unet_lib
from dreamjax.models import vae as vae_lib
from dreamjax.models.unet import UNetConfig
from dreamjax.models.vae import VAEConfig
from tests.test_unet import SD15_TINY, SD21_TINY, make_torch_unet
from tests.test_vae import VAE_TINY, make_torch_vae

# The released configs (config.json of stabilityai/stable-diffusion-2-1-base unet/ and vae/, and of
# runwayml/stable-diffusion-v1-5 unet/), written out so no test needs the network.
SD21_BASE_UNET = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.10.0.dev0", "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
    "sample_size": 64, "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "use_linear_projection": True,
}
SD15_UNET = {
    **SD21_BASE_UNET, "attention_head_dim": 8, "cross_attention_dim": 768, "use_linear_projection": False,
}
for _k in ("use_linear_projection", "dual_cross_attention", "num_class_embeds", "only_cross_attention"):
    SD15_UNET.pop(_k)  # the SD 1.5 config predates these keys
SD_VAE = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.10.0.dev0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 768, "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def numpy_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: to_numpy(v) for k, v in model.state_dict().items()}


def assert_bit_exact(back: dict, original: dict):
    assert set(back) == set(original), sorted(set(back) ^ set(original))[:5]
    for k, v in original.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert np.array_equal(back[k].view(np.uint8), np.ascontiguousarray(v).view(np.uint8)), k


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("config", [SD21_TINY, SD15_TINY], ids=["sd21-like", "sd15-like"])
def test_unet_roundtrip_bit_exact(config):
    tm = make_torch_unet(config)
    cfg = UNetConfig.from_diffusers(tm.config)
    sd = numpy_state_dict(tm)
    assert_bit_exact(unet_to_torch(unet_from_torch(sd, cfg), cfg), sd)
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()}  # dtypes survive too
    assert_bit_exact(unet_to_torch(unet_from_torch(bf16, cfg), cfg), bf16)


def test_vae_roundtrip_bit_exact_and_legacy_names():
    tm = make_torch_vae()
    cfg = VAEConfig.from_diffusers(tm.config)
    sd = numpy_state_dict(tm)
    params = vae_from_torch(sd, cfg)
    assert_bit_exact(vae_to_torch(params, cfg), sd)
    # pre-0.15 attention names (query/key/value/proj_attn) load to the same params
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for k, v in sd.items():
        for new, old in legacy_names.items():
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        legacy[k] = v
    assert any(".query." in k for k in legacy)
    for a, b in zip(flatten(vae_from_torch(legacy, cfg)).items(), flatten(params).items()):
        assert a[0] == b[0] and np.array_equal(a[1], b[1])


def test_boxed_params_export():
    """Logically partitioned ("boxed") variables as `init` returns them export without unboxing."""
    import flax.linen as nn
    import jax

    cfg = VAEConfig.from_diffusers(VAE_TINY)
    init = lambda: vae_lib.AutoencoderKL(cfg).init(jax.random.PRNGKey(0), vae_lib.init_inputs(cfg))
    variables = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(init))
    assert isinstance(variables["params"]["quant_conv"]["kernel"], nn.LogicallyPartitioned)
    out = vae_to_torch(variables, cfg)
    assert set(out) == set(make_torch_vae().state_dict())


# ----------------------------------------------------------------------------- errors


def test_missing_and_unexpected_keys_are_named():
    tm = make_torch_unet(SD21_TINY)
    cfg = UNetConfig.from_diffusers(tm.config)
    sd = numpy_state_dict(tm)
    missing = dict(sd)
    del missing["down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight"]
    with pytest.raises(ConversionError, match=r"missing keys: down_blocks\.0\.attentions\.1\."
                                              r"transformer_blocks\.0\.attn2\.to_k\.weight"):
        unet_from_torch(missing, cfg)
    extra = "down_blocks.1.attentions.0.norm.weight"  # block 1 is a DownBlock2D: no attention
    with pytest.raises(ConversionError, match=r"unexpected keys .*down_blocks\.1\.attentions\.0\.norm"):
        unet_from_torch({**sd, extra: np.ones(32, np.float32)}, cfg)
    wrong = {**sd, "conv_in.weight": np.zeros((16, 4, 1, 1), np.float32)}
    with pytest.raises(ConversionError, match="shape mismatch: conv_in/kernel"):
        unet_from_torch(wrong, cfg)
    vcfg = VAEConfig.from_diffusers(VAE_TINY)
    vsd = numpy_state_dict(make_torch_vae())
    del vsd["decoder.mid_block.attentions.0.to_out.0.bias"]
    with pytest.raises(ConversionError, match=r"missing keys: decoder\.mid_block\.attentions\.0\.to_out\.0"):
        vae_from_torch(vsd, vcfg)


def test_bad_paths(tmp_path):
    with pytest.raises(ConversionError, match="path does not exist: /no/such/dir"):
        load_diffusers_unet("/no/such/dir")
    with pytest.raises(ConversionError, match="no config.json in"):
        load_diffusers_vae(tmp_path)
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(SD21_TINY))
    with pytest.raises(ConversionError, match="no weights file in"):
        load_diffusers_unet(tmp_path)
    (tmp_path / "unet" / "config.json").write_text(json.dumps({**VAE_TINY, "_class_name": "AutoencoderKL"}))
    with pytest.raises(ConversionError, match="is an AutoencoderKL config, not UNet2DConditionModel"):
        load_diffusers_unet(tmp_path)
    (tmp_path / "unet" / "config.json").write_text(json.dumps({**SD21_TINY, "class_embed_type": "timestep"}))
    with pytest.raises(ConversionError, match="unsupported config options: class_embed_type"):
        load_diffusers_unet(tmp_path)


# ----------------------------------------------------------------------------- directories


def test_load_pipeline_snapshot_and_save_for_diffusers(tmp_path):
    """A stable-diffusion-2-1-base-like snapshot (unet/ as .bin, vae/ as safetensors) loads; what
    save_diffusers_* writes loads back in diffusers bit for bit."""
    tm, tv = make_torch_unet(SD21_TINY), make_torch_vae()
    tm.save_pretrained(tmp_path / "snapshot" / "unet", safe_serialization=False)
    tv.save_pretrained(tmp_path / "snapshot" / "vae")
    params, cfg = load_diffusers_unet(tmp_path / "snapshot")
    vparams, vcfg = load_diffusers_vae(tmp_path / "snapshot" / "vae")
    assert cfg == UNetConfig.from_diffusers(tm.config) and vcfg == VAEConfig.from_diffusers(tv.config)

    save_diffusers_unet(params, cfg, tmp_path / "out" / "unet")
    save_diffusers_vae(vparams, vcfg, tmp_path / "out" / "vae")
    assert_bit_exact(numpy_state_dict(UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet")),
                     numpy_state_dict(tm))
    assert_bit_exact(numpy_state_dict(TorchAutoencoderKL.from_pretrained(tmp_path / "out" / "vae")),
                     numpy_state_dict(tv))

    bf16, _ = load_diffusers_unet(tmp_path / "snapshot" / "unet", dtype=ml_dtypes.bfloat16)
    assert {x.dtype for x in flatten(bf16).values()} == {np.dtype(ml_dtypes.bfloat16)}


# ----------------------------------------------------------------------------- real layouts


def _check_layout(torch_model: torch.nn.Module, rules, flax_shapes: dict):
    """Every tensor of the real (meta-device, memory-free) diffusers model has exactly one rule,
    onto a parameter of the Flax model with the transposed shape."""
    flax_shapes = flatten(flax_shapes)
    by_flax = {}
    for r in rules:  # the first rule for a path is the one export uses
        by_flax.setdefault(r.flax, r)
    assert set(flax_shapes) <= set(by_flax)
    sd = torch_model.state_dict()
    assert {by_flax[p].torch for p in flax_shapes} == set(sd)
    for path, s in flax_shapes.items():
        r = by_flax[path]
        shape = tuple(s.shape)
        if r.kind == "kernel":
            shape = shape[::-1] if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
        assert tuple(sd[r.torch].shape) == shape, r.torch


@pytest.mark.parametrize("config", [SD21_BASE_UNET, SD15_UNET], ids=["sd21-base", "sd15"])
def test_real_unet_layouts(config):
    with torch.device("meta"):
        tm = UNet2DConditionModel.from_config(config)
    cfg = UNetConfig.from_diffusers(config)
    _check_layout(tm, unet_rules(cfg), unet_lib.param_shapes(cfg))


def test_real_vae_layout():
    with torch.device("meta"):
        tv = TorchAutoencoderKL.from_config(SD_VAE)
    cfg = VAEConfig.from_diffusers(SD_VAE)
    assert cfg.scaling_factor == 0.18215
    _check_layout(tv, vae_rules(cfg), vae_lib.param_shapes(cfg))
