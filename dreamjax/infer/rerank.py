"""Best-of-N re-ranking by CLIP image-text score, from a local transformers `CLIPModel` directory
(config.json, weights, tokenizer), converted to JAX (`models/clip_text.py`); no torch needed.

    scorer = ClipReranker("/models/clip-vit-large-patch14")
    scores = scorer(images_uint8, captions)       # [M], HF `logits_per_image` for matching rows
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dreamjax.convert import core, hf
from dreamjax.convert.core import Rule
from dreamjax.data import images as imgs
from dreamjax.models.clip_text import ClipScorer, ClipTextConfig
from dreamjax.models.clip_vision import ClipVisionConfig

IGNORE = (r"position_ids$",)


def clip_rules(text: ClipTextConfig, vision: ClipVisionConfig) -> list[Rule]:
    """HF `CLIPModel` state dict -> `ClipScorer` params."""
    t = "text_model."
    rules = [Rule(f"{t}embeddings.token_embedding.weight", "text/token_embedding/embedding"),
             Rule(f"{t}embeddings.position_embedding.weight", "text/position_embedding/embedding"),
             Rule(f"{t}final_layer_norm.weight", "text/final_layer_norm/scale"),
             Rule(f"{t}final_layer_norm.bias", "text/final_layer_norm/bias"),
             Rule("text_projection.weight", "text_projection/kernel", "kernel"),
             Rule("visual_projection.weight", "visual_projection/kernel", "kernel"),
             Rule("logit_scale", "logit_scale")]
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                 "mlp.fc2"):
        flax_name = "text/layers_{i}/" + name.replace(".", "/")
        rules += [Rule(f"{t}encoder.layers.{{i}}.{name}.weight", f"{flax_name}/kernel", "kernel"),
                  Rule(f"{t}encoder.layers.{{i}}.{name}.bias", f"{flax_name}/bias")]
    for name in ("layer_norm1", "layer_norm2"):
        rules += [Rule(f"{t}encoder.layers.{{i}}.{name}.weight", f"text/layers_{{i}}/{name}/scale"),
                  Rule(f"{t}encoder.layers.{{i}}.{name}.bias", f"text/layers_{{i}}/{name}/bias")]
    return rules + core.prefixed(hf.clip_vision_rules(vision, "vision_model."), flax_prefix="vision")


@functools.partial(jax.jit, static_argnames=("model",))
def _scores(model: ClipScorer, params, input_ids, pixels):
    return model.apply({"params": params}, input_ids, pixels)


class ClipReranker:
    """CLIP image-text scores with the weights and tokenizer of a local `CLIPModel` directory."""

    def __init__(self, path: str, batch: int = 64):
        from transformers import AutoTokenizer

        if not os.path.isdir(path):
            raise FileNotFoundError(f"--rerank: CLIP checkpoint directory not found: {path}")
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        if "text_config" not in config or "vision_config" not in config:
            raise ValueError(f"--rerank: {path} is not a CLIPModel checkpoint (config.json lacks text_config / "
                             "vision_config)")
        self.text_config = ClipTextConfig.from_hf(config["text_config"])
        self.vision_config = ClipVisionConfig.from_hf(config["vision_config"])
        self.model = ClipScorer(self.text_config, self.vision_config, int(config.get("projection_dim", 512)))
        state = core.load_state_dict(path)
        params = core.torch_to_flax(state, clip_rules(self.text_config, self.vision_config), ignore=IGNORE,
                                    what=f"CLIP checkpoint {path}")
        self.params = jax.tree.map(jnp.asarray, params)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.batch = batch

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        ids = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=self.text_config.max_position_embeddings)["input_ids"]
        return np.asarray(ids, np.int32)

    def __call__(self, images: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """images uint8 [M, H, W, 3], texts [M] -> scores [M] (image m against text m)."""
        side = self.vision_config.image_size
        out = []
        for start in range(0, len(texts), self.batch):
            chunk = slice(start, start + self.batch)
            pixels = np.stack([imgs.clip_preprocess(np.asarray(im), side) for im in images[chunk]])
            out.append(np.asarray(_scores(self.model, self.params, self.tokenize(texts[chunk]), pixels)))
        return np.concatenate(out) if out else np.zeros((0,), np.float32)
