"""Greedy decoding: dreamjax's compiled KV-cache loop vs transformers `generate` on the same weights.

    .venv/bin/python benchmarks/decode.py                  # default size (~1 min on 2 idle cores)
    .venv/bin/python benchmarks/decode.py --size medium    # a 50M model: memory-bandwidth bound on a CPU
    .venv/bin/python benchmarks/decode.py --tiny           # smoke run

A random `LlamaForCausalLM` is converted with dreamjax's converter into a DreamLLM's LLM; both sides decode the
same batch of prompts of different lengths greedily for the same number of new tokens (no stop token), and the
tokens must agree. transformers runs `generate(do_sample=False)` eager fp32 with its dynamic KV cache and
left padding; dreamjax runs `generate_text` (one jit: prefill + `lax.while_loop`, bucketed static cache),
compiled before timing (the compile time is printed). Repetitions alternate between the two; speed-up =
transformers time / dreamjax time (medians, and from the fastest reps).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dreamjax import runtime  # noqa: E402

if __name__ == "__main__":  # as the dreamjax command, for both sides; before the heavy imports
    runtime.rerun_with_huge_pages()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import linen as nn  # noqa: E402

from benchmarks.run_all import interleaved, torch_uses_every_core  # noqa: E402
from dreamjax.convert import hf  # noqa: E402
from dreamjax.infer.decode import generate_text  # noqa: E402
from dreamjax.models.dreamllm import DreamLLM, SpecialTokenIds, build_config, init_params  # noqa: E402

SIZES = {
    # a ~7M-parameter Llama: per-token work small enough that the framework's per-step overhead shows
    "default": dict(vocab=8192, hidden=256, inter=688, layers=4, heads=8, kv=8, lengths=(60, 41, 20, 33), new=128),
    # a ~50M-parameter Llama (vocab 32000 as Vicuna): on a CPU, a step reads 200 MB of fp32 weights for 4 tokens,
    # so both sides are bound by memory bandwidth
    "medium": dict(vocab=32000, hidden=512, inter=1376, layers=8, heads=8, kv=8, lengths=(60, 41, 20, 33), new=128),
    "tiny": dict(vocab=256, hidden=64, inter=128, layers=2, heads=4, kv=2, lengths=(9, 4, 1), new=8),
}


def build(size: dict, seed: int = 0):
    torch.manual_seed(seed)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=size["vocab"], hidden_size=size["hidden"], intermediate_size=size["inter"],
        num_hidden_layers=size["layers"], num_attention_heads=size["heads"], num_key_value_heads=size["kv"],
        max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.1, bos_token_id=1,
        eos_token_id=None, pad_token_id=0)).eval()
    v = size["vocab"]
    cfg = build_config(dict(
        llm=dict(hidden_size=size["hidden"], intermediate_size=size["inter"], num_layers=size["layers"],
                 num_heads=size["heads"], num_kv_heads=size["kv"], max_position_embeddings=512),
        vision=dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, image_size=16, patch_size=8),
        num_dream_queries=4,
        unet=dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=[16, 32],
                  down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"],
                  attention_head_dim=[2, 2], cross_attention_dim=32, norm_num_groups=8),
        vae=None), vocab_size=v, tokens=SpecialTokenIds(1, v - 4, v - 3, v - 2, v - 1))
    model = DreamLLM(cfg)
    params = dict(nn.meta.unbox(init_params(model, jax.random.PRNGKey(0))))
    params["llm"] = jax.tree.map(jnp.asarray, hf.llama_from_torch(ref.state_dict(), cfg.llm))
    rng = np.random.default_rng(seed)
    prompts = [[1] + rng.integers(2, v - 4, n - 1).tolist() for n in size["lengths"]]
    return ref, model, params, prompts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="default")
    p.add_argument("--tiny", action="store_true", help="= --size tiny (smoke run)")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    size = SIZES["tiny" if args.tiny else args.size]
    cores = torch_uses_every_core()
    runtime.keep_freed_memory()  # as the dreamjax command does; both sides of the comparison share it
    load_before = os.getloadavg()[0]
    print(f"decode benchmark: jax {jax.__version__}, torch {torch.__version__} ({cores} threads), transformers "
          f"{transformers.__version__}; load average (1 min) before: {load_before:.2f}", flush=True)
    ref, model, params, prompts = build(size)
    new = size["new"]
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, pr in enumerate(prompts):  # left padding, as generate wants for decoder-only models
        ids[i, width - len(pr):] = torch.tensor(pr)
        mask[i, width - len(pr):] = 1

    def run_hf():
        with torch.inference_mode():
            out = ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                               min_new_tokens=new, pad_token_id=0, eos_token_id=None)
        return out[:, width:].tolist()

    def run_jax():
        return generate_text(model, params, prompts, max_new_tokens=new)

    t0 = time.perf_counter()
    got = run_jax()
    compile_s = time.perf_counter() - t0
    want = run_hf()
    agree = sum(a == b for g, w in zip(got, want) for a, b in zip(g, w)) / (len(prompts) * new)
    times = interleaved({"transformers": run_hf, "dreamjax": run_jax}, args.reps, 0.0, 0.0)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    tokens = len(prompts) * new
    print(f"model: Llama {size['layers']} layers, d={size['hidden']}, vocab {size['vocab']}; batch {len(prompts)} "
          f"prompts of {list(size['lengths'])} tokens, {new} new tokens each; {args.reps} reps")
    print(f"dreamjax first call (trace + compile + run): {compile_s:.1f}s; greedy tokens equal to transformers: "
          f"{agree:.1%}")
    for k in ("transformers", "dreamjax"):
        print(f"  {k:13s} median {med[k]:8.1f} ms  ({tokens / med[k] * 1e3:8.1f} tokens/s)   best {best[k]:8.1f} ms")
    print(f"speed-up (transformers time / dreamjax time): {med['transformers'] / med['dreamjax']:.2f}x median, "
          f"{best['transformers'] / best['dreamjax']:.2f}x best reps (goal >= 2x)")
    print(f"load average (1 min) before: {load_before:.2f}, after: {os.getloadavg()[0]:.2f}")
    return 0 if agree == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
