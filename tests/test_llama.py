"""LLaMA parity against transformers `LlamaForCausalLM` (tiny random models, fp32, eager attention)."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import Mesh, NamedSharding

from dreamjax.convert.hf import llama_from_torch
from dreamjax.models.llama import Llama, LlamaConfig, init_cache, init_params
from tests.helpers import assert_close

VOCAB = 128
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}

LINEAR = {"rope_type": "linear", "factor": 2.0}
LINEAR_V4 = {"type": "linear", "factor": 4.0}  # the transformers-4 spelling, given to transformers as it was

# name: (num_kv_heads, rope_theta, rope scaling or None, tied)
CASES = {
    "mha": (4, 10000.0, None, False),
    "gqa_tied": (2, 10000.0, None, True),
    "mqa_theta": (1, 500000.0, None, False),
    "llama3_gqa_tied": (2, 500000.0, LLAMA3, True),
    "linear_mha": (4, 10000.0, LINEAR, False),
    "linear_v4_gqa": (2, 10000.0, LINEAR_V4, False),
}


@functools.cache
def hf_model(case: str) -> transformers.LlamaForCausalLM:
    kv_heads, theta, scaling, tied = CASES[case]
    if scaling is not None and "type" in scaling:  # a transformers-4 config: rope_theta + rope_scaling
        rope = dict(rope_theta=theta, rope_scaling=dict(scaling))
    else:
        rope = dict(rope_parameters={"rope_type": "default", **(scaling or {}), "rope_theta": theta})
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=64, rms_norm_eps=1e-5, **rope,
        tie_word_embeddings=tied, attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # make norms non-trivial and weights large enough to matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@functools.cache
def jax_model(case: str, scan_layers: bool = True):
    model = hf_model(case)
    cfg = LlamaConfig.from_hf(model.config, scan_layers=scan_layers)
    params = jax.tree.map(jnp.asarray, llama_from_torch(model.state_dict(), cfg))
    return cfg, params


def torch_logits(case, tokens, attention_mask=None, positions=None):
    with torch.no_grad():
        out = hf_model(case)(
            input_ids=torch.from_numpy(np.asarray(tokens)).long(),
            attention_mask=None if attention_mask is None else torch.from_numpy(np.asarray(attention_mask)),
            position_ids=None if positions is None else torch.from_numpy(np.asarray(positions)).long(),
        )
    return out.logits.numpy()


def tokens_for(batch, length, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int32)


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, tokens, positions, segment_ids):
    return Llama(cfg).apply(
        {"params": params}, tokens, positions, segment_ids=segment_ids, method=Llama.forward
    )


@functools.partial(jax.jit, static_argnums=0)
def _step(cfg, params, tokens, positions, segment_ids, cache, cache_index):
    """One decode call: embed -> stack with cache -> logits."""
    model = Llama(cfg)
    x = model.apply({"params": params}, tokens, method=Llama.embed)
    hidden, cache = model.apply({"params": params}, x, positions, segment_ids=segment_ids, cache=cache,
                                cache_index=cache_index)
    return model.apply({"params": params}, hidden, method=Llama.logits), cache


def test_config_from_hf_and_back():
    hf_cfg = hf_model("llama3_gqa_tied").config
    cfg = LlamaConfig.from_hf(hf_cfg)
    got = (cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta, cfg.tie_word_embeddings)
    assert got == (2, 16, 500000.0, True)
    assert cfg.rope_scaling == LLAMA3
    # the transformers-4 config.json layout (rope_theta + rope_scaling, "type" spelling)
    legacy = {**cfg.to_hf_dict(), "rope_parameters": None, "rope_scaling": {**LLAMA3, "type": "llama3"}}
    del legacy["rope_scaling"]["rope_type"]
    assert LlamaConfig.from_hf(legacy) == cfg
    # to_hf_dict is read back by transformers with the same RoPE
    again = transformers.LlamaConfig(**cfg.to_hf_dict())
    assert again.rope_parameters == hf_cfg.rope_parameters
    assert LlamaConfig.from_hf(again) == cfg
    hash(cfg)  # usable as a static jit argument


def test_linear_rope_scaling_reads_both_config_layouts():
    cfg = LlamaConfig.from_hf(hf_model("linear_mha").config)
    assert cfg.rope_scaling == LINEAR
    legacy = {**cfg.to_hf_dict(), "rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert LlamaConfig.from_hf(legacy) == cfg
    # the scaling changes the logits (so the parity test below could fail)
    tokens = tokens_for(1, 12)
    positions = np.broadcast_to(np.arange(12), tokens.shape)
    _, params = jax_model("linear_mha")
    unscaled = dataclasses.replace(cfg, rope_scaling=None)
    assert np.abs(_forward(cfg, params, tokens, positions, None)
                  - _forward(unscaled, params, tokens, positions, None)).max() > 1e-3
    # a transformers-4 config given to transformers as it was: the same scaling, read from either spelling
    assert LlamaConfig.from_hf(hf_model("linear_v4_gqa").config).rope_scaling == {"rope_type": "linear",
                                                                                  "factor": 4.0}


def test_initializer_range_sets_every_kernel_and_embedding():
    """HF's `initializer_range` is the std of every kernel and embedding (norms stay at one)."""
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                      initializer_range=0.09)
    params = nn.unbox(init_params(cfg, jax.random.PRNGKey(0)))
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            assert np.all(np.asarray(x) == 1.0), name
        else:
            assert abs(float(np.std(np.asarray(x))) - 0.09) < 0.01, name
    assert LlamaConfig.from_hf(cfg.to_hf_dict()).initializer_range == 0.09
    with pytest.raises(ValueError, match="initializer_range"):
        LlamaConfig(initializer_range=0.0)


