"""CLIP ViT vision tower (spec 1.1: `openai/clip-vit-large-patch14` at 224 px), matching HF
`CLIPVisionModel(..., output_hidden_states=True).hidden_states`.

Pre-LN transformer: patch conv (no bias) + class token + learned positions -> `pre_layrnorm` ->
layers (LN -> MHA -> residual, LN -> fc1 -> quick_gelu -> fc2 -> residual). DreamLLM reads
`hidden_states[-2]` without the CLS token, so `output_layer` stops early and skips the last layer.

Parameter tree (HF names; kernels [in, out], the patch conv [p, p, C, D]):

    embeddings/{class_embedding [D], patch_embedding/kernel, position_embedding/embedding [1+P, D]}
    pre_layrnorm/{scale,bias}
    layers/{self_attn/{q,k,v,out}_proj, layer_norm1, mlp/{fc1,fc2}, layer_norm2}  (stacked [Ly, ...])
    post_layernorm/{scale,bias}   (HF pooled output only; kept so checkpoints round-trip)

With `scan_layers=False` the layers are `layers_0`, `layers_1`, ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dreamjax.models import layers
from dreamjax.models.layers import Dtype

# HF CLIPVisionConfig defaults, used for keys a config.json leaves out.
_HF_DEFAULTS = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
    patch_size=32, num_channels=3, layer_norm_eps=1e-5, hidden_act="quick_gelu",
)

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig:
    """Defaults are ViT-L/14 at 224 px (spec 1.1)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    dtype: Dtype = jnp.float32  # compute dtype
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = True
    attention_impl: str | None = None

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads "
                             f"{self.num_heads}")
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, hf: Any, **overrides) -> ClipVisionConfig:
        """From a `CLIPVisionConfig` / `CLIPConfig` (its vision_config is used), either as an object or a
        config.json dict, or from a ClipVisionConfig (then only `overrides` apply)."""
        if isinstance(hf, ClipVisionConfig):
            return dataclasses.replace(hf, **overrides)
        d = dict(hf) if isinstance(hf, Mapping) else hf.to_dict()
        if "vision_config" in d:  # a full CLIPConfig
            d = dict(d["vision_config"] or {})
        d = {**_HF_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
        kw = dict(
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"],
            image_size=d["image_size"],
            patch_size=d["patch_size"],
            num_channels=d["num_channels"],
            layer_norm_eps=d["layer_norm_eps"],
            hidden_act=d["hidden_act"],
        )
        kw.update(overrides)
        return cls(**kw)

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json for `CLIPVisionModel`."""
        return {
            "architectures": ["CLIPVisionModel"],
            "model_type": "clip_vision_model",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "num_channels": self.num_channels,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": self.hidden_act,
            "dtype": jnp.dtype(self.param_dtype).name,
        }


def select_features(hidden_states: jax.Array, select_layer: int = -2) -> jax.Array:
    """Patch features without the CLS token: [B, P, D].

    hidden_states: the full stack [Ly+1, B, 1+P, D] from `ClipVision(pixels)` (then `select_layer`
    indexes it as HF's `hidden_states[select_layer]`), or the single state [B, 1+P, D] that
    `ClipVision(pixels, output_layer=select_layer)` returns (then it is already selected).
    """
    if hidden_states.ndim == 4:
        hidden_states = hidden_states[select_layer]
    return hidden_states[:, 1:]


# ----------------------------------------------------------------------------- modules


class ClipVisionEmbeddings(nn.Module):
    config: ClipVisionConfig

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels [B, H, W, C] -> [B, 1+P, D]: CLS token then patches in row-major order, plus positions."""
        cfg = self.config
        b = pixels.shape[0]
        d = cfg.hidden_size
        class_embedding = self.param(
            "class_embedding", nn.with_logical_partitioning(nn.initializers.normal(d**-0.5), ("embed",)),
            (d,), cfg.param_dtype,
        )
        patch = layers.conv(d, cfg.patch_size, stride=cfg.patch_size, padding="VALID", use_bias=False,
                            dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="patch_embedding")
        x = patch(pixels.astype(cfg.dtype))  # [B, H/p, W/p, D]
        x = x.reshape(b, -1, d)  # [B, P, D]
        cls = jnp.broadcast_to(class_embedding.astype(cfg.dtype), (b, 1, d))
        x = jnp.concatenate([cls, x], axis=1)  # [B, 1+P, D]
        positions = nn.Embed(
            cfg.num_patches + 1, d, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
            name="position_embedding",
        )
        return x + positions.embedding.astype(cfg.dtype)[None]


class ClipAttention(nn.Module):
    config: ClipVisionConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        b, t, d = x.shape
        n = cfg.num_heads
        kw = dict(use_bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        q = layers.dense(d, ("embed", "heads"), name="q_proj", **kw)(x).reshape(b, t, n, d // n)
        k = layers.dense(d, ("embed", "heads"), name="k_proj", **kw)(x).reshape(b, t, n, d // n)
        v = layers.dense(d, ("embed", "heads"), name="v_proj", **kw)(x).reshape(b, t, n, d // n)
        out = layers.attention(q, k, v, implementation=cfg.attention_impl).reshape(b, t, d)
        return layers.dense(d, ("heads", "embed"), name="out_proj", **kw)(out)


class ClipMLP(nn.Module):
    config: ClipVisionConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(use_bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        h = layers.dense(cfg.intermediate_size, ("embed", "mlp"), name="fc1", **kw)(x)
        h = layers.constrain(ACTIVATIONS[cfg.hidden_act](h), ("batch", "length", "act_mlp"))
        return layers.dense(cfg.hidden_size, ("mlp", "embed"), name="fc2", **kw)(h)


class ClipEncoderLayer(nn.Module):
    """One pre-LN block. `__call__` is the `nn.scan` body; `block` is the layer itself."""

    config: ClipVisionConfig

    def setup(self):
        cfg = self.config
        ln = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.layer_norm1 = layers.layer_norm(cfg.layer_norm_eps, **ln)
        self.self_attn = ClipAttention(cfg)
        self.layer_norm2 = layers.layer_norm(cfg.layer_norm_eps, **ln)
        self.mlp = ClipMLP(cfg)

    def block(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        x = x + self.mlp(self.layer_norm2(x))
        return layers.constrain(x, ("batch", "length", "act_embed"))

    def __call__(self, x, index, num_active: int | None, collect: bool):
        """x [B, T, D] carry; index: this layer's 0-based index (scanned). Layers with index >= num_active
        pass x through (lax.cond: they cost nothing at run time). collect: also emit x as a scan output."""
        if num_active is None or self.is_initializing():  # init runs every layer to create its params
            x = self.block(x)
        else:
            x = nn.cond(index < num_active, lambda m, h: m.block(h), lambda m, h: h, self, x)
        return x, (x if collect else None)


class ClipVision(nn.Module):
    config: ClipVisionConfig

    def setup(self):
        cfg = self.config
        ln = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.embeddings = ClipVisionEmbeddings(cfg)
        self.pre_layrnorm = layers.layer_norm(cfg.layer_norm_eps, **ln)  # (sic: HF's spelling)
        if cfg.scan_layers:
            self.layers = nn.scan(
                ClipEncoderLayer,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg)
        else:
            self.layers = [ClipEncoderLayer(cfg) for _ in range(cfg.num_layers)]  # layers_0, layers_1, ...
        self.post_layernorm = layers.layer_norm(cfg.layer_norm_eps, **ln)

    def __call__(self, pixels: jax.Array, *, output_layer: int | None = None) -> jax.Array:
        """pixels [B, H, W, C] (NHWC, CLIP-normalised).

        output_layer None: every hidden state, [Ly+1, B, 1+P, D], index i as HF `hidden_states[i]`
            (0 = embeddings after pre_layrnorm, i = output of layer i).
        output_layer int (negative counts from the end, as HF): only `hidden_states[output_layer]`,
            [B, 1+P, D]; the layers after it do not run.
        """
        cfg = self.config
        depth = cfg.num_layers + 1
        if output_layer is not None and not -depth <= output_layer < depth:
            raise ValueError(f"output_layer {output_layer} out of range for {cfg.num_layers} layers")
        x = self.pre_layrnorm(self.embeddings(pixels))  # [B, 1+P, D]
        if self.is_initializing():
            self.post_layernorm(x[:, 0])  # create its params (used by `pooled_output` only)

        collect = output_layer is None
        num_active = None if collect else output_layer % depth  # hidden_states[k] needs k layers
        if cfg.scan_layers:
            if num_active == cfg.num_layers:
                num_active = None
            out, ys = self.layers(x, jnp.arange(cfg.num_layers), num_active, collect)
            return jnp.concatenate([x[None], ys]) if collect else out  # ys lacks the embeddings: prepend
        states = [x]
        for i, layer in enumerate(self.layers):
            if num_active is not None and i >= num_active and not self.is_initializing():
                break
            x = layer.block(x)
            states.append(x)
        return jnp.stack(states) if collect else states[num_active]

    def pooled_output(self, last_hidden: jax.Array) -> jax.Array:
        """HF `pooler_output`: post_layernorm of the CLS state of the last layer. [B, 1+P, D] -> [B, D]."""
        return self.post_layernorm(last_hidden[:, 0])


def init_params(config: ClipVisionConfig, rng: jax.Array) -> dict:
    """Random parameters, boxed with their logical axes (`nn.meta.unbox` for plain arrays)."""
    pixels = jnp.zeros((1, config.image_size, config.image_size, config.num_channels), jnp.float32)
    return ClipVision(config).init(rng, pixels)["params"]
