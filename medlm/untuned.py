"""The untuned base's answers for a split's held-out diseases, written once and kept under
``$MEDLM_CACHE/untuned``: every run of one base on one split, whatever its training settings,
would decode the very same greedy answers before its first epoch (9-18 s of SmolLM2 on 2 CPU
cores). The key is what those answers depend on (``answers_key``); the answers are scored anew
each time, against the run's own references. A change to MedLM's decoding code that the key
cannot see (the prompt format is in it, as token ids) bumps ``FORMAT``."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from medlm import generate
from medlm.generate import GenerationSettings, encode_prompts
from medlm.metrics import METRIC_VERSION, SCORING_REPETITION_PENALTY
from medlm.modeling import tokenizer_sha256
from medlm.offline import RANDOM_WEIGHTS_MARK, cache_dir
from medlm.prompts import PROMPT_FORMAT_ATTRIBUTE, prompt_format_of, prompts_for

log = logging.getLogger("medlm")

FORMAT = 1  # of the cached file; a change makes earlier files misses


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of the weights a model answers with before training: LoRA adapters are left out
    (they start as a zero update), so a LoRA run and a full fine-tune of one base share it."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            continue
        digest.update(parameter.detach().cpu().contiguous().view(-1).view(torch.uint8)
                      .numpy().tobytes())
    return digest.hexdigest()


def answers_key(model, tokenizer, names: list[str], max_new_tokens: int, precision: str,
                device: str) -> str:
    """What the untuned greedy answers depend on: the model (class, config, weights), the
    prompts as token ids, the decoding settings and batching, the precision, device and thread
    count (fp32 sums in another order), the library versions, and MedLM's scoring rules."""
    import transformers


    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # LoRA's
    config = {key: value for key, value in base.config.to_diff_dict().items()  # the format is
              if key not in ("_name_or_path", "transformers_version", RANDOM_WEIGHTS_MARK,
                             PROMPT_FORMAT_ATTRIBUTE)}  # in the prompts' ids
    prompts = encode_prompts(tokenizer, prompts_for(names, tokenizer, prompt_format_of(model)))
    settings = GenerationSettings(max_new_tokens=max_new_tokens, do_sample=False,
                                  repetition_penalty=SCORING_REPETITION_PENALTY)
    parts = {"format": FORMAT, "class": type(base).__name__, "config": config,
             "weights": weights_sha256(model), "tokenizer": tokenizer_sha256(tokenizer),
             "names": names,
             "prompts": prompts["input_ids"].tolist(),
             "attention": prompts["attention_mask"].tolist(),
             "generation": settings.to_generation_config(tokenizer).to_diff_dict(),
             "batch": generate.MAX_BATCH_SEQUENCES,  # read when asked: a caller may change it
             "precision": precision, "device": device,
             "threads": torch.get_num_threads(), "metric_version": METRIC_VERSION,
             "torch": torch.__version__, "transformers": transformers.__version__}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _path(key: str) -> Path:
    return cache_dir() / "untuned" / f"{key}.json"


def load_answers(key: str, names: list[str]) -> list[str] | None:
    """The cached answers, in the order of ``names``; None when there are none (or the file is
    unreadable, or not for these names)."""
    try:
        saved = json.loads(_path(key).read_text())
    except (OSError, ValueError, RuntimeError):  # RuntimeError: no home directory to expand
        return None
    if not isinstance(saved, dict) or saved.get("names") != names:
        return None
    answers = saved.get("answers")
    if not (isinstance(answers, list) and len(answers) == len(names)
            and all(isinstance(answer, str) for answer in answers)):
        return None
    return answers


def save_answers(key: str, names: list[str], answers: list[str]) -> None:
    """Written to a partial file of its own and renamed, so a reader never sees half of one; a
    cache that cannot be written only warns (the run has its scores)."""
    import tempfile

    partial = None
    try:
        path = _path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                           suffix=".partial")
        with os.fdopen(handle, "w") as file:
            json.dump({"names": names, "answers": answers}, file)
        os.replace(partial, path)
    except (OSError, RuntimeError) as error:
        log.warning("could not keep the untuned base's answers: %s", error)
        if partial is not None:
            Path(partial).unlink(missing_ok=True)
