"""diffusers UNet2DConditionModel / AutoencoderKL <-> dreamjax parameter trees.

The name tables are generated from the config: one concrete `Rule` per tensor of every block the
config builds (so a key of a block the config does not have is reported as unexpected). Tensor
layout changes (Linear [out, in] -> [in, out], Conv OIHW -> HWIO) are the generic `kind="kernel"`
transposes of `dreamjax.convert.core`; nothing here touches tensors by hand.

Loading a directory: either a component folder (``config.json`` + ``diffusion_pytorch_model.
{safetensors,bin}``) or a pipeline snapshot (e.g. ``stable-diffusion-2-1-base``) with ``unet/`` and
``vae/`` sub-folders.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from dreamjax.convert.core import (
    ConversionError,
    Rule,
    flax_to_torch,
    load_state_dict,
    save_safetensors,
    torch_to_flax,
)
from dreamjax.models import unet as unet_lib
from dreamjax.models import vae as vae_lib
from dreamjax.models.unet import UNetConfig
from dreamjax.models.vae import VAEConfig

# ----------------------------------------------------------------------------- rule builders
# Every builder takes a torch module path ("down_blocks.0.resnets.1"); the Flax path is the same
# with list indices joined by "_" ("down_blocks_0/resnets_1"), see `flax_path`.


def flax_path(torch_path: str) -> str:
    """``down_blocks.0.attentions.1.to_out.0`` -> ``down_blocks_0/attentions_1/to_out_0``."""
    parts: list[str] = []
    for part in torch_path.split("."):
        if part.isdigit() and parts:
            parts[-1] += f"_{part}"
        else:
            parts.append(part)
    return "/".join(parts)


def _param(t: str, bias: bool = True, *, f: str | None = None) -> list[Rule]:
    """A Linear or Conv2d: weight -> kernel (transposed), bias -> bias. `f` overrides the Flax path."""
    f = f or flax_path(t)
    rules = [Rule(f"{t}.weight", f"{f}/kernel", "kernel")]
    return rules + [Rule(f"{t}.bias", f"{f}/bias")] if bias else rules


def _norm(t: str) -> list[Rule]:
    """GroupNorm / LayerNorm: weight -> scale, bias -> bias."""
    f = flax_path(t)
    return [Rule(f"{t}.weight", f"{f}/scale"), Rule(f"{t}.bias", f"{f}/bias")]


def _resnet(t: str, temb: bool) -> list[Rule]:
    rules = _norm(f"{t}.norm1") + _param(f"{t}.conv1") + _norm(f"{t}.norm2") + _param(f"{t}.conv2")
    if temb:
        rules += _param(f"{t}.time_emb_proj")
    # Only resnets that change the channel count have a shortcut; a rule that matches nothing is
    # harmless, and the expected-tree check catches a shortcut the model lacks.
    return rules + _param(f"{t}.conv_shortcut")


def _transformer(t: str, num_layers: int) -> list[Rule]:
    """Transformer2DModel (continuous input); proj_in/out are Linear or 1x1 Conv alike."""
    rules = _norm(f"{t}.norm") + _param(f"{t}.proj_in")
    for i in range(num_layers):
        b = f"{t}.transformer_blocks.{i}"
        rules += _norm(f"{b}.norm1") + _norm(f"{b}.norm2") + _norm(f"{b}.norm3")
        for a in (f"{b}.attn1", f"{b}.attn2"):
            rules += _param(f"{a}.to_q", False) + _param(f"{a}.to_k", False) + _param(f"{a}.to_v", False)
            rules += _param(f"{a}.to_out.0")
        rules += _param(f"{b}.ff.net.0.proj") + _param(f"{b}.ff.net.2")
    return rules + _param(f"{t}.proj_out")


def _vae_attention(t: str) -> list[Rule]:
    """The VAE mid-block attention. Current names first (they are what export writes), then the
    pre-0.15 names (query/key/value/proj_attn) that older checkpoints such as the SD 2.1 hub files use."""
    current = ("to_q", "to_k", "to_v", "to_out.0")
    legacy = ("query", "key", "value", "proj_attn")
    rules = _norm(f"{t}.group_norm")
    rules += [r for name in current for r in _param(f"{t}.{name}")]
    return rules + [r for old, name in zip(legacy, current)
                    for r in _param(f"{t}.{old}", f=flax_path(f"{t}.{name}"))]


def unet_rules(cfg: UNetConfig) -> list[Rule]:
    """diffusers UNet2DConditionModel state-dict names <-> `UNet2DCondition` parameter paths."""
    n = len(cfg.block_out_channels)
    rules = _param("conv_in") + _param("time_embedding.linear_1") + _param("time_embedding.linear_2")
    for i, kind in enumerate(cfg.down_block_types):
        for j in range(cfg.layers_per_block[i]):
            rules += _resnet(f"down_blocks.{i}.resnets.{j}", temb=True)
            if kind == "CrossAttnDownBlock2D":
                rules += _transformer(f"down_blocks.{i}.attentions.{j}", cfg.transformer_layers_per_block[i])
        if i < n - 1:
            rules += _param(f"down_blocks.{i}.downsamplers.0.conv")
    rules += _resnet("mid_block.resnets.0", temb=True)
    rules += _transformer("mid_block.attentions.0", cfg.transformer_layers_per_block[-1])
    rules += _resnet("mid_block.resnets.1", temb=True)
    for i, kind in enumerate(cfg.up_block_types):
        r = n - 1 - i  # up blocks read the per-block lists in reverse
        for j in range(cfg.layers_per_block[r] + 1):
            rules += _resnet(f"up_blocks.{i}.resnets.{j}", temb=True)
            if kind == "CrossAttnUpBlock2D":
                rules += _transformer(f"up_blocks.{i}.attentions.{j}", cfg.transformer_layers_per_block[r])
        if i < n - 1:
            rules += _param(f"up_blocks.{i}.upsamplers.0.conv")
    return rules + _norm("conv_norm_out") + _param("conv_out")


def _vae_mid(t: str, attention: bool) -> list[Rule]:
    rules = _resnet(f"{t}.resnets.0", temb=False)
    if attention:
        rules += _vae_attention(f"{t}.attentions.0")
    return rules + _resnet(f"{t}.resnets.1", temb=False)


def vae_rules(cfg: VAEConfig) -> list[Rule]:
    """diffusers AutoencoderKL state-dict names <-> `AutoencoderKL` parameter paths."""
    n = len(cfg.block_out_channels)
    rules = _param("encoder.conv_in")
    for i in range(n):
        for j in range(cfg.layers_per_block):
            rules += _resnet(f"encoder.down_blocks.{i}.resnets.{j}", temb=False)
        if i < n - 1:
            rules += _param(f"encoder.down_blocks.{i}.downsamplers.0.conv")
    rules += _vae_mid("encoder.mid_block", cfg.mid_block_add_attention)
    rules += _norm("encoder.conv_norm_out") + _param("encoder.conv_out")
    if cfg.use_quant_conv:
        rules += _param("quant_conv")
    if cfg.use_post_quant_conv:
        rules += _param("post_quant_conv")
    rules += _param("decoder.conv_in") + _vae_mid("decoder.mid_block", cfg.mid_block_add_attention)
    for i in range(n):
        for j in range(cfg.layers_per_block + 1):
            rules += _resnet(f"decoder.up_blocks.{i}.resnets.{j}", temb=False)
        if i < n - 1:
            rules += _param(f"decoder.up_blocks.{i}.upsamplers.0.conv")
    return rules + _norm("decoder.conv_norm_out") + _param("decoder.conv_out")


# ----------------------------------------------------------------------------- state dicts


def _unbox(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """Accept both plain and logically-partitioned (boxed) parameter trees, with or without 'params'."""
    import flax.linen as nn

    params = nn.meta.unbox(params)
    return params["params"] if set(params) == {"params"} else params


def unet_from_torch(state_dict: Mapping[str, Any], cfg: UNetConfig) -> dict:
    """A diffusers UNet state dict (torch or numpy) -> `UNet2DCondition` params (numpy, same dtypes)."""
    return torch_to_flax(state_dict, unet_rules(cfg), expected=unet_lib.param_shapes(cfg),
                         what="diffusers UNet2DConditionModel")


def unet_to_torch(params: Mapping[str, Any], cfg: UNetConfig) -> dict[str, np.ndarray]:
    """`UNet2DCondition` params -> {diffusers key: numpy array in torch layout}."""
    return flax_to_torch(_unbox(params), unet_rules(cfg), what="UNet2DCondition params")


def vae_from_torch(state_dict: Mapping[str, Any], cfg: VAEConfig) -> dict:
    """A diffusers AutoencoderKL state dict -> `AutoencoderKL` params (numpy, same dtypes)."""
    return torch_to_flax(state_dict, vae_rules(cfg), expected=vae_lib.param_shapes(cfg),
                         what="diffusers AutoencoderKL")


def vae_to_torch(params: Mapping[str, Any], cfg: VAEConfig) -> dict[str, np.ndarray]:
    """`AutoencoderKL` params -> {diffusers key: numpy array in torch layout} (current attention names)."""
    return flax_to_torch(_unbox(params), vae_rules(cfg), what="AutoencoderKL params")


# ----------------------------------------------------------------------------- directories


def _component_dir(path: str | os.PathLike, subfolder: str, what: str) -> str:
    """`path` itself if it holds config.json, else `path/subfolder` (a pipeline snapshot)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ConversionError(f"{what}: path does not exist: {path}")
    if not os.path.isdir(path):
        raise ConversionError(f"{what}: not a directory: {path}")
    for cand in (path, os.path.join(path, subfolder)):
        if os.path.isfile(os.path.join(cand, "config.json")):
            return cand
    raise ConversionError(f"{what}: no config.json in {path} or {os.path.join(path, subfolder)}")


