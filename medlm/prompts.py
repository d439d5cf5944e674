"""The text a disease name becomes before the model writes its symptoms, in one of two formats
(``--prompt-format``):

- ``plain``: ``"Name |"``, then ``" symptoms"`` (the seed notebook's ``"Name | Symptoms"`` rows);
- ``chat``: the tokenizer's own chat template with the name as the user's turn and the symptoms
  as the assistant's. On SmolLM2-Instruct, which was tuned on that shape, it scored +0.016
  held-out symptom F1 and +0.031 word F1 over plain (paired, two split seeds x two training
  seeds), but its rows are 2.3x as long (52.6 tokens against 23.2 on average: 21 of the 30 the
  template adds are its system turn), so each epoch trains on 2.3x the tokens; plain stays the
  default (experiments/RESULTS.md).
- ``auto``: ``chat`` for a tokenizer that has a chat template, ``plain`` for one that has none
  (distilgpt2, the Gemma 3 270M base).

A model keeps the format it was trained on in its config (``PROMPT_FORMAT_ATTRIBUTE``), which
is saved and registered with it, so generation, scoring and serving prompt it the same way; a
model without one is plain.

Tokenizer rules with no model code behind them: token ids of texts in one call to a fast
tokenizer's backend (leaving its own padding and truncation settings as they were), and the pad
token a GPT-2-style tokenizer lacks."""

from __future__ import annotations

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
    """The format a model was trained on: plain for one that does not say (MedLM before it
    kept one, or a base that was never fine-tuned)."""
    return getattr(model.config, PROMPT_FORMAT_ATTRIBUTE, None) or "plain"


def set_prompt_format(model, prompt_format: str) -> None:
    """Kept in the config, so ``save_pretrained`` and the registered model carry it."""
    setattr(model.config, PROMPT_FORMAT_ATTRIBUTE, prompt_format)


def bos_ids(tokenizer) -> list[int]:
    """``[beginning-of-text id]`` for a tokenizer that starts every text with one (Gemma: its
    answers fall apart without it), else ``[]`` (GPT-2, SmolLM2). Training rows and prompts are
    tokenized without special tokens and given this prefix as an id (not as text, which a
    SentencePiece tokenizer would encode differently after it), so they start as the tokenizer's
    own encoding does, and as a served model's pipeline encodes a prompt."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = encode_texts(tokenizer, ["a"], add_special_tokens=True)[0]
    return [bos] if ids and ids[0] == bos else []


def _name(name: str) -> str:
    """A name already ending in the separator is not given a second one."""
    return name.strip().removesuffix(PROMPT_SEPARATOR.strip()).rstrip()


def prompts_for(names: list[str], tokenizer=None, prompt_format: str = "plain") -> list[str]:
    """What the model continues with the symptoms, per name: ``"Name |"``, or the chat
    template's text up to the assistant's turn. A template that starts with the
    beginning-of-text token's text (Gemma's ``<bos>``) loses it where MedLM adds that token as an
    id (``bos_ids``, asked once for all names); elsewhere the text stays whole (SmolLM2's bos
    token is ``<|im_start|>``, its template's first word)."""
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
        return [name + PROMPT_SEPARATOR + text
                for name, text in zip(names, symptoms, strict=True)]
    return [prompt + text for prompt, text in
            zip(prompts_for(names, tokenizer, prompt_format), symptoms, strict=True)]


def serving_template(tokenizer, prompt_format: str) -> str:
    """MLflow's ``prompt_template``: the prompt with ``{prompt}`` where the name goes."""
    return prompt_for("{prompt}", tokenizer, prompt_format)


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
