"""transformers LLaMA / CLIP-vision checkpoints <-> dreamjax parameter trees.

All the knowledge is in the two name tables (`llama_rules`, `clip_vision_rules`); the generic mapper in
`core` does the rest, so import and export are bit-exact inverses (dtypes, bf16 included, are kept).
RoPE uses HF's rotate_half convention on both sides, so q/k need no permutation.

Import checks the result against the model's abstract parameter tree and raises one `ConversionError`
naming every missing, unexpected or misshapen key. Exported tensors are numpy arrays in torch layout
(`core.to_torch` turns one into a torch tensor).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from dreamjax.convert import core
from dreamjax.convert.core import ConversionError, Rule
from dreamjax.models import clip_vision, llama
from dreamjax.models.clip_vision import ClipVisionConfig
from dreamjax.models.llama import LlamaConfig

# Non-persistent buffers that older checkpoints still contain.
LLAMA_IGNORE = (r"(^|\.)rotary_emb\.inv_freq$",)
CLIP_IGNORE = (r"(^|\.)embeddings\.position_ids$",)
# The text half of a full CLIPModel checkpoint, dropped when only the vision tower is loaded.
CLIP_TEXT_KEYS = (r"^text_model\.", r"^logit_scale$", r"^text_projection\.", r"^visual_projection\.")


def _layer_path(scan_layers: bool) -> str:
    """Flax path of layer {i}: one stacked subtree under nn.scan, else one subtree per layer."""
    return "layers" if scan_layers else "layers_{i}"


# ----------------------------------------------------------------------------- name tables


def llama_rules(cfg: LlamaConfig) -> list[Rule]:
    """HF `LlamaForCausalLM` state dict <-> `Llama` params."""
    lp = _layer_path(cfg.scan_layers)
    rules = [
        Rule("model.embed_tokens.weight", "embed_tokens/embedding"),
        Rule("model.norm.weight", "norm/scale"),
    ]
    if not cfg.tie_word_embeddings:
        rules.append(Rule("lm_head.weight", "lm_head/kernel", "kernel"))
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        rules.append(
            Rule(f"model.layers.{{i}}.self_attn.{name}.weight", f"{lp}/self_attn/{name}/kernel", "kernel"))
    for name in ("gate_proj", "up_proj", "down_proj"):
        rules.append(Rule(f"model.layers.{{i}}.mlp.{name}.weight", f"{lp}/mlp/{name}/kernel", "kernel"))
    for name in ("input_layernorm", "post_attention_layernorm"):
        rules.append(Rule(f"model.layers.{{i}}.{name}.weight", f"{lp}/{name}/scale"))
    return rules


def clip_vision_rules(cfg: ClipVisionConfig, prefix: str = "vision_model.") -> list[Rule]:
    """HF CLIP vision state dict <-> `ClipVision` params. `prefix` is the torch key prefix:
    "vision_model." (CLIPModel / CLIPVisionModel files), "" (transformers-5 `CLIPVisionModel.state_dict()`),
    "clip_vision_model.vision_model." (inside DreamLLM checkpoints)."""
    lp = _layer_path(cfg.scan_layers)
    rules = [
        Rule("embeddings.class_embedding", "embeddings/class_embedding"),
        Rule("embeddings.patch_embedding.weight", "embeddings/patch_embedding/kernel", "kernel"),
        Rule("embeddings.position_embedding.weight", "embeddings/position_embedding/embedding"),
    ]
    for name in ("pre_layrnorm", "post_layernorm"):
        rules += [Rule(f"{name}.weight", f"{name}/scale"), Rule(f"{name}.bias", f"{name}/bias")]
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                 "mlp.fc1", "mlp.fc2"):
        flax_name = f"{lp}/{name.replace('.', '/')}"
        rules += [Rule(f"encoder.layers.{{i}}.{name}.weight", f"{flax_name}/kernel", "kernel"),
                  Rule(f"encoder.layers.{{i}}.{name}.bias", f"{flax_name}/bias")]
    for name in ("layer_norm1", "layer_norm2"):
        rules += [Rule(f"encoder.layers.{{i}}.{name}.weight", f"{lp}/{name}/scale"),
                  Rule(f"encoder.layers.{{i}}.{name}.bias", f"{lp}/{name}/bias")]
    return core.prefixed(rules, torch_prefix=prefix)


# ----------------------------------------------------------------------------- abstract trees


def llama_param_shapes(cfg: LlamaConfig) -> dict:
    """The model's parameter tree as ShapeDtypeStructs (no memory allocated)."""
    return nn.meta.unbox(jax.eval_shape(lambda: llama.init_params(cfg, jax.random.key(0))))


