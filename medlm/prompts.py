"""The text a disease name becomes (``--prompt-format``): ``plain`` (``"Name |"``, the seed's
rows), ``chat`` (the tokenizer's chat template: experiments/RESULTS.md) or ``auto`` (chat where
there is one), kept in the model's config; and its tokens."""

from medlm.errors import MedLMError

PROMPT_SEPARATOR = " | "
PROMPT_FORMATS = ("auto", "plain", "chat")
PROMPT_FORMAT_ATTRIBUTE = "medlm_prompt_format"


def resolve_prompt_format(requested: str, tokenizer, model_name: str) -> str:
    """``auto`` made definite for this tokenizer; ``chat`` refused for one with no template."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if requested == "auto":
        return "chat" if has_template else "plain"
    if requested == "chat" and not has_template:
        raise MedLMError(f"--prompt-format chat needs a chat template, and {model_name}'s "
                         "tokenizer has none: expected --prompt-format plain (or auto)")
    return requested


def prompt_format_of(model) -> str:
    """The format a model was trained on: plain for one that does not say."""
    return getattr(model.config, PROMPT_FORMAT_ATTRIBUTE, None) or "plain"


def set_prompt_format(model, prompt_format: str) -> None:
    """Kept in the config, so ``save_pretrained`` and the registered model carry it."""
    setattr(model.config, PROMPT_FORMAT_ATTRIBUTE, prompt_format)


def bos_ids(tokenizer) -> list[int]:
    """``[bos id]`` where the tokenizer starts every text with one (Gemma), else ``[]``: the
    prefix rows and prompts get as an id (as text, SentencePiece encodes the rest otherwise)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = encode_texts(tokenizer, ["a"], add_special_tokens=True)[0]
    return [bos] if bos is not None and ids and ids[0] == bos else []


def _name(name: str) -> str:  # a name already ending in the separator gets no second one
    return name.strip().removesuffix(PROMPT_SEPARATOR.strip()).rstrip()


def prompts_for(names: list[str], tokenizer=None, prompt_format: str = "plain") -> list[str]:
    """Per name, ``"Name |"`` or the chat template up to the assistant's turn (less a leading
    bos text where ``bos_ids`` adds it as an id)."""
    if prompt_format == "plain":
        return [_name(name) + PROMPT_SEPARATOR.rstrip() for name in names]
    if prompt_format != "chat":
        raise ValueError(f"unknown prompt format {prompt_format!r}")
    bos = getattr(tokenizer, "bos_token", None)
    added_as_id = bos if bos and bos_ids(tokenizer) else ""
    return [tokenizer.apply_chat_template([{"role": "user", "content": _name(name)}],
                                          tokenize=False, add_generation_prompt=True)
            .removeprefix(added_as_id) for name in names]


def prompt_for(name: str, tokenizer=None, prompt_format: str = "plain") -> str:
    """One name's prompt (``prompts_for``)."""
    return prompts_for([name], tokenizer, prompt_format)[0]


def training_texts(names: list[str], symptoms: list[str], tokenizer=None,
                   prompt_format: str = "plain") -> list[str]:
    """Training rows' texts (before their end-of-text token): each prompt, then its symptoms."""
    if prompt_format == "plain":
        return [name + PROMPT_SEPARATOR + text for name, text in zip(names, symptoms, strict=True)]
    return [prompt + text for prompt, text in
            zip(prompts_for(names, tokenizer, prompt_format), symptoms, strict=True)]


def serving_template(tokenizer, prompt_format: str) -> str:
    """MLflow's ``prompt_template``: the prompt with ``{prompt}`` where the name goes."""
    return prompt_for("{prompt}", tokenizer, prompt_format)


def encode_texts(tokenizer, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
    """Token ids of ``texts`` (without special tokens unless asked), in one call: a fast
    tokenizer's backend without character offsets (1.5x faster than ``tokenizer(texts)``)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    # off for this call: the backend keeps the tokenizer's last __call__'s settings
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
    """Pad with end-of-text where there is no pad token (GPT-2), in the model's configs too."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model
