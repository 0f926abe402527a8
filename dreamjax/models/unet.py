"""UNet2DConditionModel (Stable Diffusion 1.x / 2.x layouts) in Flax linen, NHWC.

Built from a diffusers config (`UNetConfig.from_diffusers`) so Stable Diffusion 2.1-base (linear
proj_in/proj_out, a head count per block) and 1.5 (1x1-conv proj_in, one head count) load unchanged
through `dreamjax.convert.diffusers`. Parameter names mirror the diffusers state dict
(``down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k`` ->
``down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_k``).

diffusers naming quirk: in SD configs ``attention_head_dim`` is really the *number of heads* of each
block (diffusers passes it on as ``num_attention_heads``, and ``num_attention_heads`` itself must be
unset); the per-head size is ``channels // heads``. `UNetConfig.attention_head_dim` keeps the
diffusers name and meaning; use `UNetConfig.num_heads(i)`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dreamjax.models import layers
from dreamjax.models.diffusion_blocks import (
    Downsample2D,
    ResnetBlock2D,
    Upsample2D,
    check_fixed_options,
    first_size,
)

Dtype = Any

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers UNet2DConditionModel options that dreamjax implements only at these (default) values.
_UNET_FIXED: dict[str, Any] = {
    "act_fn": "silu",
    "center_input_sample": False,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "dual_cross_attention": False,
    "num_attention_heads": None,
    "class_embed_type": None,
    "num_class_embeds": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}


def _per_block(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    """An int or a per-block list -> a tuple of n ints."""
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries for {n} blocks: {value}")
    return value


def _compact(values: tuple[int, ...]) -> int | list[int]:
    """Inverse of `_per_block` for export: one int when every block agrees."""
    return values[0] if len(set(values)) == 1 else list(values)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """UNet2DConditionModel hyper-parameters. Defaults are Stable Diffusion 2.1-base."""

    in_channels: int = 4
    out_channels: int = 4
    sample_size: int | None = 64  # latent size the model was trained at (informational)
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    attention_head_dim: tuple[int, ...] = (5, 10, 20, 20)  # NUMBER of heads per block (diffusers quirk)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    cross_attention_dim: int = 1024
    use_linear_projection: bool = True  # SD 2.x: Linear proj_in/out; SD 1.x: 1x1 Conv
    upcast_attention: bool = False  # attention logits in fp32 (softmax is always fp32 here)
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    # JAX-only settings (not part of the diffusers config)
    dtype: Dtype = jnp.float32  # compute dtype
    param_dtype: Dtype = jnp.float32
    remat: bool = False  # rematerialise every resnet / transformer block in the backward pass
    attention_impl: str | None = None  # None: layers.attention's einsums; "xla" / "cudnn": jax.nn.dot_product_attention
    # Queries per chunk of a memory-efficient self-attention (layers.chunked_attention) when the latent has
    # more positions than this; None: one [T, T] score tensor (fastest where it fits).
    attention_chunk: int | None = None

    def __post_init__(self):
        if self.norm_num_groups is None:
            raise ValueError("UNetConfig: norm_num_groups=None (no output norm) is not supported")
        n = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types", "layers_per_block", "attention_head_dim",
                     "transformer_layers_per_block"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"UNetConfig.{name} needs one entry per block ({n}): {getattr(self, name)}")
        bad = [t for t in self.down_block_types if t not in DOWN_BLOCK_TYPES]
        bad += [t for t in self.up_block_types if t not in UP_BLOCK_TYPES]
        if bad:
            raise ValueError(f"UNetConfig: unsupported block types {bad}; supported: "
                             f"{DOWN_BLOCK_TYPES + UP_BLOCK_TYPES}")
        for c, heads in zip(self.block_out_channels, self.attention_head_dim):
            if c % heads or c % self.norm_num_groups:
                raise ValueError(f"UNetConfig: {c} channels are not divisible by {heads} heads "
                                 f"and {self.norm_num_groups} groups")

    def num_heads(self, block: int) -> int:
        """Attention heads of down block `block` (the mid block uses the last one)."""
        return self.attention_head_dim[block]

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], **overrides) -> UNetConfig:
        """From a diffusers UNet2DConditionModel config (its config.json as a dict, or `model.config`).

        overrides: JAX-only fields (dtype, param_dtype, remat, attention_impl, attention_chunk) or any field.
        """
        config = dict(config)
        check_fixed_options(config, _UNET_FIXED, "UNet2DConditionModel")
        n = len(config.get("block_out_channels", cls.block_out_channels))
        cross = config.get("cross_attention_dim", 1280)
        if not isinstance(cross, int):
            if len(set(cross)) != 1:
                raise ValueError(f"UNet2DConditionModel: per-block cross_attention_dim {cross} unsupported")
            cross = int(cross[0])
        kwargs = dict(
            in_channels=config.get("in_channels", 4),
            out_channels=config.get("out_channels", 4),
            sample_size=first_size(config.get("sample_size")),
            block_out_channels=tuple(config.get("block_out_channels", cls.block_out_channels)),
            down_block_types=tuple(config.get("down_block_types", cls.down_block_types)),
            up_block_types=tuple(config.get("up_block_types", cls.up_block_types)),
            layers_per_block=_per_block(config.get("layers_per_block", 2), n, "layers_per_block"),
            attention_head_dim=_per_block(config.get("attention_head_dim", 8), n, "attention_head_dim"),
            transformer_layers_per_block=_per_block(
                config.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block"),
            cross_attention_dim=cross,
            use_linear_projection=bool(config.get("use_linear_projection", False)),
            upcast_attention=bool(config.get("upcast_attention", False)),
            norm_num_groups=config.get("norm_num_groups", 32),
            norm_eps=float(config.get("norm_eps", 1e-5)),
            flip_sin_to_cos=bool(config.get("flip_sin_to_cos", True)),
            freq_shift=config.get("freq_shift", 0),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_diffusers_dict(self) -> dict[str, Any]:
        """A config dict `UNet2DConditionModel.from_config` accepts (and config.json content)."""
        return {
            "_class_name": "UNet2DConditionModel",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "sample_size": self.sample_size,
            "block_out_channels": list(self.block_out_channels),
            "down_block_types": list(self.down_block_types),
            "up_block_types": list(self.up_block_types),
            "layers_per_block": _compact(self.layers_per_block),
            "attention_head_dim": list(self.attention_head_dim),
            "transformer_layers_per_block": _compact(self.transformer_layers_per_block),
            "cross_attention_dim": self.cross_attention_dim,
            "use_linear_projection": self.use_linear_projection,
            "upcast_attention": self.upcast_attention,
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": self.norm_eps,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift,
            **_UNET_FIXED,
        }


# ----------------------------------------------------------------------------- time embedding


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """diffusers `get_timestep_embedding`: [B] (possibly fractional) timesteps -> [B, dim] fp32 features."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]  # [B, half]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


