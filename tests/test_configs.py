"""configs/dreamllm_7b.py: every stage as upstream ran it (spec section 2), the real model sizes built
abstractly (nothing allocated), and a clear error where a config needs what is not built yet."""

import os

import jax
import pytest

from dreamjax.cli import load_config, main
from dreamjax.models.dreamllm import DreamLLM, SpecialTokenIds, build_config, init_params
from dreamjax.train.stages import get_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "dreamllm_7b.py")
TOKENS = SpecialTokenIds(bos=1, im_start=32001, im_patch=32004, dream_start=32003, dream_end=32002)


@pytest.mark.parametrize("stage, mode, lr, trainable", [
    ("stage1_creation", "creation_only", 2e-3, ("dream_queries", "condition_projector")),
    ("stage1_comprehension", "comprehension_only", 2e-3, ("visual_projector",)),
    ("stage2", "joint", 2e-5, ("llm", "visual_projector", "dream_queries", "condition_projector")),
    ("stage3", "joint", 4e-5, ("llm", "visual_projector", "dream_queries", "condition_projector")),
])
def test_stage_configs(stage, mode, lr, trainable):
    c = load_config(f"{CONFIG}:{stage}")
    assert (c.train.stage, c.data.mode, c.train.learning_rate) == (stage, mode, lr)
    assert c.train.global_batch_size == 2048 and c.data.max_length == 2048
    assert get_stage(c.train.stage).trainable == trainable
    assert abs(sum(c.data.mixture.values()) - 1.0) < 1e-9


@pytest.mark.parametrize("arg, vocab, billions", [("stage2", 32008, 8.00), ("stage2,llama3_8b", 128264, 9.28)])
def test_the_real_model_builds(arg, vocab, billions):
    c = load_config(f"{CONFIG}:{arg}")
    cfg = build_config(c.model.to_dict() | {"schedule": None}, vocab_size=vocab, tokens=TOKENS)
    assert (cfg.unet.cross_attention_dim, cfg.vae.scaling_factor, cfg.num_image_tokens) == (1024, 0.18215, 256)
    abstract = jax.eval_shape(lambda k: init_params(DreamLLM(cfg), k), jax.random.key(0))
    n = sum(x.size for x in jax.tree.leaves(abstract))
    assert abs(n / 1e9 - billions) < 0.02, n


def test_bad_arg_and_missing_data_paths_fail_with_one_line(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown stage 'stage9'"):
        load_config(f"{CONFIG}:stage9")
    assert main(["train", "--config", f"{CONFIG}:stage2", "--workdir", str(tmp_path), "--config.tokenizer=synthetic",
                 "--config.model.llm.num_layers=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.data.paths is empty" in err[0], err  # before anything is built
