"""The LLaMA decoder family (spec 1.1: Vicuna-7B v1.1 is a LLaMA-1 7B), numerically matching HF
`LlamaForCausalLM`: MHA and GQA, RoPE with explicit positions (theta, linear and Llama-3 scaling),
tied or untied head, segment (packing / padding) masks and a KV cache for decoding.

Parameter tree (kernels are 2-D [in, out], so HF conversion is a plain transpose):

    embed_tokens/embedding                       [V, D]          ("vocab", "embed")
    layers/self_attn/{q,k,v,o}_proj/kernel       [Ly, D, N*H]    ("layers", "embed", "heads") ...
    layers/mlp/{gate,up,down}_proj/kernel        [Ly, D, F]      ("layers", "embed", "mlp") ...
    layers/{input,post_attention}_layernorm/scale [Ly, D]        ("layers", "norm")
    norm/scale                                   [D]
    lm_head/kernel                               [D, V]          (untied only)

With `scan_layers=False` the layers are `layers_0`, `layers_1`, ... without the leading axis.

A parent module calls the pieces separately (that is why this uses `setup`):
    x = llm.embed(tokens); x = <write image features / queries into x>
    hidden, cache = llm(x, positions, segment_ids=..., cache=..., cache_index=...)
    logits = llm.logits(hidden)
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

# jax.checkpoint_policies usable by name (the ones that take no arguments).
REMAT_POLICIES = (
    "none",  # no rematerialisation
    "full",  # save nothing, recompute the whole layer in the backward pass
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "nothing_saveable",
    "everything_saveable",
    "checkpoint_dots",
    "checkpoint_dots_with_no_batch_dims",
)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Defaults are Vicuna-7B v1.1 (spec 1.1)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None  # None: = num_heads (MHA)
    head_dim: int | None = None  # None: hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # e.g. {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    dtype: Dtype = jnp.float32  # compute dtype
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = True
    remat_policy: str = "none"  # one of REMAT_POLICIES
    attention_impl: str | None = None  # None: layers.attention's einsums; "xla" / "cudnn": jax.nn.dot_product_attention
    # std of the normal init of every kernel and embedding (HF's name and default). 0.02 suits d ~ 4096; a
    # tiny model trained from scratch wants ~1/sqrt(d), or attention barely moves its residual stream.
    initializer_range: float = 0.02

    @property
    def kernel_init(self):
        """The init of every kernel and embedding: N(0, initializer_range)."""
        return nn.initializers.normal(self.initializer_range)

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)
        if self.num_kv_heads is None:
            set_("num_kv_heads", self.num_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads "
                                 f"{self.num_heads}")
            set_("head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads "
                             f"{self.num_kv_heads}")
        if not self.initializer_range > 0:
            raise ValueError(f"initializer_range must be > 0, got {self.initializer_range}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r} is not one of {REMAT_POLICIES}")
        if self.rope_scaling is not None:
            set_("rope_scaling", dict(self.rope_scaling))
            layers.rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)  # validates the type
        set_("dtype", jnp.dtype(self.dtype))
        set_("param_dtype", jnp.dtype(self.param_dtype))

    def __hash__(self):  # rope_scaling is a dict: hash a frozen view so the config can be a static arg
        fields = dataclasses.astuple(dataclasses.replace(self, rope_scaling=None))
        return hash((fields, tuple(sorted((self.rope_scaling or {}).items()))))

    @classmethod
    def from_hf(cls, hf: Any, **overrides) -> LlamaConfig:
        """From a HF config.json dict, a `transformers.LlamaConfig`, or a LlamaConfig (then only
        `overrides` apply). `overrides` set the JAX-only fields (dtype, scan_layers, remat_policy...).

        Reads both the transformers-4 (`rope_theta`, `rope_scaling`) and -5 (`rope_parameters`) layouts.
        """
        if isinstance(hf, LlamaConfig):
            return dataclasses.replace(hf, **overrides)
        d = dict(hf) if isinstance(hf, Mapping) else hf.to_dict()
        for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
            if d.get(key, ok) != ok:
                raise ValueError(f"unsupported LLaMA config: {key}={d[key]!r} (dreamjax supports {ok!r})")
        rope_params = dict(d.get("rope_parameters") or {})
        theta = rope_params.get("rope_theta", d.get("rope_theta")) or 10000.0
        scaling = d.get("rope_scaling") or rope_params
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        if "type" in scaling:
            scaling.setdefault("rope_type", scaling.pop("type"))
        if scaling.get("rope_type", "default") == "default":
            scaling = None
        elif scaling["rope_type"] == "llama3":
            scaling.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 2048))
        kw = dict(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"],
            num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim"),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            initializer_range=float(d.get("initializer_range", 0.02)),
        )
        kw.update(overrides)
        return cls(**kw)

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json for `LlamaForCausalLM` (readable by transformers 4 and 5)."""
        rope_parameters = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rope_parameters": rope_parameters,
            "attention_bias": False,
            "mlp_bias": False,
            "dtype": jnp.dtype(self.param_dtype).name,
        }


