"""`config.init.dreamllm`: a run (or `dreamjax import dreamllm`) starting from the released DreamLLM layout.

The layout itself is `convert/dreamllm_release.py`; this module is what the run assembly does with it:

- `model_configs`: the architecture of every part, from the release's config.json and the CLIP / SD
  configs it names (`run/model.py` merges them into the model sections, as for any `config.init` entry);
- `load_tokenizer`: the release's own tokenizer, its special-token ids checked against config.json's
  `special_tokens2ids_dict` (the released order is not the insertion order: spec 1.2).

The weights stream from the four files onto the mesh through `run/weights.py`, as every other entry's.
"""

from __future__ import annotations

from dreamjax.convert.core import ConversionError
from dreamjax.convert.dreamllm_release import Release, read_release
from dreamjax.data import tokenizer as tokenizer_lib
from dreamjax.models.clip_vision import ClipVisionConfig
from dreamjax.models.llama import LlamaConfig


def read(path: str) -> Release:
    try:
        return read_release(path)
    except ConversionError as e:
        raise ValueError(f"config.init.dreamllm: {e}") from None


def load_tokenizer(path: str):
    """The release's tokenizer; its special-token ids must be config.json's (never constants)."""
    release = read(path)
    tok = _quietly(tokenizer_lib.load_tokenizer, path)
    bad = []
    for token, want in release.special_tokens.items():
        got = tok.convert_tokens_to_ids(token)
        if got != want:
            bad.append(f"{token} = {got} in the tokenizer files, {want} in config.json")
    if bad:
        raise ValueError(f"config.init.dreamllm ({path}): special_tokens2ids_dict disagrees with the tokenizer: "
                         + "; ".join(bad))
    return tok


def _quietly(fn, *args):
    """AutoTokenizer reads the directory's config.json, and transformers warns that `dreamllm` is not a model
    type it knows (and about its LLaMA-era fields): expected for a release, so not shown."""
    import warnings

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args)
    finally:
        hf_logging.set_verbosity(level)


def model_configs(path: str) -> tuple[Release, LlamaConfig, ClipVisionConfig]:
    """The release and its LLM and CLIP configs (the diffusers dicts are `release.unet` / `vae` / `scheduler`)."""
    release = read(path)
    try:
        return release, LlamaConfig.from_hf(release.llm), ClipVisionConfig.from_hf(release.clip)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"config.init.dreamllm: {path}/config.json: {e}") from None