@pytest.mark.parametrize("case,scan_layers", [(c, True) for c in CASES] + [("gqa_tied", False)])
def test_full_sequence_logits(case, scan_layers):
    cfg, params = jax_model(case, scan_layers)
    tokens = tokens_for(2, 12)
    positions = np.broadcast_to(np.arange(12), tokens.shape)
    ours = _forward(cfg, params, tokens, positions, None)
    err = assert_close(ours, torch_logits(case, tokens), 1e-4, f"{case} logits")
    print(f"[llama] full logits {case} scan={scan_layers}: max rel err {err:.2e}")


@pytest.mark.parametrize("case,scan_layers", [("mha", True), ("llama3_gqa_tied", True), ("gqa_tied", False),
                                             ("linear_v4_gqa", True)])
def test_kv_cache_decoding(case, scan_layers):
    """Prefill a 5-token prompt, then decode the rest one token at a time (teacher forced)."""
    cfg, params = jax_model(case, scan_layers)
    b, length, prompt = 2, 12, 5
    tokens = tokens_for(b, length, seed=1)
    positions = np.broadcast_to(np.arange(length), tokens.shape).astype(np.int32)
    cache = init_cache(cfg, b, 16)
    logits, cache = _step(cfg, params, tokens[:, :prompt], positions[:, :prompt], None, cache, 0)
    steps = [logits]
    for t in range(prompt, length):
        logits, cache = _step(cfg, params, tokens[:, t : t + 1], positions[:, t : t + 1], None, cache, t)
        steps.append(logits)
    ours = jnp.concatenate(steps, axis=1)
    err = assert_close(ours, torch_logits(case, tokens), 1e-4, f"{case} decode")
    written = np.asarray(cache["segment_ids"])
    assert written[:, :length].min() == 1 and written[:, length:].max() == 0  # only the used slots
    print(f"[llama] kv-cache decode {case} scan={scan_layers}: max rel err {err:.2e}")


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_attention_mask(side):
    case = "gqa_tied"
    cfg, params = jax_model(case)
    length, valid = 12, 8
    tokens = tokens_for(2, length, seed=2)
    mask = np.ones((2, length), np.int32)
    if side == "right":
        mask[1, valid:] = 0
    else:
        mask[1, : length - valid] = 0
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int32)
    ours = np.asarray(_forward(cfg, params, tokens, positions, mask))  # segment_ids = the mask (1 / 0)
    ref = torch_logits(case, tokens, attention_mask=mask, positions=positions)
    keep = mask.astype(bool)
    err = assert_close(ours[keep], ref[keep], 1e-4, f"{side}-padded batch")
    print(f"[llama] {side}-padded batch: max rel err {err:.2e}")