# ----------------------------------------------------------------------------- KV cache


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype: Dtype | None = None) -> dict:
    """An empty KV cache, a plain pytree:

    k, v         [Ly, B, Hkv, S, H]  (dtype; default the compute dtype)
    segment_ids  [B, S] int32        0 = slot not written yet (never attended to)

    Heads before slots (HF's layout): attention's batched dot reads K/V as [B, Hkv, S, H], so this layout
    needs no per-step transpose of the whole cache (it halved the cache time of a CPU decode step).
    """
    dtype = config.dtype if dtype is None else dtype
    shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
    }


def _write_layer(buf: jax.Array, layer, new: jax.Array, index: jax.Array) -> jax.Array:
    """Write new [B, L, Hkv, H] into the stacked cache buf [Ly, B, Hkv, S, H] at `layer`, row b at slots
    index[b] .. index[b] + L - 1. A scatter into the loop-carried buffer, so XLA updates it in place instead
    of rebuilding the cache every step; slots past the end are dropped."""
    b, length = new.shape[:2]
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, length))
    slots = index[:, None] + jnp.arange(length)[None, :]  # [B, L]
    return buf.at[layer, rows, :, slots, :].set(new.astype(buf.dtype), mode="drop")


def _segment_mask(q_seg: jax.Array, k_seg: jax.Array) -> jax.Array:
    """[B, T], [B, S] -> [B, 1, T, S]: same nonzero segment."""
    return ((q_seg[:, :, None] == k_seg[:, None, :]) & (q_seg[:, :, None] != 0))[:, None]


def _decode_mask(q_slot: jax.Array, q_seg: jax.Array, k_seg: jax.Array) -> jax.Array:
    """Cache attention: key slot j is visible to a query written at slot q if j <= q and both are in the
    same nonzero segment. q_slot, q_seg [B, T]; k_seg [B, S] -> [B, 1, T, S]."""
    k_slot = jnp.arange(k_seg.shape[1])
    causal = k_slot[None, None, :] <= q_slot[:, :, None]
    return causal[:, None] & _segment_mask(q_seg, k_seg)


# ----------------------------------------------------------------------------- layers


class Attention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, positions, mask, write_index, kv, layer):
        """x [B, L, D]; positions [B, L]; mask [B, 1, L, S] or None; write_index [B] or None;
        kv: the whole stacked cache {"k", "v": [Ly, B, Hkv, S, H]} or None, `layer` this layer's index in it
        -> (out [B, L, D], the cache with this layer's new keys/values written, or None)."""
        cfg = self.config
        b, length, _ = x.shape
        n, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, kernel_init=cfg.kernel_init)
        q = layers.dense(n * hd, ("embed", "heads"), name="q_proj", **kw)(x).reshape(b, length, n, hd)
        k = layers.dense(nkv * hd, ("embed", "kv_heads"), name="k_proj", **kw)(x).reshape(b, length, nkv, hd)
        v = layers.dense(nkv * hd, ("embed", "kv_heads"), name="v_proj", **kw)(x).reshape(b, length, nkv, hd)

        inv_freq = layers.rope_inv_freq(hd, cfg.rope_theta, cfg.rope_scaling)
        q = layers.apply_rope(q, positions, inv_freq)  # [B, L, N, H]
        q = layers.constrain(q, ("batch", "length", "act_heads", None))
        k = layers.apply_rope(k, positions, inv_freq)  # [B, L, Hkv, H]; not constrained: Hkv may be 1

        new_kv = None
        if kv is not None:  # decoding: write the new keys/values, attend over the whole cache
            new_kv = {n: _write_layer(kv[n], layer, a, write_index) for n, a in (("k", k), ("v", v))}
            k, v = (jnp.swapaxes(new_kv[n][layer], 1, 2).astype(q.dtype) for n in ("k", "v"))  # [B, S, Hkv, H]

        out = layers.attention(q, k, v, mask=mask, is_causal=kv is None, implementation=cfg.attention_impl)
        out = out.reshape(b, length, n * hd)  # [B, L, N*H]
        return layers.dense(cfg.hidden_size, ("heads", "embed"), name="o_proj", **kw)(out), new_kv


