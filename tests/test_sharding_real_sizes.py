"""The real DreamLLM sizes (Vicuna-7B, CLIP ViT-L/14 @224, SD 2.1-base UNet and VAE, 64 dream queries), built
abstractly (nothing allocated): on a (data=1, fsdp=8, tensor=1) mesh, under the default rules and the pure-FSDP
rules, every weight that has a dimension divisible by 8 (the stacked layer dimension included) is sharded, i.e.
no device holds it whole, so no 7B-run parameter silently sits whole on every chip."""

import math

import flax.linen as nn
import jax
import pytest

from configs import models
from dreamjax.convert.core import flatten
from dreamjax.models.dreamllm import DreamLLM, SpecialTokenIds, build_config, init_params
from dreamjax.parallel.mesh import make_mesh
from dreamjax.parallel.sharding import DEFAULT_RULES, FSDP_RULES, logical_sharding

# the only weights without a dimension divisible by 8: the UNet / VAE output convs' 4 / 3 channels and the VAE's
# 4 -> 4 1x1 post-quant conv
REPLICATED = {"unet/conv_out/bias": (4,), "vae/decoder/conv_out/bias": (3,), "vae/post_quant_conv/bias": (4,),
              "vae/post_quant_conv/kernel": (1, 1, 4, 4)}


@pytest.fixture(scope="module")
def abstract():
    tokens = SpecialTokenIds(bos=1, im_start=32001, im_patch=32004, dream_start=32003, dream_end=32002)
    cfg = build_config(dict(llm=models.vicuna_7b(), vision=models.clip_vit_l14_224(), unet=models.sd21_base_unet(),
                            vae=models.sd21_base_vae(), num_dream_queries=64), vocab_size=32008, tokens=tokens)
    return jax.eval_shape(lambda k: init_params(DreamLLM(cfg), k), jax.random.key(0))


def test_the_real_sizes_add_up(abstract):
    shapes = flatten(nn.meta.unbox(abstract))
    count = {part: sum(v.size for k, v in shapes.items() if k.startswith(part + "/"))
             for part in ("llm", "vision", "unet", "vae")}
    assert count["llm"] == 6_738_415_616 + 2 * 8 * 4096  # LLaMA-7B + 8 DreamLLM token rows in embed_tokens, lm_head
    assert count["vision"] == 303_179_776  # transformers' CLIPVisionModel of clip-vit-large-patch14
    assert count["unet"] == 865_910_724  # SD 2.1-base UNet2DConditionModel
    assert count["vae"] == 83_653_863  # SD 2.x AutoencoderKL
    assert 7.95e9 < sum(v.size for v in shapes.values()) < 8.05e9  # + projectors and the 64 dream queries


@pytest.mark.parametrize("rules", [DEFAULT_RULES, FSDP_RULES], ids=["default", "fsdp"])
def test_every_divisible_weight_of_the_real_model_is_sharded_over_fsdp(abstract, rules):
    shapes = flatten(nn.meta.unbox(abstract))
    shardings = flatten(logical_sharding(abstract, make_mesh({"data": 1, "fsdp": 8, "tensor": 1}), rules))
    whole = {k: v.shape for k, v in shapes.items() if shardings[k].shard_shape(v.shape) == v.shape}
    divisible = [f"{k} {s} {shardings[k].spec}" for k, s in whole.items() if any(d % 8 == 0 for d in s)]
    assert not divisible, f"{len(divisible)} weights with a dimension divisible by 8 replicated: {divisible[:10]}"
    assert whole == REPLICATED
    # every sharded weight is split exactly 8 ways (over 'fsdp'; the size-1 axes shard nothing)
    for k, v in shapes.items():
        if k not in whole:
            assert v.size // 8 == math.prod(shardings[k].shard_shape(v.shape)), k
            assert "fsdp" in jax.tree.leaves(tuple(shardings[k].spec)), k


def test_the_written_out_sizes_are_what_diffusers_and_transformers_build(abstract):
    """configs/models.py read by the libraries themselves (on torch's meta device: no memory): every key is a
    constructor argument, and each tower has the reference implementation's parameter count."""
    import inspect

    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")

    shapes = flatten(nn.meta.unbox(abstract))

    def ours(part):
        return sum(v.size for k, v in shapes.items() if k.startswith(part + "/"))

    def theirs(model):
        return sum(p.numel() for p in model.parameters())

    with torch.device("meta"):
        for part, cls, cfg in (("unet", diffusers.UNet2DConditionModel, models.sd21_base_unet()),
                               ("vae", diffusers.AutoencoderKL, models.sd21_base_vae())):
            args = inspect.signature(cls.__init__).parameters
            assert not [k for k in cfg if not k.startswith("_") and k not in args], part
            assert theirs(cls.from_config(cfg)) == ours(part), part
        v = models.clip_vit_l14_224()
        clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
            hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
            num_hidden_layers=v["num_layers"], num_attention_heads=v["num_heads"], image_size=v["image_size"],
            patch_size=v["patch_size"], layer_norm_eps=v["layer_norm_eps"]))
        assert theirs(clip) == ours("vision")
        m = models.vicuna_7b()
        llm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=32008, hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
            num_hidden_layers=m["num_layers"], num_attention_heads=m["num_heads"],
            num_key_value_heads=m["num_kv_heads"], tie_word_embeddings=m["tie_word_embeddings"]))
        assert theirs(llm) == ours("llm")