def test_packed_segments_match_separate_documents():
    case = "gqa_tied"  # same shapes as the padded test: no new compile
    cfg, params = jax_model(case)
    a, b = tokens_for(1, 5, seed=3), tokens_for(1, 7, seed=4)
    packed = np.concatenate([a, b], axis=1).repeat(2, axis=0)  # [2, 12]
    segments = np.array([[1] * 5 + [2] * 7] * 2, np.int32)
    positions = np.array([list(range(5)) + list(range(7))] * 2, np.int32)
    ours = np.asarray(_forward(cfg, params, packed, positions, segments))[:1]
    ref = np.concatenate([torch_logits(case, a), torch_logits(case, b)], axis=1)
    err = assert_close(ours, ref, 1e-4, "packed documents")
    print(f"[llama] packed segments: max rel err {err:.2e}")


def test_decode_ragged_prompts_with_per_row_cache_index():
    """Right-padded prompts of different lengths; each row continues at its own slot ([B] cache_index)."""
    case = "llama3_gqa_tied"
    cfg, params = jax_model(case)
    lengths, total = np.array([6, 4]), 10
    seqs = [tokens_for(1, total, seed=5 + i)[0] for i in range(2)]
    prompt = np.zeros((2, 6), np.int32)
    seg = np.zeros((2, 6), np.int32)
    for i, n in enumerate(lengths):
        prompt[i, :n], seg[i, :n] = seqs[i][:n], 1
    positions = np.broadcast_to(np.arange(6), (2, 6)).astype(np.int32)
    cache = init_cache(cfg, 2, 16)
    logits, cache = _step(cfg, params, prompt, positions, seg, cache, 0)
    ours = [[np.asarray(logits[i, :n])] for i, n in enumerate(lengths)]
    index = lengths.copy()
    for _ in range(4):  # next tokens of each row's own sequence
        nxt = np.array([[seqs[i][index[i]]] for i in range(2)], np.int32)
        logits, cache = _step(cfg, params, nxt, index[:, None].astype(np.int32), None, cache,
                              jnp.asarray(index, jnp.int32))
        for i in range(2):
            ours[i].append(np.asarray(logits[i]))
        index += 1
    for i in range(2):
        got = np.concatenate(ours[i], axis=0)
        ref = torch_logits(case, seqs[i][None, : len(got)])[0]
        err = assert_close(got, ref, 1e-4, f"ragged row {i}")
        print(f"[llama] ragged decode row {i}: max rel err {err:.2e}")


def test_remat_policy_and_bf16_run():
    """Remat keeps the value and gives finite gradients; bf16 compute runs and stays close to fp32."""
    case = "gqa_tied"
    cfg, params = jax_model(case)
    tokens = tokens_for(2, 12, seed=6)
    positions = np.broadcast_to(np.arange(12), tokens.shape).astype(np.int32)
    ref = _forward(cfg, params, tokens, positions, None)  # compiled already by the logits test

    remat = LlamaConfig.from_hf(cfg, remat_policy="dots_saveable")
    loss = lambda p: _forward(remat, p, tokens, positions, None).sum()
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert_close(value, ref.sum(), 1e-5, "remat value")
    assert all(bool(jnp.isfinite(g).all()) and bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))

    bf16 = LlamaConfig.from_hf(cfg, dtype=jnp.bfloat16)
    out = _forward(bf16, params, tokens, positions, None)
    assert out.dtype == jnp.bfloat16
    assert_close(out.astype(jnp.float32), ref, 5e-2, "bf16 compute")
    with pytest.raises(ValueError, match="remat_policy"):
        LlamaConfig.from_hf(cfg, remat_policy="bogus")


def test_sharded_forward_matches_single_device():
    """Params placed by their logical axes on a (data, fsdp, tensor) = (2, 2, 2) mesh of the 8 CPU devices."""
    case = "gqa_tied"
    cfg, params = jax_model(case)
    rules = (("batch", ("data", "fsdp")), ("length", None), ("act_embed", None), ("act_heads", "tensor"),
             ("act_mlp", "tensor"), ("act_vocab", "tensor"), ("vocab", "tensor"), ("embed", "fsdp"),
             ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"), ("layers", None), ("norm", None))
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    specs = nn.get_partition_spec(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, nn.logical_to_mesh_axes(s, rules)), specs)
    sharded = jax.device_put(params, shardings)
    tokens = tokens_for(4, 12, seed=7)
    positions = np.broadcast_to(np.arange(12), tokens.shape).astype(np.int32)
    forward = lambda p: Llama(cfg).apply({"params": p}, tokens, positions, method=Llama.forward)
    with mesh, nn.logical_axis_rules(rules):
        out = jax.jit(forward)(sharded)
    assert_close(out, torch_logits(case, tokens), 1e-4, "sharded forward")
