"""The untuned base's greedy answers for a split's held-out diseases, decoded once (9-18 s of
SmolLM2 on 2 CPU cores) and kept under ``$MEDLM_CACHE/untuned`` by ``answers_key``."""

import hashlib
import json
import logging
from pathlib import Path

import torch

from medlm import generate
from medlm.checkpoint import write_durably
from medlm.generate import GenerationSettings, encode_prompts
from medlm.metrics import METRIC_VERSION, SCORING_REPETITION_PENALTY
from medlm.modeling import tokenizer_sha256
from medlm.offline import RANDOM_WEIGHTS_MARK, cache_dir
from medlm.prompts import PROMPT_FORMAT_ATTRIBUTE, prompt_format_of, prompts_for

log = logging.getLogger("medlm")

FORMAT = 1  # bumped for a change to decoding that the key cannot see: earlier files miss


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of the weights, LoRA adapters left out (a zero update before training)."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        if "lora_" not in name:
            digest.update(parameter.detach().cpu().contiguous().view(-1).view(torch.uint8)
                          .numpy().tobytes())
    return digest.hexdigest()


def answers_key(model, tokenizer, names: list[str], max_new_tokens: int, precision: str,
                device: str) -> str:
    """A digest of all the untuned greedy answers depend on (threads: fp32 sum order)."""
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
             "names": names, "prompts": prompts["input_ids"].tolist(),
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
    """The cached answers, in the order of ``names``; None where none are (readable)."""
    try:
        saved = json.loads(_path(key).read_text())
    except (OSError, ValueError, RuntimeError):  # RuntimeError: no home directory to expand
        return None
    if not isinstance(saved, dict) or saved.get("names") != names:
        return None
    answers = saved.get("answers")  # a hand-edited or foreign file: decoded again
    return answers if (isinstance(answers, list) and len(answers) == len(names)
                       and all(isinstance(answer, str) for answer in answers)) else None


def save_answers(key: str, names: list[str], answers: list[str]) -> None:
    """Replaced in one step, so no reader sees half a file; a warning where it cannot be."""
    try:
        write_durably(_path(key), json.dumps({"names": names, "answers": answers}))
    except (OSError, RuntimeError) as error:
        log.warning("could not keep the untuned base's answers: %s", error)