# ----------------------------------------------------------------------------- transformer


class Attention(nn.Module):
    """diffusers `Attention` as used in BasicTransformerBlock: q/k/v without bias, to_out.0 with bias.
    Self-attention when `context` is None, cross-attention over `context` otherwise."""

    heads: int
    head_dim: int
    cfg: UNetConfig

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        # x: [B, T, D]; context: [B, S, Dc] or None
        b, t, d = x.shape
        kw = dict(dtype=self.cfg.dtype, param_dtype=self.cfg.param_dtype)
        inner = self.heads * self.head_dim
        src = x if context is None else context
        q = layers.torch_dense(inner, ("embed", "heads"), name="to_q", **kw)(x)
        k = layers.torch_dense(inner, ("embed", "heads"), name="to_k", **kw)(src)
        v = layers.torch_dense(inner, ("embed", "heads"), name="to_v", **kw)(src)
        q, k, v = (y.reshape(b, y.shape[1], self.heads, self.head_dim) for y in (q, k, v))  # [B, T|S, N, Dh]
        out_dtype = q.dtype
        if self.cfg.upcast_attention:
            q, k, v = (y.astype(jnp.float32) for y in (q, k, v))
        o = layers.attention(q, k, v, implementation=self.cfg.attention_impl, chunk=self.cfg.attention_chunk)
        o = o.astype(out_dtype)
        o = o.reshape(b, t, inner)
        return layers.torch_dense(d, ("heads", "embed"), use_bias=True, name="to_out_0", **kw)(o)