def clip_vision_param_shapes(cfg: ClipVisionConfig) -> dict:
    return nn.meta.unbox(jax.eval_shape(lambda: clip_vision.init_params(cfg, jax.random.key(0))))


# ----------------------------------------------------------------------------- key check


def expected_torch_keys(rules: list[Rule], num_layers: int) -> set[str]:
    """Every torch key the rules expect, with {i} expanded over the layers."""
    keys = set()
    for r in rules:
        keys |= {r.torch.format(i=i) for i in range(num_layers)} if r.torch_vars else {r.torch}
    return keys


def check_keys(state_dict: Mapping[str, Any], rules: list[Rule], num_layers: int, ignore, what: str) -> None:
    """Raise one ConversionError naming the missing and unexpected torch keys (in torch names, which the
    generic shape check cannot do for a missing layer of a stacked tensor)."""
    expected = expected_torch_keys(rules, num_layers)
    present = {k for k in state_dict if not any(re.search(p, k) for p in ignore)}
    missing, unexpected = expected - present, present - expected
    problems = []
    if missing:
        problems.append(f"missing keys: {core._fmt_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {core._fmt_keys(unexpected)}")
    if problems:
        raise ConversionError(f"{what}: " + "; ".join(problems))


# ----------------------------------------------------------------------------- LLaMA


def llama_from_torch(state_dict: Mapping[str, Any], cfg: LlamaConfig) -> dict:
    """HF `LlamaForCausalLM` state dict (torch tensors or numpy) -> nested dict of numpy params.

    Tied embeddings: an `lm_head.weight` in the state dict (transformers keeps one in `state_dict()`)
    is ignored, as HF itself does. `rotary_emb.inv_freq` buffers are ignored.
    """
    ignore = LLAMA_IGNORE + ((r"^lm_head\.weight$",) if cfg.tie_word_embeddings else ())
    rules, what = llama_rules(cfg), "LLaMA state dict"
    check_keys(state_dict, rules, cfg.num_layers, ignore, what)
    return core.torch_to_flax(state_dict, rules, ignore=ignore, expected=llama_param_shapes(cfg), what=what)


def llama_to_torch(params: Mapping[str, Any], cfg: LlamaConfig) -> dict[str, np.ndarray]:
    """`Llama` params -> {HF key: numpy array in torch layout}. Tied: no `lm_head.weight`."""
    return core.flax_to_torch(nn.meta.unbox(params), llama_rules(cfg), what="LLaMA params")


# ----------------------------------------------------------------------------- CLIP vision

_CLIP_ANCHOR = re.compile(
    r"^(.*?)(embeddings\.(class_embedding|patch_embedding\.weight|position_embedding\.weight)"
    r"|pre_layrnorm\.|encoder\.layers\.\d+\.)"
)


def detect_clip_prefix(state_dict: Mapping[str, Any]) -> str:
    """The torch key prefix of the CLIP vision tower in `state_dict` ("vision_model.", "", ...)."""
    for key in state_dict:
        m = _CLIP_ANCHOR.match(key)
        if m and not m.group(1).startswith("text_model"):
            return m.group(1)
    raise ConversionError("no CLIP vision weights found (no key like '*embeddings.patch_embedding.weight')")


