"""DreamLLM-7B as upstream trained it (spec section 2): one config arg per stage.

    configs/dreamllm_7b.py:stage1_creation        dream queries + condition projector, T2I pairs only
    configs/dreamllm_7b.py:stage1_comprehension   visual projector, I2T pairs only
    configs/dreamllm_7b.py:stage2                 LLM + projectors + queries on MMC4 + BLIP-LAION
    configs/dreamllm_7b.py:stage3                 supervised fine-tuning (LLaVA-1.5 + instruct data)
    configs/dreamllm_7b.py:stage2,llama3_8b       the same stage on Llama-3.1-8B (GQA, llama3 RoPE scaling)

Vicuna-7B v1.1 + CLIP ViT-L/14 @224 + Stable Diffusion 2.1-base @512, 64 dream queries, sequence 2048. The
weights come from local directories set with `--config.init.llm=... --config.init.clip=...
--config.init.stable_diffusion=...` (and `init.dream` / `init.checkpoint` for the later stages; never
downloaded); the run assembly checks the architecture written here against the weights' config files.
The global batch is upstream's 128 GPUs x 16 = 2048 sequences; steps are one epoch of upstream's data.

The data mixtures name upstream's datasets with weights proportional to their sizes (spec 2.1-2.2). They
read prepared shards (`data.source = "prepared"`): write each data set with `dreamjax prepare` and name
the directories with `--config.data.paths="{'mmc4_core': '/data/mmc4', 'blip_laion': '/data/blip'}"`
(one dict can hold every stage's data sets; a stage opens only those its mixture names). A mixture name
without a path, or a missing or empty directory, stops the run with one line before anything compiles.
"""

from ml_collections import ConfigDict

from configs import common, models

# stage -> (trainable parts come from dreamjax.train.stages; here: data mode, steps, peak LR, mixture)
STAGES = {
    "stage1_creation": ("creation_only", 29_300, 2e-3,
                        dict(laion400m_orig=20e6, laion_coco=20e6, blip_laion=20e6)),
    "stage1_comprehension": ("comprehension_only", 36_200, 2e-3,
                             dict(llava_pretrain=0.558e6, laion400m_orig=20e6, laion_coco=20e6, blip_laion=20e6,
                                  gqa=13.53e6)),
    "stage2": ("joint", 8_300, 2e-5, dict(mmc4_core=7e6, blip_laion=10e6)),
    "stage3": ("joint", 628, 4e-5, dict(llavav1_5_instruct=665_298, blip_laion=600e3,
                                        mmc4_instruct_filtered224=20_231)),
}
VARIANTS = ("vicuna_7b", "llama3_8b")


def get_config(arg: str | None = None) -> ConfigDict:
    stage, _, variant = (arg or "stage2").partition(",")
    variant = variant or "vicuna_7b"
    if stage not in STAGES:
        raise ValueError(f"configs/dreamllm_7b.py: unknown stage {stage!r}; choose one of {sorted(STAGES)}")
    if variant not in VARIANTS:
        raise ValueError(f"configs/dreamllm_7b.py: unknown variant {variant!r}; choose one of {VARIANTS}")
    mode, steps, lr, mixture = STAGES[stage]

    c = common.base_config()
    c.tokenizer = None  # the tokenizer of init.llm (or init.checkpoint), with DreamLLM's tokens added
    c.model.llm = ConfigDict({**(models.vicuna_7b() if variant == "vicuna_7b" else models.llama31_8b()),
                              "remat_policy": "nothing_saveable"})  # upstream: gradient checkpointing
    c.model.vision = ConfigDict(models.clip_vit_l14_224())
    # remat: the frozen UNet's backward (to the condition) would otherwise keep every block's activations of
    # every output image (`dreamjax aot` measures it: see README "Pods")
    # attention_chunk: the 4096-position self-attention at 64x64 latents in query chunks of 1024 with a flash
    # backward (models/layers.py chunked_attention) instead of 5 heads x 4096^2 fp32 scores per image (this bounds
    # the attention's memory; `dreamjax aot` showed no lower peak per chip with it, other buffers dominate).
    c.model.unet = ConfigDict({**models.sd21_base_unet(), "remat": True, "attention_chunk": 1024})
    c.model.vae = ConfigDict(models.sd21_base_vae())
    c.model.num_dream_queries = 64

    c.data.source = "prepared"
    c.data.mode = mode
    c.data.max_length = 2048
    c.data.resolution_in = 224
    c.data.resolution_out = 512
    c.data.mixture = ConfigDict({name: size / sum(mixture.values()) for name, size in mixture.items()})
    c.data.paths = None  # {name: prepared directory}, set on the command line
    c.data.num_workers = 2  # decoding 512 px JPEGs keeps a few cores busy per host

    c.train.stage = stage
    c.train.steps = steps
    c.train.global_batch_size = 2048
    # Upstream's global batch in 32 micro-batches (64 sequences: one per chip of a v5p-128). `dreamjax aot`: the
    # whole step in one pass needs 512 GiB of temporaries per chip, 8 micro-batches 88 GiB, 32 micro-batches 27 GiB
    # of the v5p's 95 (README "Pods").
    c.train.grad_accum_steps = 32
    c.train.learning_rate = lr
    c.train.warmup_steps = max(1, round(3e-3 * steps))  # upstream warmup_ratio 3e-3, then cosine
    c.train.weight_decay = 0.0
    c.train.grad_clip_norm = 1.0
    c.train.precision = "bf16"  # fp32 master weights; "pure_bf16" is upstream's (no master copy)
    c.train.checkpoint_every = 500
    c.train.log_every = 10
    # ZeRO-3 over every chip (upstream: FSDP shard_grad_op); pick a slice with --config.mesh.preset=v5p-128
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.sample.update(steps=150, guidance=2.0, sampler="ddpm")  # the COCO protocol
    return c
