"""The real model sizes, written out as the `config.model` sections take them (so a config can name them without
a download): `model.llm` in `LlamaConfig` field names, `model.vision` in `ClipVisionConfig` names, `model.unet` /
`model.vae` as the diffusers config.json dicts of stabilityai/stable-diffusion-2-1-base. When `config.init`
points at the real weights, the run assembly checks these values against the weights' own config files.
"""

import copy

from dreamjax.convert.dreamllm_release import KNOWN_SD

SD21_BASE = "stabilityai/stable-diffusion-2-1-base"


def vicuna_7b() -> dict:
    """Vicuna-7B v1.1 (LLaMA-1 7B, spec 1.1). vocab_size is the pretrained embedding's; the tokenizer adds
    DreamLLM's 8 tokens (32008 rows in training)."""
    return dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                num_kv_heads=32,
                rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False)


def clip_vit_l14_224() -> dict:
    """openai/clip-vit-large-patch14, vision tower at 224 px."""
    return dict(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, image_size=224,
                patch_size=14, layer_norm_eps=1e-5)


def sd21_base_unet() -> dict:
    """stable-diffusion-2-1-base unet/config.json (the package knows it: a release names it by hub id)."""
    return copy.deepcopy(KNOWN_SD[SD21_BASE]["unet"])


def sd21_base_vae() -> dict:
    """stable-diffusion-2-1-base vae/config.json."""
    return copy.deepcopy(KNOWN_SD[SD21_BASE]["vae"])


def llama31_8b() -> dict:
    """Llama-3.1-8B: GQA (8 KV heads), RoPE theta 5e5 with llama3 scaling; vocabulary 128256 (+ DreamLLM's 8)."""
    return dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                num_kv_heads=8,
                rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=False,
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192})
