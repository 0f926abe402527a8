"""Benchmark cases: one random PyTorch reference model per dreamjax model, and the same weights in Flax.

Each builder makes a transformers / diffusers model from a config (random weights, perturbed so norms and
biases are not trivial), converts its state dict with the dreamjax converter, and returns a `Case` that
holds both sides' forward functions and inputs (the same numbers, in each framework's layout) plus the
glue to compare outputs and parameter gradients.

Sizes: "default" is small-but-not-trivial (seconds of work per step on 2 CPU cores); "tiny" is for the
smoke test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

SIZES = ("default", "tiny")


@dataclasses.dataclass
class Case:
    name: str
    description: str  # model size / input shape, printed under the table
    torch_model: torch.nn.Module
    torch_forward: Callable[[torch.nn.Module], torch.Tensor]  # (torch_model or a compiled copy) -> output
    jax_apply: Callable[..., jax.Array]  # (params, *inputs) -> output
    jax_params: Any  # pytree of jax arrays
    jax_inputs: tuple
    to_jax_layout: Callable[[np.ndarray], np.ndarray]  # torch output -> the JAX output's layout
    grads_to_flax: Callable[[dict[str, torch.Tensor]], Any]  # torch {name: grad} -> Flax-layout tree


def _perturb(model: torch.nn.Module, seed: int, std: float = 0.02) -> torch.nn.Module:
    """Add noise to every parameter so zero biases / unit norms / zero-init layers are not special."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def _to_jax(params: Any) -> Any:
    return jax.tree.map(jnp.asarray, params)


def _nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1))


# ----------------------------------------------------------------------------- LLaMA


LLAMA_SIZES = {
    # LLaMA proportions (intermediate ~ 2.7 x hidden, head_dim 64) at a CPU-friendly scale.
    "default": dict(vocab=4096, hidden=256, intermediate=688, layers=4, heads=4, batch=4, seq=256),
    "tiny": dict(vocab=256, hidden=64, intermediate=128, layers=2, heads=4, batch=2, seq=32),
}