def _read_config(directory: str, class_name: str, what: str) -> dict:
    file = os.path.join(directory, "config.json")
    try:
        with open(file) as fh:
            config = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{what}: cannot read {file}: {e}") from e
    found = config.get("_class_name", class_name)
    if found != class_name:
        raise ConversionError(f"{what}: {file} is an {found} config, not {class_name}")
    return config


def _cast(params: dict, dtype) -> dict:
    if dtype is None:
        return params
    import jax

    return jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype), params)


def load_diffusers_unet(path: str | os.PathLike, *, dtype=None,
                        **config_overrides) -> tuple[dict, UNetConfig]:
    """Load (params, cfg) from a diffusers UNet folder or a pipeline snapshot with a ``unet/`` folder.

    dtype: cast the parameters (e.g. jnp.bfloat16); default keeps the file's dtype.
    config_overrides: JAX-only UNetConfig fields (dtype, param_dtype, remat, attention_impl, attention_chunk).
    """
    what = "diffusers UNet"
    directory = _component_dir(path, "unet", what)
    config = _read_config(directory, "UNet2DConditionModel", what)
    try:
        cfg = UNetConfig.from_diffusers(config, **config_overrides)
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{what} in {directory}: {e}") from e
    params = unet_from_torch(load_state_dict(directory), cfg)
    return _cast(params, dtype), cfg


