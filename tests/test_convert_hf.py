"""transformers LLaMA / CLIP-vision state dicts <-> dreamjax params: bit-exact round trips, clear errors."""

import functools
import json
import re

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from dreamjax.convert import core, hf
from dreamjax.convert.core import ConversionError
from dreamjax.models.clip_vision import ClipVisionConfig
from dreamjax.models.llama import LlamaConfig


@functools.cache
def llama_model(tied: bool) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@functools.cache
def clip_model() -> transformers.CLIPVisionModel:
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=28, patch_size=14)
    torch.manual_seed(0)
    return transformers.CLIPVisionModel(cfg).eval()


def state_dict(model, dtype: torch.dtype, prefix: str = "") -> dict:
    return {prefix + k: v.to(dtype).clone() for k, v in model.state_dict().items()}


def assert_bit_exact(exported: dict, original: dict) -> None:
    assert sorted(exported) == sorted(original)
    for k, v in original.items():
        ref = core.to_numpy(v)
        assert exported[k].dtype == ref.dtype, k
        assert exported[k].shape == ref.shape, k
        assert np.array_equal(exported[k].view(np.uint8), ref.view(np.uint8)), k  # bits, NaN-safe


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("tied", [False, True])
def test_llama_round_trip_bit_exact(tied, scan_layers, dtype):
    model = llama_model(tied)
    cfg = LlamaConfig.from_hf(model.config, scan_layers=scan_layers)
    sd = state_dict(model, dtype)
    sd["model.rotary_emb.inv_freq"] = torch.ones(4)  # old checkpoints carry this buffer: ignored
    params = hf.llama_from_torch(sd, cfg)
    if dtype == torch.bfloat16:
        assert params["norm"]["scale"].dtype == ml_dtypes.bfloat16
    if scan_layers:
        assert params["layers"]["self_attn"]["q_proj"]["kernel"].shape == (2, 32, 32)
    else:
        assert params["layers_1"]["self_attn"]["k_proj"]["kernel"].shape == (32, 16)
    assert ("lm_head" in params) == (not tied)
    exported = hf.llama_to_torch(params, cfg)
    del sd["model.rotary_emb.inv_freq"]
    if tied:  # transformers' state_dict() lists the tied head; export (like save_pretrained) does not
        del sd["lm_head.weight"]
    assert_bit_exact(exported, sd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("prefix", ["vision_model.", "", "clip_vision_model.vision_model."])
def test_clip_round_trip_bit_exact(prefix, scan_layers, dtype):
    cfg = ClipVisionConfig.from_hf(clip_model().config, scan_layers=scan_layers)
    sd = state_dict(clip_model(), dtype, prefix)
    sd[prefix + "embeddings.position_ids"] = torch.arange(5)[None]  # old buffer: ignored
    params = hf.clip_vision_from_torch(sd, cfg)  # prefix detected
    del sd[prefix + "embeddings.position_ids"]
    assert_bit_exact(hf.clip_vision_to_torch(params, cfg, prefix=prefix), sd)


# ----------------------------------------------------------------------------- errors


def test_llama_missing_and_unexpected_keys_are_named():
    cfg = LlamaConfig.from_hf(llama_model(False).config)
    sd = state_dict(llama_model(False), torch.float32)
    missing = dict(sd)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ConversionError, match=r"missing keys: model\.layers\.1\.mlp\.up_proj\.weight"):
        hf.llama_from_torch(missing, cfg)
    no_head = dict(sd)
    del no_head["lm_head.weight"]
    with pytest.raises(ConversionError, match=r"missing keys: lm_head\.weight"):
        hf.llama_from_torch(no_head, cfg)
    extra = {**sd, "model.layers.0.self_attn.q_norm.weight": torch.ones(8)}
    with pytest.raises(ConversionError, match=r"unexpected keys: model\.layers\.0\.self_attn\.q_norm\."):
        hf.llama_from_torch(extra, cfg)
    with pytest.raises(ConversionError, match=r"model\.layers\.2\.input_layernorm\.weight"):  # a 3rd layer
        hf.llama_from_torch({**sd, "model.layers.2.input_layernorm.weight": torch.ones(32)}, cfg)
    bad_shape = {**sd, "model.norm.weight": torch.ones(31)}
    with pytest.raises(ConversionError, match=r"norm/scale \(31,\) != \(32,\)"):
        hf.llama_from_torch(bad_shape, cfg)