class GEGLU(nn.Module):
    """proj to 2*inner, then value * gelu(gate) (exact erf gelu, as torch F.gelu)."""

    inner: int
    cfg: UNetConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = layers.torch_dense(2 * self.inner, ("embed", "mlp"), use_bias=True, name="proj",
                         dtype=self.cfg.dtype, param_dtype=self.cfg.param_dtype)(x)
        value, gate = jnp.split(h, 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers FeedForward(activation_fn="geglu", mult=4): net.0 = GEGLU, net.2 = Linear."""

    cfg: UNetConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        h = GEGLU(4 * d, self.cfg, name="net_0")(x)
        return layers.torch_dense(d, ("mlp", "embed"), use_bias=True, name="net_2",
                            dtype=self.cfg.dtype, param_dtype=self.cfg.param_dtype)(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LN: self-attention, cross-attention on the condition, GEGLU feed-forward (LayerNorm eps 1e-5)."""

    heads: int
    head_dim: int
    cfg: UNetConfig

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        # x: [B, T, D]; context: [B, S, Dc]
        kw = dict(dtype=self.cfg.dtype, param_dtype=self.cfg.param_dtype)
        x = x + Attention(self.heads, self.head_dim, self.cfg, name="attn1")(
            layers.layer_norm(1e-5, name="norm1", **kw)(x))
        x = x + Attention(self.heads, self.head_dim, self.cfg, name="attn2")(
            layers.layer_norm(1e-5, name="norm2", **kw)(x), context)
        x = x + FeedForward(self.cfg, name="ff")(layers.layer_norm(1e-5, name="norm3", **kw)(x))
        return x


class Transformer2D(nn.Module):
    """diffusers Transformer2DModel on continuous input: GroupNorm (eps 1e-6) -> proj_in -> blocks
    -> proj_out, plus the residual. proj_in/out are Linear (SD 2.x) or 1x1 Conv (SD 1.x)."""

    heads: int
    num_layers: int
    cfg: UNetConfig

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape  # [B, H, W, C]; inner dim = C (heads * C // heads)
        cfg = self.cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        h = layers.group_norm(cfg.norm_num_groups, 1e-6, name="norm", **kw)(x)
        if cfg.use_linear_projection:
            h = h.reshape(b, -1, c)
            h = layers.torch_dense(c, ("conv_in", "embed"), use_bias=True, name="proj_in", **kw)(h)
        else:
            h = layers.conv(c, 1, padding=0, name="proj_in", **kw)(h).reshape(b, -1, c)
        # h: [B, H*W, C] (row-major positions, the order of torch's permute(0, 2, 3, 1).reshape)
        for i in range(self.num_layers):
            block = BasicTransformerBlock(self.heads, c // self.heads, cfg, name=f"transformer_blocks_{i}")
            h = block(h, context)
        if cfg.use_linear_projection:
            h = layers.torch_dense(c, ("embed", "conv_out"), use_bias=True, name="proj_out", **kw)(h)
            h = h.reshape(b, hgt, wid, c)
        else:
            h = layers.conv(c, 1, padding=0, name="proj_out", **kw)(h.reshape(b, hgt, wid, c))
        return h + x


# ----------------------------------------------------------------------------- UNet blocks


def _resnet_cls(cfg: UNetConfig):
    return nn.remat(ResnetBlock2D) if cfg.remat else ResnetBlock2D


def _transformer_cls(cfg: UNetConfig):
    return nn.remat(Transformer2D) if cfg.remat else Transformer2D


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D (with_attention) or DownBlock2D: `num_layers` x (resnet [+ transformer]),
    then an optional stride-2 conv. Returns the output and the skip activations for the up path."""

    out_channels: int
    num_layers: int
    with_attention: bool
    heads: int
    transformer_layers: int
    add_downsample: bool
    cfg: UNetConfig

    @nn.compact
    def __call__(self, x, temb, context):
        cfg = self.cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        skips = []
        for i in range(self.num_layers):
            x = _resnet_cls(cfg)(self.out_channels, cfg.norm_num_groups, cfg.norm_eps, name=f"resnets_{i}",
                                 **kw)(x, temb)
            if self.with_attention:
                x = _transformer_cls(cfg)(self.heads, self.transformer_layers, cfg, name=f"attentions_{i}")(
                    x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, padding=1, name="downsamplers_0", **kw)(x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D (with_attention) or UpBlock2D: each layer concatenates one skip activation
    (last first) onto the channels, then resnet [+ transformer]; then an optional x2 upsample."""

    out_channels: int
    num_layers: int
    with_attention: bool
    heads: int
    transformer_layers: int
    add_upsample: bool
    cfg: UNetConfig

    @nn.compact
    def __call__(self, x, skips, temb, context):
        cfg = self.cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        skips = list(skips)
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips.pop()], axis=-1)  # torch.cat([hidden, res], dim=1)
            x = _resnet_cls(cfg)(self.out_channels, cfg.norm_num_groups, cfg.norm_eps, name=f"resnets_{i}",
                                 **kw)(x, temb)
            if self.with_attention:
                x = _transformer_cls(cfg)(self.heads, self.transformer_layers, cfg, name=f"attentions_{i}")(
                    x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x)
        return x


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet -> transformer -> resnet at the lowest resolution."""

    cfg: UNetConfig

    @nn.compact
    def __call__(self, x, temb, context):
        cfg = self.cfg
        c = cfg.block_out_channels[-1]
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        x = _resnet_cls(cfg)(c, cfg.norm_num_groups, cfg.norm_eps, name="resnets_0", **kw)(x, temb)
        x = _transformer_cls(cfg)(cfg.num_heads(-1), cfg.transformer_layers_per_block[-1], cfg,
                                  name="attentions_0")(x, context)
        return _resnet_cls(cfg)(c, cfg.norm_num_groups, cfg.norm_eps, name="resnets_1", **kw)(x, temb)


# ----------------------------------------------------------------------------- model


class TimestepEmbedding(nn.Module):
    """linear_1 -> silu -> linear_2."""

    features: int
    cfg: UNetConfig

    @nn.compact
    def __call__(self, t_emb: jax.Array) -> jax.Array:
        kw = dict(dtype=self.cfg.dtype, param_dtype=self.cfg.param_dtype)
        h = layers.torch_dense(self.features, ("conv_in", "mlp"), use_bias=True, name="linear_1", **kw)(t_emb)
        return layers.torch_dense(self.features, ("mlp", "embed"), use_bias=True, name="linear_2", **kw)(nn.silu(h))


class UNet2DCondition(nn.Module):
    """Conditional UNet. `__call__(sample, timesteps, encoder_hidden_states)`:

    sample                [B, H, W, Cin]  NHWC latents; H and W divisible by 2**(len(blocks) - 1)
    timesteps             [B] (or scalar) int or float diffusion timesteps
    encoder_hidden_states [B, S, cross_attention_dim]
    returns               [B, H, W, Cout] in cfg.dtype (epsilon for SD 2.1-base)
    """

    cfg: UNetConfig

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array | int | float,
                 encoder_hidden_states: jax.Array) -> jax.Array:
        cfg = self.cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        n = len(cfg.block_out_channels)
        b, hgt, wid, _ = sample.shape
        factor = 2 ** (n - 1)
        if hgt % factor or wid % factor:
            raise ValueError(f"UNet2DCondition: sample size {hgt}x{wid} must be divisible by {factor}")
        context = encoder_hidden_states.astype(cfg.dtype)

        # 1. time embedding: [B] -> [B, C0] sinusoidal (fp32) -> [B, 4*C0]
        t = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
        t_emb = timestep_embedding(t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                   freq_shift=cfg.freq_shift).astype(cfg.dtype)
        temb = TimestepEmbedding(cfg.time_embed_dim, cfg, name="time_embedding")(t_emb)

        # 2. down path, keeping every intermediate activation for the skips
        x = layers.conv(cfg.block_out_channels[0], 3, padding=1, name="conv_in", **kw)(sample)
        skips = [x]
        for i, block_type in enumerate(cfg.down_block_types):
            x, res = DownBlock(
                out_channels=cfg.block_out_channels[i],
                num_layers=cfg.layers_per_block[i],
                with_attention=block_type == "CrossAttnDownBlock2D",
                heads=cfg.num_heads(i),
                transformer_layers=cfg.transformer_layers_per_block[i],
                add_downsample=i < n - 1,
                cfg=cfg,
                name=f"down_blocks_{i}",
            )(x, temb, context)
            skips += res

        # 3. mid
        x = MidBlock(cfg, name="mid_block")(x, temb, context)

        # 4. up path (per-block lists reversed); block i consumes layers_per_block + 1 skips
        for i, block_type in enumerate(cfg.up_block_types):
            r = n - 1 - i
            num_layers = cfg.layers_per_block[r] + 1
            res, skips = skips[-num_layers:], skips[:-num_layers]
            x = UpBlock(
                out_channels=cfg.block_out_channels[r],
                num_layers=num_layers,
                with_attention=block_type == "CrossAttnUpBlock2D",
                heads=cfg.num_heads(r),
                transformer_layers=cfg.transformer_layers_per_block[r],
                add_upsample=i < n - 1,
                cfg=cfg,
                name=f"up_blocks_{i}",
            )(x, res, temb, context)

        # 5. out
        x = layers.group_norm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(x)
        x = nn.silu(x)
        return layers.conv(cfg.out_channels, 3, padding=1, name="conv_out", **kw)(x)


def init_inputs(cfg: UNetConfig, batch: int = 1, seq: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Smallest valid (sample, timesteps, encoder_hidden_states) for `init` / `jax.eval_shape`."""
    size = 2 ** (len(cfg.block_out_channels) - 1)
    return (jnp.zeros((batch, size, size, cfg.in_channels), cfg.dtype),
            jnp.zeros((batch,), jnp.int32),
            jnp.zeros((batch, seq, cfg.cross_attention_dim), cfg.dtype))


def param_shapes(cfg: UNetConfig) -> dict:
    """The parameter tree as unboxed ShapeDtypeStructs (no computation, no memory)."""
    model = UNet2DCondition(cfg)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *init_inputs(cfg)))
    return nn.meta.unbox(boxed)["params"]