class DecoderLayer(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, carry, positions, mask, write_index, layer):
        """Pre-norm block; the signature is (carry, *broadcast, scanned) for `nn.scan`.

        carry: x [B, L, D], or (x, kv) when decoding: the whole stacked cache travels in the carry (each layer
        writes its own slice at index `layer`, the scanned input) so it is updated in place.
        Returns (carry, None)."""
        cfg = self.config
        x, kv = carry if isinstance(carry, tuple) else (carry, None)
        norm = dict(eps=cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        h = layers.RMSNorm(name="input_layernorm", **norm)(x)
        h, kv = Attention(cfg, name="self_attn")(h, positions, mask, write_index, kv, layer)
        x = x + h
        h = layers.RMSNorm(name="post_attention_layernorm", **norm)(x)
        x = x + layers.SwiGLU(cfg.intermediate_size, cfg.dtype, cfg.param_dtype, cfg.kernel_init, name="mlp")(h)
        x = layers.constrain(x, ("batch", "length", "act_embed"))
        return (x if kv is None else (x, kv)), None


def _layer_class(cfg: LlamaConfig) -> type[nn.Module]:
    if cfg.remat_policy == "none":
        return DecoderLayer
    policy = None if cfg.remat_policy == "full" else getattr(jax.checkpoint_policies, cfg.remat_policy)
    return nn.remat(DecoderLayer, policy=policy, prevent_cse=not cfg.scan_layers)


# ----------------------------------------------------------------------------- model


class Llama(nn.Module):
    config: LlamaConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=nn.with_logical_partitioning(cfg.kernel_init, ("vocab", "embed")),
        )
        layer = _layer_class(cfg)
        if cfg.scan_layers:
            self.layers = nn.scan(
                layer,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg)
        else:
            self.layers = [layer(cfg) for _ in range(cfg.num_layers)]  # named layers_0, layers_1, ...
        self.norm = layers.RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = layers.dense(cfg.vocab_size, ("embed", "vocab"), dtype=cfg.dtype,
                                        param_dtype=cfg.param_dtype, kernel_init=cfg.kernel_init)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, L] int -> [B, L, D] in the compute dtype."""
        return layers.constrain(self.embed_tokens(tokens), ("batch", "length", "act_embed"))

    def __call__(
        self,
        inputs_embeds: jax.Array,
        positions: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        cache: dict | None = None,
        cache_index: jax.Array | int | None = None,
    ) -> tuple[jax.Array, dict | None]:
        """The decoder stack and final RMSNorm.

        inputs_embeds [B, L, D]; positions [B, L] int (RoPE positions).
        segment_ids [B, L] int: 0 = padding, tokens attend only within their own nonzero segment
            (None: one segment). Outputs at padding positions are meaningless.
        cache / cache_index: decoding. `cache` from `init_cache`; the L new tokens are written at slots
            cache_index .. cache_index + L - 1 (cache_index: scalar or [B] int) and attend to every cached
            slot <= their own in the same segment. The caller keeps cache_index + L <= max_len.
        Returns (hidden [B, L, D] after the final norm, new cache or None).
        """
        cfg = self.config
        b, length, _ = inputs_embeds.shape
        x = layers.constrain(inputs_embeds.astype(cfg.dtype), ("batch", "length", "act_embed"))

        if cache is None:  # causal (is_causal in the layers) & same segment
            mask = None if segment_ids is None else _segment_mask(segment_ids, segment_ids)
            write_index, kv, new_seg = None, None, None
        else:
            if cache_index is None:
                raise ValueError("cache_index is required when a cache is given")
            seg = jnp.ones((b, length), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
            write_index = jnp.broadcast_to(jnp.asarray(cache_index, jnp.int32), (b,))
            rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, length))
            slots = write_index[:, None] + jnp.arange(length)[None, :]
            new_seg = cache["segment_ids"].at[rows, slots].set(seg, mode="drop")  # [B, S], as _write_layer
            q_slot = write_index[:, None] + jnp.arange(length)[None, :]  # [B, L]
            mask = _decode_mask(q_slot, seg, new_seg)
            kv = {"k": cache["k"], "v": cache["v"]}  # [Ly, B, Hkv, S, H]

        carry = x if kv is None else (x, kv)
        if cfg.scan_layers:
            carry, _ = self.layers(carry, positions, mask, write_index, jnp.arange(cfg.num_layers))
        else:
            for i, layer in enumerate(self.layers):
                carry, _ = layer(carry, positions, mask, write_index, i)
        x, new_kv = carry if kv is not None else (carry, None)

        hidden = self.norm(x)
        new_cache = None if cache is None else {**new_kv, "segment_ids": new_seg}
        return hidden, new_cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[B, L, D] -> [B, L, V] in the compute dtype (tied: hidden @ embedding.T)."""
        if self.config.tie_word_embeddings:
            out = self.embed_tokens.attend(hidden.astype(self.config.dtype))
        else:
            out = self.lm_head(hidden)
        return layers.constrain(out, ("batch", "length", "act_vocab"))

    def forward(
        self, tokens: jax.Array, positions: jax.Array | None = None, *, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        """Text-only convenience (and the method `init` uses): tokens [B, L] -> logits [B, L, V].
        positions default to 0..L-1."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        hidden, _ = self(self.embed(tokens), positions, segment_ids=segment_ids)
        return self.logits(hidden)

    def init_cache(self, batch: int, max_len: int, dtype: Dtype | None = None) -> dict:
        """See the module-level `init_cache` (usable on an unbound module)."""
        return init_cache(self.config, batch, max_len, dtype)


def init_params(config: LlamaConfig, rng: jax.Array) -> dict:
    """Random parameters, boxed with their logical axes (`nn.meta.unbox` for plain arrays).
    Under `jax.eval_shape` this gives the abstract tree for sharding and conversion checks."""
    tokens = jnp.zeros((1, 2), jnp.int32)
    return Llama(config).init(rng, tokens, method=Llama.forward)["params"]
