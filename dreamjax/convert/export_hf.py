"""`dreamjax export hf`: a DreamLLM as transformers / diffusers directories, one per part it has.

    llm/                        LlamaForCausalLM: config.json, generation_config.json, safetensors shards, tokenizer
    vision/                     CLIPVisionModel: config.json, model.safetensors, preprocessor_config.json
    unet/  vae/  scheduler/     diffusers UNet2DConditionModel, AutoencoderKL, DDPMScheduler
    dreamllm_heads.safetensors  visual / condition projectors and dream queries, under upstream's in-model
                                names (spec 5.2), so `DreamLLMForCausalMLM.load_state_dict(..., strict=False)`
                                takes them as they are
    README.md                   what is here and a PyTorch snippet that runs it

Every tensor is written in the dtype it is stored in (bit for bit) through `export.write_safetensors`, one
leaf at a time. A part the model does not have is left out, with a note in the README.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from dreamjax.convert.diffusers import unet_rules, vae_rules
from dreamjax.convert.dreamllm import part_rules
from dreamjax.convert.export import DEFAULT_SHARD_BYTES, Leaves, plan_export, sub_leaves, write_safetensors
from dreamjax.convert.hf import clip_vision_rules, llama_rules
from dreamjax.models.clip_vision import ClipVisionConfig
from dreamjax.models.dreamllm import DreamLLMConfig

HEADS_FILE = "dreamllm_heads.safetensors"
HEAD_PARTS = ("visual_projector", "dream_queries", "condition_projector")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _write_json(obj: Mapping[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _dtype_of(leaves: Leaves) -> str:
    """The torch dtype name of a part (its first leaf's): config.json records what the files hold."""
    specs = leaves.specs()
    return np.dtype(specs[min(specs)][1]).name


def _part_leaves(leaves: Leaves, part: str) -> Leaves:
    return sub_leaves(leaves, part)


def write_llm(cfg: DreamLLMConfig, leaves: Leaves, out: str, *, tokenizer=None, special_ids: Mapping | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """llm/: a `LlamaForCausalLM` directory (and the tokenizer, with DreamLLM's special tokens)."""
    part = _part_leaves(leaves, "llm")
    plan = plan_export(part.specs(), llama_rules(cfg.llm), what="llm")
    os.makedirs(out, exist_ok=True)
    config = cfg.llm.to_hf_dict()
    config["dtype"] = config["torch_dtype"] = _dtype_of(part)  # torch_dtype: transformers 4 reads this name
    ids = dict(special_ids or {})
    for name in ("bos", "eos", "pad"):
        if name in ids:
            config[f"{name}_token_id"] = int(ids[name])
    _write_json(config, os.path.join(out, "config.json"))
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    _write_json(generation, os.path.join(out, "generation_config.json"))
    files = write_safetensors(plan, part, out, name="model", max_shard_bytes=max_shard_bytes)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return files


def clip_preprocessor_config(cfg: ClipVisionConfig) -> dict:
    """`CLIPImageProcessor` settings of OpenAI CLIP at the tower's resolution (shortest side, centre crop)."""
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": cfg.image_size},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": cfg.image_size, "width": cfg.image_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD, "do_convert_rgb": True}


def write_vision(cfg: DreamLLMConfig, leaves: Leaves, out: str, *,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """vision/: a `CLIPVisionModel` directory. Keys keep the `vision_model.` prefix that transformers 4
    (upstream's 4.35) needs and transformers 5 also reads."""
    part = _part_leaves(leaves, "vision")
    plan = plan_export(part.specs(), clip_vision_rules(cfg.vision, prefix="vision_model."), what="vision")
    os.makedirs(out, exist_ok=True)
    config = cfg.vision.to_hf_dict()
    config["dtype"] = config["torch_dtype"] = _dtype_of(part)
    _write_json(config, os.path.join(out, "config.json"))
    _write_json(clip_preprocessor_config(cfg.vision), os.path.join(out, "preprocessor_config.json"))
    return write_safetensors(plan, part, out, name="model", max_shard_bytes=max_shard_bytes)


def write_diffusers(kind: str, cfg: DreamLLMConfig, leaves: Leaves, out: str, *,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """unet/ or vae/: a diffusers `UNet2DConditionModel` / `AutoencoderKL` directory."""
    part = _part_leaves(leaves, kind)
    model_cfg = cfg.unet if kind == "unet" else cfg.vae
    rules = unet_rules(model_cfg) if kind == "unet" else vae_rules(model_cfg)
    plan = plan_export(part.specs(), rules, what=kind)
    os.makedirs(out, exist_ok=True)
    _write_json(model_cfg.to_diffusers_dict(), os.path.join(out, "config.json"))
    return write_safetensors(plan, part, out, name="diffusion_pytorch_model", max_shard_bytes=max_shard_bytes)


def write_scheduler(schedule: Mapping[str, Any], out: str) -> str:
    """scheduler/: the run's noise schedule as the `DDPMScheduler` config upstream samples with."""
    os.makedirs(out, exist_ok=True)
    config = {"_class_name": "DDPMScheduler",
              **{k: v for k, v in dict(schedule).items() if not k.startswith("_") and v is not None}}
    path = os.path.join(out, "scheduler_config.json")
    _write_json(config, path)
    return path


def write_heads(cfg: DreamLLMConfig, leaves: Leaves, path: str) -> list[str]:
    """The connectors under upstream's in-model names ([1, Q, D] dream queries)."""
    parts = [p for p in HEAD_PARTS if p in cfg.parts]
    rules = [r for p in parts for r in part_rules(cfg, p)]
    specs = {p: s for p, s in leaves.specs().items() if p.split("/")[0] in parts}
    plan = plan_export(specs, rules, what="heads")
    out_dir, name = os.path.split(path)
    return write_safetensors(plan, leaves, out_dir, name=name.removesuffix(".safetensors"), max_shard_bytes=1 << 62)


def export_hf(cfg: DreamLLMConfig, leaves: Leaves, out: str, *, tokenizer=None, special_ids: Mapping | None = None,
              schedule: Mapping[str, Any] | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """Write every part the model has; returns {"files": [...], "notes": [...]} (notes: what was left out)."""
    os.makedirs(out, exist_ok=True)
    files, notes = [], []
    parts = cfg.parts
    if "llm" in parts:
        files += write_llm(cfg, leaves, os.path.join(out, "llm"), tokenizer=tokenizer, special_ids=special_ids,
                           max_shard_bytes=max_shard_bytes)
    else:
        notes.append("llm/: this checkpoint has no LLM")
    if "vision" in parts:
        files += write_vision(cfg, leaves, os.path.join(out, "vision"), max_shard_bytes=max_shard_bytes)
    else:
        notes.append("vision/: this checkpoint has no vision tower")
    if "unet" in parts:
        files += write_diffusers("unet", cfg, leaves, os.path.join(out, "unet"), max_shard_bytes=max_shard_bytes)
        if schedule is not None:
            files.append(write_scheduler(schedule, os.path.join(out, "scheduler")))
    else:
        notes.append("unet/, scheduler/: this checkpoint has no diffusion model")
    if "vae" in parts:
        files += write_diffusers("vae", cfg, leaves, os.path.join(out, "vae"), max_shard_bytes=max_shard_bytes)
    elif "unet" in parts:
        notes.append("vae/: this checkpoint's diffusion model works in pixel space (no VAE)")
    if any(p in parts for p in HEAD_PARTS):
        files += write_heads(cfg, leaves, os.path.join(out, HEADS_FILE))
    else:
        notes.append(f"{HEADS_FILE}: no projectors or dream queries (they need the LLM and another tower)")
    readme = os.path.join(out, "README.md")
    with open(readme, "w") as f:
        f.write(readme_text(cfg, notes))
    return {"files": files + [readme], "notes": notes}


def readme_text(cfg: DreamLLMConfig, notes: list[str]) -> str:
    parts = cfg.parts
    lines = ["# DreamLLM weights exported by dreamjax", "",
             "Parts: " + ", ".join(parts) + ". Every tensor is stored as dreamjax held it (bit for bit).", ""]
    if notes:
        lines += ["Left out:", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["```python", "import torch, transformers, diffusers", "from safetensors.torch import load_file", ""]
    if "llm" in parts:
        lines += [
            'tok = transformers.AutoTokenizer.from_pretrained("llm")',
            'llm = transformers.LlamaForCausalLM.from_pretrained("llm")',
            'ids = tok("A chat between a curious user and an artificial intelligence assistant. USER: Hello '
            'ASSISTANT:", return_tensors="pt").input_ids',
            "print(tok.decode(llm.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:]))",
            "",
        ]
    if "vision" in parts:
        lines += ['vision = transformers.CLIPVisionModel.from_pretrained("vision")  # features: hidden_states'
                  f'[{cfg.select_layer}][:, 1:]', ""]
    if "dream_queries" in parts:
        q = cfg.num_dream_queries
        lines += [
            'heads = load_file("dreamllm_heads.safetensors")',
            'queries = heads["model.dream_embedding.dream_queries"][0]           # [Q, D]',
            'w_cond = heads["stable_diffusion_head.projector.projector.weight"]  # [C, D]',
            "# text-to-image: the prompt, <dream_start>, Q query slots; the condition is the final hidden states",
            "# at the slots (the LLM's output norm included) through the condition projector",
            'prompt = tok("a red circle", return_tensors="pt").input_ids',
            'start = torch.tensor([[tok.convert_tokens_to_ids("<dream_start>")]])',
            "with torch.no_grad():",
            "    embeds = torch.cat([llm.get_input_embeddings()(torch.cat([prompt, start], 1)),",
            "                        queries[None].to(llm.dtype)], 1)",
            "    hidden = llm.model(inputs_embeds=embeds).last_hidden_state",
            f"    cond = hidden[:, -{q}:] @ w_cond.T.to(hidden.dtype)                # [1, Q, C]",
        ]
        if "unet" in parts:
            lines += [
                '    unet = diffusers.UNet2DConditionModel.from_pretrained("unet")',
                '    sched = diffusers.DDPMScheduler.from_pretrained("scheduler")',
                "    sched.set_timesteps(50)",
                "    x = torch.randn(1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)",
                "    for t in sched.timesteps:",
                "        eps = unet(x, t, encoder_hidden_states=cond.to(unet.dtype)).sample",
                "        x = sched.step(eps, t, x).prev_sample",
            ]
            if "vae" in parts:
                lines += ['    vae = diffusers.AutoencoderKL.from_pretrained("vae")',
                          "    image = vae.decode(x / vae.config.scaling_factor).sample  # [-1, 1]"]
            else:
                lines += ["    image = x  # pixel space: [-1, 1]"]
        lines += ["# (classifier-free guidance: the same readout for the negative prompt, e.g. BOS alone)"]
    lines += ["```", ""]
    return "\n".join(lines)