def llama(size: str = "default", seed: int = 0) -> Case:
    import transformers

    from dreamjax.convert.hf import llama_from_torch
    from dreamjax.models.llama import Llama, LlamaConfig

    s = LLAMA_SIZES[size]
    hf_cfg = transformers.LlamaConfig(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
        max_position_embeddings=max(2048, s["seq"]), rms_norm_eps=1e-5, tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    model = _perturb(transformers.LlamaForCausalLM(hf_cfg), seed)
    cfg = LlamaConfig.from_hf(model.config)
    params = _to_jax(llama_from_torch(model.state_dict(), cfg))

    tokens = np.random.default_rng(seed).integers(0, s["vocab"], (s["batch"], s["seq"])).astype(np.int32)
    tokens_t = torch.from_numpy(tokens).long()

    def torch_forward(m):
        return m(input_ids=tokens_t, use_cache=False).logits

    def jax_apply(p, tok):
        return Llama(cfg).apply({"params": p}, tok, method=Llama.forward)

    n_params = sum(p.numel() for p in model.parameters())
    return Case(
        name="llama",
        description=(f"LLaMA hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads, vocab {s['vocab']} "
                     f"({n_params / 1e6:.1f}M params); tokens [{s['batch']}, {s['seq']}] -> logits"),
        torch_model=model,
        torch_forward=torch_forward,
        jax_apply=jax_apply,
        jax_params=params,
        jax_inputs=(jnp.asarray(tokens),),
        to_jax_layout=np.asarray,
        grads_to_flax=lambda g: llama_from_torch(g, cfg),
    )


# ----------------------------------------------------------------------------- CLIP vision


CLIP_SIZES = {
    "default": dict(hidden=256, intermediate=1024, layers=4, heads=4, image=64, patch=8, batch=16),
    "tiny": dict(hidden=32, intermediate=64, layers=2, heads=4, image=16, patch=4, batch=2),
}


def clip(size: str = "default", seed: int = 0) -> Case:
    import transformers

    from dreamjax.convert.hf import clip_vision_from_torch
    from dreamjax.models.clip_vision import ClipVision, ClipVisionConfig

    s = CLIP_SIZES[size]
    hf_cfg = transformers.CLIPVisionConfig(
        hidden_size=s["hidden"], intermediate_size=s["intermediate"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], image_size=s["image"], patch_size=s["patch"], hidden_act="quick_gelu",
        layer_norm_eps=1e-5, attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    model = _perturb(transformers.CLIPVisionModel(hf_cfg), seed)
    cfg = ClipVisionConfig.from_hf(model.config)
    params = _to_jax(clip_vision_from_torch(model.state_dict(), cfg))

    pixels = np.random.default_rng(seed).standard_normal((s["batch"], 3, s["image"], s["image"]))
    pixels = pixels.astype(np.float32)
    pixels_t = torch.from_numpy(pixels)

    def torch_forward(m):  # last_hidden_state = hidden_states[-1] (encoder output, before post_layernorm)
        return m(pixel_values=pixels_t).last_hidden_state

    def jax_apply(p, px):
        return ClipVision(cfg).apply({"params": p}, px, output_layer=-1)

    n_params = sum(p.numel() for p in model.parameters())
    tokens = (s["image"] // s["patch"]) ** 2 + 1
    return Case(
        name="clip",
        description=(f"CLIP ViT hidden {s['hidden']}, {s['layers']} layers, {s['image']}px / patch {s['patch']} "
                     f"({n_params / 1e6:.1f}M params); pixels [{s['batch']}, 3, {s['image']}, {s['image']}] "
                     f"-> last hidden state [{s['batch']}, {tokens}, {s['hidden']}]"),
        torch_model=model,
        torch_forward=torch_forward,
        jax_apply=jax_apply,
        jax_params=params,
        jax_inputs=(jnp.asarray(_nchw_to_nhwc(pixels)),),
        to_jax_layout=np.asarray,
        grads_to_flax=lambda g: clip_vision_from_torch(g, cfg),
    )


# ----------------------------------------------------------------------------- UNet


UNET_SIZES = {
    # Stable Diffusion 2.x layout (linear proj_in/out, cross-attention in the first block, a head count per
    # block) with two resolution levels.
    # Batch 4 (not 8) keeps the default run within ~3 minutes on 2 cores: one torch fwd+bwd is seconds.
    "default": dict(channels=(64, 128), heads=(2, 4), groups=32, cross=128, ctx_len=77, image=32, batch=4),
    "tiny": dict(channels=(16, 32), heads=(2, 4), groups=8, cross=16, ctx_len=4, image=8, batch=2),
}


def unet(size: str = "default", seed: int = 0) -> Case:
    from diffusers import UNet2DConditionModel

    from dreamjax.convert.diffusers import unet_from_torch
    from dreamjax.models.unet import UNet2DCondition, UNetConfig

    s = UNET_SIZES[size]
    torch.manual_seed(seed)
    model = UNet2DConditionModel(
        sample_size=s["image"], in_channels=4, out_channels=4, block_out_channels=list(s["channels"]),
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        layers_per_block=2, attention_head_dim=list(s["heads"]), cross_attention_dim=s["cross"],
        use_linear_projection=True, norm_num_groups=s["groups"],
    )
    model = _perturb(model, seed)
    cfg = UNetConfig.from_diffusers(model.config)
    params = _to_jax(unet_from_torch(model.state_dict(), cfg))

    rng = np.random.default_rng(seed)
    b, hw = s["batch"], s["image"]
    sample = rng.standard_normal((b, 4, hw, hw)).astype(np.float32)
    timesteps = rng.integers(0, 1000, (b,)).astype(np.int32)
    context = rng.standard_normal((b, s["ctx_len"], s["cross"])).astype(np.float32)
    sample_t, t_t, ctx_t = torch.from_numpy(sample), torch.from_numpy(timesteps).long(), torch.from_numpy(context)

    def torch_forward(m):
        return m(sample_t, t_t, encoder_hidden_states=ctx_t).sample

    def jax_apply(p, x, t, c):
        return UNet2DCondition(cfg).apply({"params": p}, x, t, c)

    n_params = sum(p.numel() for p in model.parameters())
    return Case(
        name="unet",
        description=(f"UNet2DCondition SD-2.x-like, channels {s['channels']}, heads {s['heads']} "
                     f"({n_params / 1e6:.1f}M params); sample [{b}, 4, {hw}, {hw}], context "
                     f"[{b}, {s['ctx_len']}, {s['cross']}]"),
        torch_model=model,
        torch_forward=torch_forward,
        jax_apply=jax_apply,
        jax_params=params,
        jax_inputs=(jnp.asarray(_nchw_to_nhwc(sample)), jnp.asarray(timesteps), jnp.asarray(context)),
        to_jax_layout=_nchw_to_nhwc,
        grads_to_flax=lambda g: unet_from_torch(g, cfg),
    )


BUILDERS: dict[str, Callable[..., Case]] = {"llama": llama, "clip": clip, "unet": unet}
