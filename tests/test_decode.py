"""Compiled KV-cache decoding: greedy tokens equal full recomputation and transformers `generate` on the same
converted weights (batch of 3 prompts of different lengths, one a single token), sharded over the batch;
one compile for two prompt lengths in the same bucket; top-k / top-p / temperature / stop ids."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn

from dreamjax.convert import hf
from dreamjax.infer import decode
from dreamjax.models.dreamllm import DreamLLM, SpecialTokenIds, build_config, init_params
from dreamjax.parallel.mesh import make_mesh
from dreamjax.parallel.sharding import DEFAULT_RULES

VOCAB = 96
SPECIAL = SpecialTokenIds(bos=1, im_start=91, im_patch=92, dream_start=93, dream_end=94)
NEW = 32
PROMPTS = [[1, 5, 17, 33, 8], [1, 40, 2 + 3, 61, 77, 12, 9, 30, 44, 50, 6], [1]]
LLM = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
           max_position_embeddings=128, tie_word_embeddings=False, rms_norm_eps=1e-6)
MODEL = dict(
    llm=LLM,
    vision=dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, image_size=16, patch_size=8),
    num_dream_queries=4,
    unet=dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=[16, 32],
              down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"],
              attention_head_dim=[2, 2], cross_attention_dim=32, norm_num_groups=8, use_linear_projection=True),
    vae=None,
    schedule=dict(),
)


@pytest.fixture(scope="module")
def setup():
    """A tiny DreamLLM whose LLM is a random transformers Llama (peaky logits, so greedy has no near-ties)."""
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=LLM["hidden_size"], intermediate_size=LLM["intermediate_size"],
        num_hidden_layers=LLM["num_layers"], num_attention_heads=LLM["num_heads"],
        num_key_value_heads=LLM["num_kv_heads"], max_position_embeddings=LLM["max_position_embeddings"],
        rms_norm_eps=LLM["rms_norm_eps"], tie_word_embeddings=False, initializer_range=0.15,
        bos_token_id=1, eos_token_id=None, pad_token_id=0,
    )).eval()
    cfg = build_config({**MODEL, "schedule": None}, vocab_size=VOCAB, tokens=SPECIAL)
    model = DreamLLM(cfg)
    params = nn.meta.unbox(init_params(model, jax.random.PRNGKey(0)))
    params = dict(params)
    params["llm"] = jax.tree.map(jnp.asarray, hf.llama_from_torch(ref.state_dict(), cfg.llm))
    return model, params, ref


def _full_recompute(model, params, prompt, n):
    """Greedy by re-running the whole sequence each step (no cache)."""
    ids = list(prompt)
    fwd = jax.jit(lambda p, t: model.apply({"params": p}, t, jnp.arange(t.shape[1])[None])[0])
    for _ in range(n):
        logits = fwd(params, jnp.asarray([ids], jnp.int32))
        ids.append(int(jnp.argmax(logits[0, -1])))
    return ids[len(prompt):]


def _hf_generate(ref, prompts, n):
    """transformers generate, greedy, left-padded batch (positions from the attention mask)."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                           pad_token_id=0, eos_token_id=None)
    return out[:, width:].tolist()


def test_greedy_equals_full_recompute_and_transformers(setup):
    model, params, ref = setup
    got = decode.generate_text(model, params, PROMPTS, max_new_tokens=NEW)
    assert [len(g) for g in got] == [NEW] * 3
    assert got == _hf_generate(ref, PROMPTS, NEW)
    assert got == [_full_recompute(model, params, p, NEW) for p in PROMPTS]


def test_sharded_over_the_batch_gives_the_same_tokens(setup):
    model, params, _ = setup
    mesh = make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    want = decode.generate_text(model, params, PROMPTS, max_new_tokens=8)
    got = decode.generate_text(model, params, PROMPTS, max_new_tokens=8, mesh=mesh, rules=DEFAULT_RULES)
    assert got == want


def test_one_compile_for_two_lengths_in_one_bucket(setup):
    model, params, _ = setup
    assert decode.bucket_length(9) == decode.bucket_length(14) == 16
    decode._generate.clear_cache()
    decode.generate_text(model, params, [[1] * 9, [1, 2]], max_new_tokens=4)
    decode.generate_text(model, params, [[1] * 14, [1, 2, 3]], max_new_tokens=4)
    assert decode._generate._cache_size() == 1
    decode.generate_text(model, params, [[1] * 17, [1, 2, 3]], max_new_tokens=4)  # the next bucket: 32
    assert decode._generate._cache_size() == 2


def test_stop_ids_end_each_row(setup):
    model, params, _ = setup
    full = decode.generate_text(model, params, PROMPTS, max_new_tokens=12)
    stop = full[0][3]
    got = decode.generate_text(model, params, PROMPTS, max_new_tokens=12, stop_ids=[stop])
    for g, f in zip(got, full):
        cut = f.index(stop) + 1 if stop in f else len(f)
        assert g == f[:cut]


def test_sampling_filters(setup):
    model, params, _ = setup
    greedy = decode.generate_text(model, params, PROMPTS, max_new_tokens=8)
    # top-k 1 and a tiny nucleus keep only the arg max
    assert decode.generate_text(model, params, PROMPTS, max_new_tokens=8, temperature=1.0, top_k=1, seed=3) == greedy
    assert decode.generate_text(model, params, PROMPTS, max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=3) == greedy
    a = decode.generate_text(model, params, PROMPTS, max_new_tokens=8, temperature=5.0, seed=1)
    assert a == decode.generate_text(model, params, PROMPTS, max_new_tokens=8, temperature=5.0, seed=1)
    assert a != decode.generate_text(model, params, PROMPTS, max_new_tokens=8, temperature=5.0, seed=2)


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    draw = lambda s: np.array([int(decode.sample_logits(logits, k, s)[0]) for k in keys[:200]])
    assert set(draw(decode.Sampling(1.0, top_k=2))) == {0, 1}
    assert set(draw(decode.Sampling(1.0, top_p=0.7))) == {0, 1}  # 0.5 + 0.3 reaches 0.7
    assert set(draw(decode.Sampling(1.0, top_p=0.85))) == {0, 1, 2}


def test_bad_settings_are_one_line_errors(setup):
    model, params, _ = setup
    with pytest.raises(ValueError, match="exceeds the model's 128 positions"):
        decode.generate_text(model, params, [[1] * 100], max_new_tokens=40)
    with pytest.raises(ValueError, match="top_p"):
        decode.Sampling(1.0, top_p=0.0)