def test_clip_missing_and_unexpected_keys_are_named():
    cfg = ClipVisionConfig.from_hf(clip_model().config)
    sd = state_dict(clip_model(), torch.float32, "vision_model.")
    missing = dict(sd)
    del missing["vision_model.encoder.layers.0.layer_norm2.bias"]
    with pytest.raises(ConversionError, match=r"missing keys: vision_model\.encoder\.layers\.0\.layer_norm2"):
        hf.clip_vision_from_torch(missing, cfg)
    extra = {**sd, "vision_model.encoder.layers.1.extra.weight": torch.ones(2)}
    with pytest.raises(ConversionError, match=r"unexpected keys: vision_model\.encoder\.layers\.1\.extra\."):
        hf.clip_vision_from_torch(extra, cfg)
    with pytest.raises(ConversionError, match="no CLIP vision weights"):
        hf.clip_vision_from_torch({"foo.weight": torch.ones(1)}, cfg)


def test_bad_paths_are_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ConversionError, match=re.escape(str(missing))):
        hf.load_hf_llama(missing)
    with pytest.raises(ConversionError, match=re.escape(f"no config.json in {tmp_path}")):
        hf.load_hf_clip(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(LlamaConfig(
        vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2).to_hf_dict()))
    with pytest.raises(ConversionError, match=re.escape(f"no weights file in {tmp_path}")):
        hf.load_hf_llama(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConversionError, match="config.json"):
        hf.load_hf_llama(tmp_path)


# ----------------------------------------------------------------------------- directories


@pytest.mark.parametrize("tied", [False, True])
def test_llama_directory_import_export(tmp_path, tied):
    """save_pretrained -> load_hf_llama -> save_hf_llama -> from_pretrained gives the same model."""
    model = llama_model(tied)
    model.save_pretrained(tmp_path / "hf")
    params, cfg = hf.load_hf_llama(tmp_path / "hf", scan_layers=False)
    assert cfg == LlamaConfig.from_hf(model.config, scan_layers=False)
    assert params["embed_tokens"]["embedding"].dtype == np.float32
    hf.save_hf_llama(params, cfg, tmp_path / "out")
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert again.config.tie_word_embeddings == tied
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    # param_dtype override casts on load
    params16, _ = hf.load_hf_llama(tmp_path / "hf", param_dtype="bfloat16")
    assert params16["layers"]["mlp"]["up_proj"]["kernel"].dtype == ml_dtypes.bfloat16


def test_clip_directory_import_export(tmp_path):
    """A full CLIPModel directory (text half dropped) and a CLIPVisionModel export."""
    vision = clip_model().config.to_dict()
    full_cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=vision, projection_dim=8,
    )
    torch.manual_seed(1)
    full = transformers.CLIPModel(full_cfg).eval()
    full.save_pretrained(tmp_path / "clip")
    params, cfg = hf.load_hf_clip(tmp_path / "clip")
    assert cfg == ClipVisionConfig.from_hf(clip_model().config)
    hf.save_hf_clip(params, cfg, tmp_path / "out")
    again = transformers.CLIPVisionModel.from_pretrained(tmp_path / "out").eval()
    ref = {k[len("vision_model."):]: v for k, v in full.state_dict().items() if k.startswith("vision_model.")}
    got = again.state_dict()
    assert sorted(got) == sorted(ref)
    for k, v in ref.items():
        assert torch.equal(got[k], v), k