def clip_vision_from_torch(
    state_dict: Mapping[str, Any], cfg: ClipVisionConfig, *, prefix: str | None = None, ignore=()
) -> dict:
    """HF CLIP vision state dict -> nested dict of numpy params.

    prefix: torch key prefix (see `clip_vision_rules`); None detects it. ignore: extra key regexes to drop
    (e.g. `CLIP_TEXT_KEYS` for a full CLIPModel checkpoint).
    """
    prefix = detect_clip_prefix(state_dict) if prefix is None else prefix
    rules, what = clip_vision_rules(cfg, prefix), "CLIP vision state dict"
    ignore = CLIP_IGNORE + tuple(ignore)
    check_keys(state_dict, rules, cfg.num_layers, ignore, what)
    expected = clip_vision_param_shapes(cfg)
    return core.torch_to_flax(state_dict, rules, ignore=ignore, expected=expected, what=what)


def clip_vision_to_torch(params: Mapping[str, Any], cfg: ClipVisionConfig,
                         *, prefix: str = "vision_model.") -> dict[str, np.ndarray]:
    """`ClipVision` params -> {HF key: numpy array in torch layout} (a `CLIPVisionModel` file by default)."""
    rules = clip_vision_rules(cfg, prefix)
    return core.flax_to_torch(nn.meta.unbox(params), rules, what="CLIP vision params")


# ----------------------------------------------------------------------------- directories


def read_hf_config(path: str | os.PathLike) -> dict:
    """config.json of a HF model directory, with a clear error for a bad path."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ConversionError(f"not a model directory (does not exist or is a file): {path}")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConversionError(f"no config.json in {path}")
    try:
        with open(cfg_path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read {cfg_path}: {e}") from e


def _cast(params: dict, dtype) -> dict:
    return jax.tree.map(lambda x: np.asarray(x).astype(dtype, copy=False), params)


def load_hf_llama(path: str | os.PathLike, **overrides) -> tuple[dict, LlamaConfig]:
    """A local HF LLaMA directory (config.json + safetensors / bin, sharded or not) -> (params, config).

    `overrides` set LlamaConfig fields (dtype, param_dtype, scan_layers, ...); params come back as numpy
    arrays in `config.param_dtype`.
    """
    cfg = LlamaConfig.from_hf(read_hf_config(path), **overrides)
    params = llama_from_torch(core.load_state_dict(path), cfg)
    return _cast(params, cfg.param_dtype), cfg


def load_hf_clip(path: str | os.PathLike, **overrides) -> tuple[dict, ClipVisionConfig]:
    """A local HF `CLIPVisionModel` or full `CLIPModel` directory (its text half is dropped) ->
    (vision params in `config.param_dtype`, config)."""
    hf_cfg = read_hf_config(path)
    cfg = ClipVisionConfig.from_hf(hf_cfg, **overrides)
    ignore = CLIP_TEXT_KEYS if "vision_config" in hf_cfg or "text_config" in hf_cfg else ()
    params = clip_vision_from_torch(core.load_state_dict(path), cfg, ignore=ignore)
    return _cast(params, cfg.param_dtype), cfg


def _save(tensors: Mapping[str, np.ndarray], config: dict, out_dir: str | os.PathLike) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    core.save_safetensors(tensors, os.path.join(out_dir, "model.safetensors"))


def save_hf_llama(params: Mapping[str, Any], cfg: LlamaConfig, out_dir: str | os.PathLike) -> None:
    """Write a directory `transformers.LlamaForCausalLM.from_pretrained` reads (params' dtypes kept)."""
    _save(llama_to_torch(params, cfg), cfg.to_hf_dict(), out_dir)


def save_hf_clip(params: Mapping[str, Any], cfg: ClipVisionConfig, out_dir: str | os.PathLike) -> None:
    """Write a directory `transformers.CLIPVisionModel.from_pretrained` reads."""
    _save(clip_vision_to_torch(params, cfg), cfg.to_hf_dict(), out_dir)
