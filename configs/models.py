"""The real model sizes, written out as the `config.model` sections take them (so a config can name them without
a download): `model.llm` in `LlamaConfig` field names, `model.vision` in `ClipVisionConfig` names, `model.unet` /
`model.vae` as the diffusers config.json dicts of stabilityai/stable-diffusion-2-1-base. When `config.init`
points at the real weights, the run assembly checks these values against the weights' own config files.
"""


def vicuna_7b() -> dict:
    """Vicuna-7B v1.1 (LLaMA-1 7B, spec 1.1); the vocabulary comes from the tokenizer (32000 + 8 DreamLLM tokens)."""
    return dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32,
                rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False)


def clip_vit_l14_224() -> dict:
    """openai/clip-vit-large-patch14, vision tower at 224 px."""
    return dict(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, image_size=224,
                patch_size=14, layer_norm_eps=1e-5)


def sd21_base_unet() -> dict:
    """stable-diffusion-2-1-base unet/config.json."""
    return {
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20],
        "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 1024,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "downsample_padding": 1,
        "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
        "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
        "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "use_linear_projection": True,
        "upcast_attention": False,  # the 768-px v-prediction 2.1 sets True; the 512-px base keeps the default
    }


def sd21_base_vae() -> dict:
    """stable-diffusion-2-1-base vae/config.json."""
    return {
        "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
        "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
        "scaling_factor": 0.18215, "up_block_types": ["UpDecoderBlock2D"] * 4,
    }


def llama31_8b() -> dict:
    """Llama-3.1-8B: GQA (8 KV heads), RoPE theta 5e5 with llama3 scaling; vocabulary 128256 from its tokenizer."""
    return dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=False,
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192})
