"""CLIP's text tower and the image-text score (HF `CLIPModel`), for best-of-N re-ranking of generated images
(upstream's COCO protocol ranks 8 samples per caption with CLIP ViT-L/14).

Text: token + learned position embeddings -> pre-LN causal layers -> final_layer_norm -> the state at the
EOS token -> text_projection. Image: `ClipVision`'s last layer -> post_layernorm(CLS) -> visual_projection.
score = exp(logit_scale) * cos(image, text), HF's `logits_per_image`.

Parameter tree (HF names; kernels [in, out]; text layers unscanned, layers_0, layers_1, ...):

    text/{token_embedding,position_embedding}/embedding
    text/layers_{i}/{self_attn/{q,k,v,out}_proj, layer_norm1, mlp/{fc1,fc2}, layer_norm2}
    text/final_layer_norm   vision/... (ClipVision)   text_projection/kernel   visual_projection/kernel
    logit_scale []
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dreamjax.models import layers
from dreamjax.models.clip_vision import ACTIVATIONS, ClipVision, ClipVisionConfig


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    eos_token_id: int = 2  # 2: HF's legacy rule (the EOS is the largest id: argmax); else its first position

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> ClipTextConfig:
        return cls(vocab_size=d.get("vocab_size", 49408), hidden_size=d.get("hidden_size", 512),
                   intermediate_size=d.get("intermediate_size", 2048), num_layers=d.get("num_hidden_layers", 12),
                   num_heads=d.get("num_attention_heads", 8),
                   max_position_embeddings=d.get("max_position_embeddings", 77),
                   layer_norm_eps=d.get("layer_norm_eps", 1e-5), hidden_act=d.get("hidden_act", "quick_gelu"),
                   eos_token_id=d.get("eos_token_id", 2))


def _dense(width: int, name: str | None = None, bias: bool = True) -> nn.Dense:
    return layers.dense(width, (None, None), use_bias=bias, name=name)


class _SelfAttention(nn.Module):
    config: ClipTextConfig

    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        n = self.config.num_heads
        q, k, v = (_dense(d, f"{p}_proj")(x).reshape(b, t, n, d // n) for p in "qkv")
        out = layers.attention(q, k, v, is_causal=True).reshape(b, t, d)  # text attends causally (HF CLIP)
        return _dense(d, "out_proj")(out)


class _MLP(nn.Module):
    config: ClipTextConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        return _dense(cfg.hidden_size, "fc2")(ACTIVATIONS[cfg.hidden_act](_dense(cfg.intermediate_size, "fc1")(x)))


class _TextLayer(nn.Module):
    config: ClipTextConfig

    @nn.compact
    def __call__(self, x):
        eps = self.config.layer_norm_eps
        x = x + _SelfAttention(self.config, name="self_attn")(layers.layer_norm(eps, name="layer_norm1")(x))
        return x + _MLP(self.config, name="mlp")(layers.layer_norm(eps, name="layer_norm2")(x))


class ClipText(nn.Module):
    config: ClipTextConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """input_ids [B, T] -> pooled [B, D] (final-norm state at the EOS token)."""
        cfg = self.config
        t = input_ids.shape[1]
        tok = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="token_embedding")
        pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, name="position_embedding")
        x = tok(input_ids) + pos.embedding[None, :t]
        for i in range(cfg.num_layers):
            x = _TextLayer(cfg, name=f"layers_{i}")(x)
        x = layers.layer_norm(cfg.layer_norm_eps, name="final_layer_norm")(x)
        if cfg.eos_token_id == 2:
            eos = jnp.argmax(input_ids, axis=-1)
        else:
            eos = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
        return jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]


class ClipScorer(nn.Module):
    """CLIP image-text scores, HF `CLIPModel(...).logits_per_image` for matching rows."""

    text_config: ClipTextConfig
    vision_config: ClipVisionConfig
    projection_dim: int

    def setup(self):
        self.text = ClipText(self.text_config)
        self.vision = ClipVision(self.vision_config)
        self.text_projection = _dense(self.projection_dim, bias=False)
        self.visual_projection = _dense(self.projection_dim, bias=False)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(2.6592), ())

    def embed_text(self, input_ids):
        e = self.text_projection(self.text(input_ids))
        return e / jnp.linalg.norm(e, axis=-1, keepdims=True)

    def embed_images(self, pixels):
        last = self.vision(pixels, output_layer=-1)
        e = self.visual_projection(self.vision.pooled_output(last))
        return e / jnp.linalg.norm(e, axis=-1, keepdims=True)

    def __call__(self, input_ids, pixels):
        """Row-wise scores [B]: image b against text b."""
        return jnp.exp(self.logit_scale) * jnp.sum(self.embed_text(input_ids) * self.embed_images(pixels), axis=-1)