def load_diffusers_vae(path: str | os.PathLike, *, dtype=None,
                       **config_overrides) -> tuple[dict, VAEConfig]:
    """Load (params, cfg) from a diffusers AutoencoderKL folder or a pipeline snapshot with ``vae/``."""
    what = "diffusers VAE"
    directory = _component_dir(path, "vae", what)
    config = _read_config(directory, "AutoencoderKL", what)
    try:
        cfg = VAEConfig.from_diffusers(config, **config_overrides)
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{what} in {directory}: {e}") from e
    params = vae_from_torch(load_state_dict(directory), cfg)
    return _cast(params, dtype), cfg


def _save(tensors: dict[str, np.ndarray], config: dict, out_dir: str | os.PathLike) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    save_safetensors(tensors, os.path.join(out_dir, "diffusion_pytorch_model.safetensors"))


def save_diffusers_unet(params: Mapping[str, Any], cfg: UNetConfig, out_dir: str | os.PathLike) -> None:
    """Write a folder `diffusers.UNet2DConditionModel.from_pretrained` loads."""
    _save(unet_to_torch(params, cfg), cfg.to_diffusers_dict(), out_dir)


def save_diffusers_vae(params: Mapping[str, Any], cfg: VAEConfig, out_dir: str | os.PathLike) -> None:
    """Write a folder `diffusers.AutoencoderKL.from_pretrained` loads."""
    _save(vae_to_torch(params, cfg), cfg.to_diffusers_dict(), out_dir)
