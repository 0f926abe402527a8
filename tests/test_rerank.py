"""CLIP re-ranking: the JAX CLIP scorer (text tower written here, vision tower shared with DreamLLM) equals
transformers `CLIPModel.logits_per_image` on the same random weights and tokenizer."""

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from dreamjax.data import images as imgs
from dreamjax.infer.rerank import ClipReranker
from tests.helpers import assert_close

WORDS = ["<|startoftext|>", "<|endoftext|>", "[UNK]", "a", "red", "blue", "green", "circle", "square", "on",
         "white", "background", "large", "small"]


def save_tiny_clip(path, eos_token_id=1):
    """A random CLIPModel and a word-level tokenizer that frames text as CLIP's does (BOS ... EOS, padded)."""
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=12, bos_token_id=0,
                         eos_token_id=eos_token_id, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)).eval()
    model.save_pretrained(path)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>",
                                         eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                         unk_token="[UNK]").save_pretrained(path)
    return model


def test_clip_scores_equal_transformers(tmp_path):
    ref = save_tiny_clip(tmp_path)
    scorer = ClipReranker(str(tmp_path))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 24, 24, 3), dtype=np.uint8)
    texts = ["a red circle", "a blue square on white background", "green", "a large small circle", "red red red"]
    got = scorer(images, texts)
    pixels = np.stack([imgs.clip_preprocess(im, 32) for im in images])
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(scorer.tokenize(texts)).long(),
                  pixel_values=torch.from_numpy(np.moveaxis(pixels, -1, 1).copy()))
    want = np.diag(out.logits_per_image.numpy())
    assert_close(got, want, 1e-5, "CLIP scores")


def test_not_a_clip_dir_is_a_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="CLIP checkpoint directory not found"):
        ClipReranker(str(tmp_path / "nope"))
