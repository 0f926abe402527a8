"""Defaults shared by every experiment config; a config file overrides what it needs."""

from ml_collections import ConfigDict


def base_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    # "synthetic" (built from the shapes world), a local HF tokenizer dir, or None: the tokenizer of
    # init.checkpoint or init.llm
    c.tokenizer = "synthetic"

    c.model = ConfigDict()
    # LLaMA fields, named as dreamjax.models.llama.LlamaConfig; vocab_size comes from the tokenizer.
    c.model.llm = ConfigDict(dict(
        hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32,
        rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False,
        scan_layers=True, remat_policy="none",
    ))
    c.model.vision = ConfigDict(dict(  # CLIP ViT-L/14 at 224 px
        hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, image_size=224, patch_size=14,
        layer_norm_eps=1e-5,
    ))
    c.model.select_layer = -2
    c.model.num_dream_queries = 64
    c.model.unet = ConfigDict()  # a diffusers UNet2DConditionModel config dict
    c.model.vae = None  # a diffusers AutoencoderKL config dict, or None for pixel space
    # diffusers DDPMScheduler config of stable-diffusion-2-1-base (spec 1.5)
    c.model.schedule = ConfigDict(dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", clip_sample=False, steps_offset=1, timestep_spacing="leading",
        set_alpha_to_one=False,
    ))

    # Local pretrained weights (never downloaded), see dreamjax/run/weights.py. The architecture of each part
    # comes from the weights' own config files; a model field set here that contradicts them is an error.
    c.init = ConfigDict(dict(
        llm=None,  # a transformers Llama directory (Vicuna-7B v1.1 upstream)
        clip=None,  # a transformers CLIP / CLIPVision directory (openai/clip-vit-large-patch14)
        stable_diffusion=None,  # a diffusers Stable Diffusion directory: unet/, vae/, scheduler/
        dream=None,  # a dreamjax workdir: dream queries + visual and condition projectors (stage 2 from 1)
        checkpoint=None,  # a dreamjax workdir: every part (stage 3 from stage 2)
        dreamllm=None,  # the released DreamLLM layout (spec 5): every part; excludes the other entries
    ))

    # source: "synthetic" (the shapes world, generated on the fly) or "prepared" (directories written by
    # `dreamjax prepare`: paths = {name: directory}, mixture = {name: weight}; an empty mixture weighs every
    # path equally). num_workers: Grain worker processes (0: read in the training process), read_threads:
    # threads building batches ahead in each of those processes, prefetch_batches: how many they buffer.
    # None of these three changes the batches: they are made the same, and resume exactly, whatever the values.
    c.data = ConfigDict(dict(
        source="synthetic", paths=None, mode="joint", max_length=2048, max_images_in=4, max_images_out=4,
        resolution_in=224, resolution_out=512, random_flip=True, num_workers=0, read_threads=2,
        prefetch_batches=4, seed=0,
        # Sequence packing (dreamjax/data/packing.py), off as upstream: True packs several samples per row
        # (segment ids, restarting positions), first-fit into `packing_rows` open rows per host. README "Data".
        packing=False, packing_rows=16,
        # Fast image path (PipelineConfig.jpeg_draft): JPEGs decoded at a reduced DCT scale when at least twice
        # the side they are needed at, and only the crop windows resized; pixels within a few levels of the
        # exact path. False: exactly upstream's decode + CLIP / diffusion preprocessing.
        jpeg_draft=True,
        mixture=ConfigDict(),
        # synthetic source only: attribute subsets of the shapes world (dreamjax.data.synthetic.WORLD_OPTIONS)
        world=None,
    ))

    c.train = ConfigDict(dict(
        stage="stage2", trainable=None, loss_weights=None, steps=1000, global_batch_size=8,
        learning_rate=2e-5, warmup_steps=0, weight_decay=0.0, grad_clip_norm=1.0, grad_accum_steps=1,
        precision="bf16",  # "fp32" | "bf16" (fp32 master, bf16 compute) | "pure_bf16" (upstream)
        condition_dropout=0.0, noise_draws=1, log_every=10, checkpoint_every=1000, keep_checkpoints=3,
        # Output images the VAE + UNet process per data shard per (micro-)step (None: every slot, present or
        # not); present images beyond it are dropped from the loss and logged as `images_over_budget`.
        image_budget=None,
        # Every `sample_every` steps (0: never) images of `sample_prompts` from the current params go to
        # TensorBoard, with `sample`'s settings but at most 25 steps (dreamjax/train/loop.py `_SampleLogger`).
        sample_every=0, sample_prompts=["a photo of a dog on the beach", "a red car parked in the street",
                                        "a bowl of fruit on a wooden table", "a mountain lake at sunset"],
    ))

    # Mesh axis sizes (None: the preset's, else data=1, fsdp=-1 (the rest), tensor=1); `preset` names a TPU slice
    # or GPU node (dreamjax/parallel/presets.py: "v5p-128", "v5e-256", "2xv5p-128", "h100x8"); `rules` is None
    # (FSDP + tensor parallel), a rule-set name ("fsdp", "fsdp_tp", "dcn_fsdp") or a list of [name, axes].
    c.mesh = ConfigDict(dict(preset=None, data=None, fsdp=None, tensor=None, dcn=None, rules=None))
    # How the run generates images (dreamjax generate and the evaluations use the same settings).
    # How `dreamjax generate` and the evaluations sample: images (spec 4.1, COCO: 150 steps, CFG 2.0, best of 8
    # by CLIP when `rerank` names a local CLIPModel directory) and text (greedy by default).
    c.sample = ConfigDict(dict(steps=150, guidance=2.0, sampler="ddpm", negative_prompt="", num_images=1,
                               rerank=None, temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=64))
    return c
