"""DreamLLM: CLIP features in, dream queries out, one causal LLM in between (spec 1.1-1.3).

Static-shape layout (batch contract, DESIGN section 3): the k-th `<im_start>` of a sample is followed by
`num_image_tokens` slots that take the projected CLIP features of its k-th input image; the j-th
`<dream_start>` is followed by `num_dream_queries` slots that take the learnable dream queries, and the
final-norm hidden states at those slots, through the condition projector, condition the diffusion
model for the sample's j-th output image. Slots are found from the token ids with cumulative sums,
so no Python control flow depends on the data.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dreamjax.models import layers
from dreamjax.models.clip_vision import ClipVision, ClipVisionConfig
from dreamjax.models.llama import Llama, LlamaConfig
from dreamjax.models.unet import UNet2DCondition, UNetConfig
from dreamjax.models.vae import AutoencoderKL, VAEConfig


@dataclasses.dataclass(frozen=True)
class SpecialTokenIds:
    """The ids the forward needs; always read from the tokenizer, never hard-coded (spec 1.2)."""

    bos: int
    im_start: int
    im_patch: int
    dream_start: int
    dream_end: int

    @classmethod
    def from_ids(cls, ids) -> SpecialTokenIds:
        """From any object with these attributes (e.g. `dreamjax.data.tokenizer.SpecialIds`)."""
        return cls(**{f.name: int(getattr(ids, f.name)) for f in dataclasses.fields(cls)})


# Every top-level part of the parameter tree, in a fixed order (train/stages.py names the same parts).
PARTS = ("llm", "vision", "visual_projector", "dream_queries", "condition_projector", "unet", "vae")
# The towers a model may leave out (`config.model.parts`); the connectors follow from them (see `parts`).
TOWERS = ("llm", "vision", "unet")


@dataclasses.dataclass(frozen=True)
class DreamLLMConfig:
    """A tower set to None is absent: an LLM-only model (imported from a transformers Llama) has no vision
    tower and no UNet, and so no visual projector, dream queries or condition projector either."""

    llm: LlamaConfig | None
    vision: ClipVisionConfig | None
    unet: UNetConfig | None
    vae: VAEConfig | None  # None: the diffusion model works in pixel space (the tiny demo), or there is none
    tokens: SpecialTokenIds | None  # None only without an LLM
    num_dream_queries: int = 64
    select_layer: int = -2
    dtype: Any = jnp.float32  # compute dtype of the projectors and queries

    def __post_init__(self):
        if self.vae is not None and self.unet is None:
            raise ValueError("a VAE without a UNet: config.model.vae must be None when the model has no unet")
        if self.llm is not None and self.tokens is None:
            raise ValueError("a model with an LLM needs the special token ids (from its tokenizer)")
        if not (self.llm or self.vision or self.unet):
            raise ValueError("a model needs at least one of the towers " + ", ".join(TOWERS))

    @property
    def parts(self) -> tuple[str, ...]:
        """The top-level parts of the parameter tree. A connector exists when both of its ends do: the
        visual projector with the LLM and the vision tower, the dream queries and the condition projector
        with the LLM and the UNet."""
        have = {"llm": self.llm is not None, "vision": self.vision is not None, "unet": self.unet is not None,
                "vae": self.vae is not None}
        have["visual_projector"] = have["llm"] and have["vision"]
        have["dream_queries"] = have["condition_projector"] = have["llm"] and have["unet"]
        return tuple(p for p in PARTS if have[p])

    @property
    def num_image_tokens(self) -> int:
        if self.vision is None:
            return 0
        return (self.vision.image_size // self.vision.patch_size) ** 2

    @property
    def condition_dim(self) -> int:
        return self.unet.cross_attention_dim


def _slot_index(tokens: jax.Array, start_id: int, num_slots: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """For each position: (which block it is in, offset inside the block's slots, is a slot).

    A block is `start_id` followed by `num_slots` slots. tokens [B, L] -> three [B, L] arrays.
    """
    length = tokens.shape[1]
    is_start = tokens == start_id
    block = jnp.cumsum(is_start, axis=1) - 1  # index of the most recent start token, -1 before any
    pos = jnp.arange(length)[None, :]
    last_start = jax.lax.cummax(jnp.where(is_start, pos, -1), axis=1)
    offset = pos - last_start - 1
    in_slot = (last_start >= 0) & (offset >= 0) & (offset < num_slots)
    return block, jnp.clip(offset, 0, num_slots - 1), in_slot


def block_starts(tokens: jax.Array, start_id: int, max_blocks: int) -> tuple[jax.Array, jax.Array]:
    """Positions of the first `max_blocks` occurrences of `start_id` per sample: ([B, K], present [B, K])."""
    is_start = tokens == start_id
    rank = jnp.cumsum(is_start, axis=1) - 1  # 0 for the first start, 1 for the second, ...
    k = jnp.arange(max_blocks)
    hit = is_start[:, None, :] & (rank[:, None, :] == k[None, :, None])  # [B, K, L]
    return jnp.argmax(hit, axis=-1), hit.any(axis=-1)


class DreamLLM(nn.Module):
    config: DreamLLMConfig

    def setup(self):
        cfg = self.config
        parts = cfg.parts
        self.llm = Llama(cfg.llm) if "llm" in parts else None
        self.vision = ClipVision(cfg.vision) if "vision" in parts else None
        # M_zeta: Linear(d_vision -> d_llm, bias) (spec 1.1, `LinearProjector`)
        self.visual_projector = layers.dense(
            cfg.llm.hidden_size, ("vision_embed", "embed"), use_bias=True, dtype=cfg.dtype,
            param_dtype=cfg.llm.param_dtype, kernel_init=_torch_linear_init(cfg.vision.hidden_size),
        ) if "visual_projector" in parts else None
        # 64 learnable queries, N(0, 0.02) as upstream `DreamEmbedding` (the LLM's initializer_range, 0.02
        # unless a from-scratch config changes it: same scale as the token embeddings).
        self.dream_queries = self.param(
            "dream_queries",
            nn.with_logical_partitioning(cfg.llm.kernel_init, ("queries", "embed")),
            (cfg.num_dream_queries, cfg.llm.hidden_size),
            cfg.llm.param_dtype,
        ) if "dream_queries" in parts else None
        # M_psi: Linear(d_llm -> unet cross_attention_dim, no bias).
        self.condition_projector = layers.dense(
            cfg.condition_dim, ("embed", "cross_embed"), use_bias=False, dtype=cfg.dtype,
            param_dtype=cfg.llm.param_dtype, kernel_init=_torch_linear_init(cfg.llm.hidden_size),
        ) if "condition_projector" in parts else None
        self.unet = UNet2DCondition(cfg.unet) if "unet" in parts else None
        self.vae = AutoencoderKL(cfg.vae) if "vae" in parts else None

    def _require(self, part: str, for_what: str) -> None:
        """A clear error (at trace time) when a caller needs a part this model was built without."""
        if part not in self.config.parts:
            raise ValueError(f"{for_what} needs the model's {part}, but this model has only "
                             f"{', '.join(self.config.parts)}")

    # ---------------------------------------------------------------- comprehension side

    def encode_images(self, images: jax.Array) -> jax.Array:
        """[N, H, W, 3] CLIP-normalised -> [N, num_image_tokens, d_llm] projected patch features."""
        self._require("visual_projector", "reading input images")
        hidden = self.vision(images, output_layer=self.config.select_layer)  # [N, 1 + P, Dv]
        return self.visual_projector(hidden[:, 1:])  # the CLS token is dropped (spec 1.1)

    def embed_inputs(
        self, tokens: jax.Array, images_in: jax.Array | None = None, images_in_mask: jax.Array | None = None
    ) -> jax.Array:
        """Token embeddings with dream queries and projected CLIP features written into their slots.

        tokens [B, L]; images_in [B, Ni, H, W, 3]; images_in_mask [B, Ni]. A slot whose image is absent
        keeps its `<im_patch>` embedding, as upstream does for surplus `<im_start>` tokens.
        """
        cfg = self.config
        self._require("llm", "embedding tokens")
        x = self.llm.embed(tokens)  # [B, L, D]

        if self.dream_queries is not None:  # an LLM-only model has no dream queries to write
            block, offset, in_slot = _slot_index(tokens, cfg.tokens.dream_start, cfg.num_dream_queries)
            queries = self.dream_queries.astype(x.dtype)[offset]  # [B, L, D]
            x = jnp.where(in_slot[..., None], queries, x)

        if images_in is not None:
            b, ni = images_in.shape[:2]
            n = cfg.num_image_tokens
            feats = self.encode_images(images_in.reshape((b * ni,) + images_in.shape[2:]))
            feats = feats.reshape(b, ni * n, -1).astype(x.dtype)  # [B, Ni * N, D]
            block, offset, in_slot = _slot_index(tokens, cfg.tokens.im_start, n)
            present = (block >= 0) & (block < ni)
            if images_in_mask is not None:
                present &= jnp.take_along_axis(images_in_mask, jnp.clip(block, 0, ni - 1), axis=1)
            flat_index = jnp.clip(block, 0, ni - 1) * n + offset
            gathered = jnp.take_along_axis(feats, flat_index[..., None], axis=1)
            x = jnp.where((in_slot & present)[..., None], gathered, x)
        return x

    def condition(self, hidden: jax.Array, tokens: jax.Array, max_images: int) -> tuple[jax.Array, jax.Array]:
        """Projected final-norm states at the dream-query slots of the first `max_images` `<dream_start>`s.

        hidden [B, L, D] -> (condition [B, No, Q, C], present [B, No]).
        """
        self._require("condition_projector", "conditioning the diffusion model")
        q = self.config.num_dream_queries
        starts, present = block_starts(tokens, self.config.tokens.dream_start, max_images)  # [B, No]
        idx = starts[..., None] + 1 + jnp.arange(q)  # [B, No, Q]
        idx = jnp.clip(idx, 0, hidden.shape[1] - 1)
        b, no = starts.shape
        gathered = jnp.take_along_axis(hidden, idx.reshape(b, no * q)[..., None], axis=1)
        return self.condition_projector(gathered.reshape(b, no, q, -1)), present

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None = None,
        images_in: jax.Array | None = None,
        images_in_mask: jax.Array | None = None,
        max_images_out: int = 0,
    ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
        """Training forward: (logits [B, L, V], condition [B, No, Q, C] or None, present [B, No] or None)."""
        x = self.embed_inputs(tokens, images_in, images_in_mask)
        hidden, _ = self.llm(x, positions, segment_ids=segment_ids)
        logits = self.llm.logits(hidden)
        if max_images_out == 0:
            return logits, None, None
        cond, present = self.condition(hidden, tokens, max_images_out)
        return logits, cond, present

    def run_llm(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None,
                cache: dict | None = None, cache_index: jax.Array | int | None = None):
        """The LLM on already-built embeddings (decoding with a KV cache): (hidden, cache)."""
        return self.llm(x, positions, segment_ids=segment_ids, cache=cache, cache_index=cache_index)

    def lm_logits(self, hidden: jax.Array) -> jax.Array:
        return self.llm.logits(hidden)

    # ---------------------------------------------------------------- creation side

    def to_latents(self, images: jax.Array, key: jax.Array) -> jax.Array:
        """[N, R, R, 3] in [-1, 1] -> diffusion-space sample: VAE latents * scaling factor, or pixels."""
        self._require("unet", "diffusion")
        if self.vae is None:
            return images
        mean, logvar = self.vae.encode(images)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
        return z * self.config.vae.scaling_factor

    def from_latents(self, latents: jax.Array) -> jax.Array:
        if self.vae is None:
            return latents
        return self.vae.decode(latents / self.config.vae.scaling_factor)

    def denoise(self, noisy: jax.Array, timesteps: jax.Array, condition: jax.Array) -> jax.Array:
        """The UNet's prediction for noisy [N, h, w, c] at timesteps [N] given condition [N, Q, C]."""
        self._require("unet", "diffusion")
        return self.unet(noisy, timesteps, condition)

    def init_all(self, tokens, positions, images_in, images_out):
        """Touches every submodule of the parts the model has once (for `init`)."""
        parts = self.config.parts
        out = []
        cond = None
        if "llm" in parts:
            logits, cond, _ = self(tokens, positions, None, images_in if "vision" in parts else None, None,
                                   max_images_out=1 if "condition_projector" in parts else 0)
            out.append(logits)
        elif "vision" in parts:
            out.append(self.vision(images_in[:, 0], output_layer=self.config.select_layer))
        if "unet" in parts:
            n = images_out.shape[0]
            latents = self.to_latents(images_out, jax.random.PRNGKey(0))
            if cond is None:  # a diffusion-only model: any condition of the right width
                cond = jnp.zeros((1, 1, 1, self.config.condition_dim), latents.dtype)
            out.append(self.denoise(latents, jnp.zeros((n,), jnp.int32), cond[:1, 0].repeat(n, axis=0)))
            out.append(self.from_latents(latents))
        return out


def _torch_linear_init(fan_in: int):
    """PyTorch's default nn.Linear init, U(+-1/sqrt(fan_in)): both projectors keep it upstream (spec 1.1)."""
    bound = 1.0 / (fan_in**0.5)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _build(cls, section: str, values: dict, **extra):
    try:
        return cls(**{**values, **extra})
    except TypeError as e:  # an unknown or missing field: name the config section
        raise ValueError(f"config.model.{section}: {e}") from None


def build_config(model: dict, *, vocab_size: int | None, tokens: SpecialTokenIds | None, dtype=jnp.float32,
                 param_dtype=jnp.float32) -> DreamLLMConfig:
    """DreamLLMConfig from the plain-dict `config.model` section (configs/*.py) and the tokenizer.

    `model["parts"]`: None (every tower) or a list of the towers the model has (`TOWERS`); the sections of the
    others are ignored. The VAE goes with the UNet when `model["vae"]` is set.
    """
    model = {k: (dict(v) if hasattr(v, "items") else v) for k, v in dict(model).items()}
    known = {"llm", "vision", "unet", "vae", "schedule", "num_dream_queries", "select_layer", "parts"}
    unknown = set(model) - known
    if unknown:
        raise ValueError(f"config.model: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    towers = model_towers(model)
    prec = dict(dtype=dtype, param_dtype=param_dtype)
    llm = vision = unet = vae = None
    if "llm" in towers:
        llm = _build(LlamaConfig, "llm", model["llm"], vocab_size=vocab_size, **prec)
    if "vision" in towers:
        vision = _build(ClipVisionConfig, "vision", model["vision"], **prec)
        if vision.image_size % vision.patch_size:
            raise ValueError(f"config.model.vision: image_size {vision.image_size} is not a multiple of "
                             f"patch_size {vision.patch_size}")
    if "unet" in towers:
        try:
            unet = UNetConfig.from_diffusers(model["unet"], **prec)
            vae = None if model.get("vae") is None else VAEConfig.from_diffusers(model["vae"], **prec)
        except (TypeError, KeyError) as e:
            raise ValueError(f"config.model.unet / vae: {e}") from None
    cfg = DreamLLMConfig(llm=llm, vision=vision, unet=unet, vae=vae, tokens=tokens if llm else None,
                         num_dream_queries=int(model.get("num_dream_queries", 64)),
                         select_layer=int(model.get("select_layer", -2)), dtype=dtype)
    if cfg.num_dream_queries < 1:
        raise ValueError(f"config.model.num_dream_queries must be >= 1, got {cfg.num_dream_queries}")
    return cfg


def model_towers(model: dict) -> tuple[str, ...]:
    """The towers `config.model` asks for: its `parts` list, or every tower when it is None."""
    parts = model.get("parts")
    if parts is None:
        return TOWERS
    parts = tuple(parts)
    bad = set(parts) - set(TOWERS)
    if bad or not parts:
        raise ValueError(f"config.model.parts must be a non-empty list of {list(TOWERS)} (the connectors follow "
                         f"from them), got {list(parts)}")
    return tuple(t for t in TOWERS if t in parts)


def init_params(model: DreamLLM, rng: jax.Array, batch: int = 1, length: int = 8) -> dict:
    """Boxed random parameters of every part (`jax.eval_shape` it for the abstract tree)."""
    cfg = model.config
    tokens = jnp.zeros((batch, length), jnp.int32)
    r_in = cfg.vision.image_size if cfg.vision is not None else 1
    images_in = jnp.zeros((batch, 1, r_in, r_in, 3), jnp.float32)
    images_out = jnp.zeros((1, 1, 1, 3))
    if cfg.unet is not None:
        r_out = cfg.unet.sample_size * (cfg.vae.downsample_factor if cfg.vae is not None else 1)
        images_out = jnp.zeros((1, r_out, r_out, cfg.vae.in_channels if cfg.vae else cfg.unet.in_channels))
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    return model.init(rng, tokens, positions, images_in, images_out, method=DreamLLM.init_all)["params"]
