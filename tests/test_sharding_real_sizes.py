"""The real DreamLLM sizes (Vicuna-7B, CLIP ViT-L/14 @224, SD 2.1-base UNet and VAE, 64 dream queries), built
abstractly (nothing allocated): under the default FSDP rules on a (1, 8, 1) mesh every weight that has a
dimension divisible by 8 is sharded, so no 7B-run parameter silently sits whole on every chip."""

import flax.linen as nn
import jax

from configs import models
from dreamjax.convert.core import flatten
from dreamjax.models.dreamllm import DreamLLM, SpecialTokenIds, build_config, init_params
from dreamjax.parallel.mesh import make_mesh
from dreamjax.parallel.sharding import DEFAULT_RULES, logical_sharding


def test_every_divisible_weight_of_the_real_model_is_sharded_over_fsdp():
    tokens = SpecialTokenIds(bos=1, im_start=32001, im_patch=32004, dream_start=32003, dream_end=32002)
    cfg = build_config(dict(llm=models.vicuna_7b(), vision=models.clip_vit_l14_224(), unet=models.sd21_base_unet(),
                            vae=models.sd21_base_vae(), num_dream_queries=64), vocab_size=32008, tokens=tokens)
    abstract = jax.eval_shape(lambda k: init_params(DreamLLM(cfg), k), jax.random.key(0))
    shapes = flatten(nn.meta.unbox(abstract))
    n_params = sum(x.size for x in shapes.values())
    assert 7.95e9 < n_params < 8.05e9  # 6.74B LLM + 0.30B CLIP + 0.87B UNet + 0.08B VAE + projectors and queries
    shardings = flatten(logical_sharding(abstract, make_mesh({"data": 1, "fsdp": 8, "tensor": 1}), DEFAULT_RULES))
    replicated = [f"{k} {v.shape}" for k, v in shapes.items()
                  if any(d % 8 == 0 for d in v.shape) and all(a is None for a in shardings[k].spec)]
    assert not replicated, f"{len(replicated)} weights replicated: {replicated[:10]}"
    biggest = max(shapes, key=lambda k: shapes[k].size)
    assert "fsdp" in tuple(shardings[biggest].spec), biggest
