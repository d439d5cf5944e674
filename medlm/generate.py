"""Generation settings, a batched ``generate()``, and consensus decoding: the greedy answer
and samples merged, keeping the symptoms at least two name (experiments/RESULTS.md)."""

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from medlm.errors import MedLMError, shorten
from medlm.modeling import casts_cached, context_size
from medlm.prompts import bos_ids, encode_texts, prompt_format_of, prompts_for
from medlm.text import phrases_match, worded_phrases

log = logging.getLogger(__name__)


@dataclass
class GenerationSettings:
    """The seed notebook's sampling settings, which are also the logged model's defaults."""

    max_new_tokens: int = 40
    do_sample: bool = True
    top_k: int = 8
    top_p: float = 0.95
    temperature: float = 0.5
    repetition_penalty: float = 1.2
    num_return_sequences: int = 1
    seed: int | None = 42
    num_beams: int = 1  # > 1: beam search (with do_sample=False, the most likely whole answer)

    def to_generation_config(self, tokenizer):
        from transformers import GenerationConfig

        sampling = dict(top_k=self.top_k, top_p=self.top_p, temperature=self.temperature)
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
            repetition_penalty=self.repetition_penalty,
            num_return_sequences=self.num_return_sequences,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            **(sampling if self.do_sample else {}),
            **({"num_beams": self.num_beams} if self.num_beams > 1 else {}))


def check_prompts_fit(model, tokenizer, diseases: list[str], max_new_tokens: int,
                      prompt_format: str, worst=max) -> list[int]:
    """Each disease's prompt length as ``generate()`` encodes it; a refusal naming the disease
    where the longest (``worst=min``: shortest) prompt and its answer overflow the context
    (GPT-2: an IndexError deep inside)."""
    prefix = len(bos_ids(tokenizer))
    lengths = [prefix + len(ids) for ids in
               encode_texts(tokenizer, prompts_for(diseases, tokenizer, prompt_format))]
    context = context_size(model)
    if context is None:
        return lengths
    index = worst(range(len(diseases)), key=lengths.__getitem__)
    tokens, named = lengths[index], f" ({shorten(diseases[index])!r})"
    if tokens >= context:
        raise MedLMError(f"a prompt of {tokens} tokens{named} does not fit this model's "
                         f"context of {context} tokens: expected shorter prompts (disease names)")
    if tokens + max_new_tokens > context:
        raise MedLMError(f"--max-new-tokens {max_new_tokens} is too long for this model: a "
                         f"prompt of {tokens} tokens{named} plus the answer must fit its "
                         f"context of {context} tokens: expected at most {context - tokens}")
    return lengths


def drop_unanswerable(data, model, tokenizer, max_new_tokens: int, prompt_format: str) -> bool:
    """Drop the rows whose name leaves no room for a ``max_new_tokens`` answer, warned with their
    names, before the split (so training and held-out rows lose such a name alike, and a run and
    ``experiments.evaluate`` hold out the same rows); True if any."""
    context = context_size(model)
    if context is None:
        return False
    lengths = check_prompts_fit(model, tokenizer, data.frame["Name"].tolist(), max_new_tokens,
                                prompt_format, worst=min)
    too_long = np.asarray(lengths) > context - max_new_tokens
    if not too_long.any():
        return False
    names = data.frame["Name"][too_long]
    log.warning("dropped %d row(s) whose disease name leaves no room in the model's context of "
                "%d tokens for a --max-new-tokens %d answer: %s", len(names), context,
                max_new_tokens, ", ".join(repr(shorten(name)) for name in names))
    data.frame = data.frame[~too_long].reset_index(drop=True)
    data.dropped_rows += len(names)
    return True


def forked_rng(device: torch.device):
    """Forked CPU and ``device`` generators: seeded sampling leaves training's stream alone."""
    if device.type in ("cuda", "mps"):
        return torch.random.fork_rng(devices=[device], device_type=device.type)
    return torch.random.fork_rng(devices=[])


def encode_prompts(tokenizer, prompts: list[str], padding_side: str | None = None):
    """Prompts as a padded batch, each after ``bos_ids`` as training rows are."""
    prefix = bos_ids(tokenizer)
    return tokenizer.pad({"input_ids": [prefix + ids for ids in encode_texts(tokenizer, prompts)]},
                         padding=True, padding_side=padding_side, return_tensors="pt")


MAX_BATCH_SEQUENCES = 128  # sequences (or beams) in one model.generate call: bounds memory


def generate(model, tokenizer, diseases: list[str],
             settings: GenerationSettings) -> list[list[str]]:
    """``num_return_sequences`` answers per name, at most ``MAX_BATCH_SEQUENCES`` a call."""
    if not diseases:
        return []
    device = next(model.parameters()).device
    per_prompt = settings.num_return_sequences
    config = settings.to_generation_config(tokenizer)
    prompt_format = prompt_format_of(model)
    check_prompts_fit(model, tokenizer, diseases, settings.max_new_tokens, prompt_format)
    prompts = prompts_for(diseases, tokenizer, prompt_format)
    # (prompts, sequences per prompt) per call: several prompts with all their completions (or
    # beams), or one prompt's completions in parts where they alone exceed the bound
    beams = max(settings.num_beams, 1)
    if beams > 1 or per_prompt <= MAX_BATCH_SEQUENCES:
        step = max(MAX_BATCH_SEQUENCES // max(per_prompt, beams), 1)
        calls = [(prompts[start:start + step], per_prompt)
                 for start in range(0, len(prompts), step)]
    else:
        calls = [([prompt], min(MAX_BATCH_SEQUENCES, per_prompt - done))
                 for prompt in prompts for done in range(0, per_prompt, MAX_BATCH_SEQUENCES)]
    was_training = model.training
    model.eval()
    texts = []
    # no_grad, not inference_mode, where autocast's cast cache is off (a third of bf16 scoring)
    with forked_rng(device), torch.no_grad(), casts_cached(model, device):
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        for chunk, count in calls:
            batch = encode_prompts(tokenizer, chunk, "left").to(device)
            config.num_return_sequences = count
            output = model.generate(**batch, generation_config=config)
            texts += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:],
                                            skip_special_tokens=True)
    model.train(was_training)
    return [[text.strip() for text in texts[i * per_prompt:(i + 1) * per_prompt]]
            for i in range(len(diseases))]


DEFAULT_VOTERS = 5  # answers per disease: the greedy one and 4 samples
MIN_VOTES = 2  # answers that must name a symptom for it to be kept
# the samples' settings: varied enough to disagree where the model is unsure
SAMPLING = {"temperature": 0.7, "top_k": 50, "top_p": 0.95, "repetition_penalty": 1.0}


@dataclass
class _Group:
    words: frozenset[str]  # the content words of the group's first phrase: what others match
    samples: set[int] = field(default_factory=set)
    positions: list[float] = field(default_factory=list)
    wordings: list[str] = field(default_factory=list)

    def wording(self) -> str:
        """The most frequent wording, counted case-folded, written as first seen ("HIV")."""
        top = Counter(wording.casefold() for wording in self.wordings).most_common(1)[0][0]
        return next(wording for wording in self.wordings if wording.casefold() == top)


def consensus_answer(samples: Sequence[str], min_votes: int = MIN_VOTES) -> str:
    """The symptoms at least ``min_votes`` samples name, most frequent wording, mean order."""
    if min_votes < 1:
        raise ValueError(f"min_votes {min_votes!r}: expected a whole number >= 1")
    groups: list[_Group] = []
    for index, sample in enumerate(samples):
        phrases = worded_phrases(sample)
        for position, (words, wording) in enumerate(phrases.items()):
            if position == 0 and wording[1:2].islower():  # an answer's capital, not an acronym's
                wording = wording[:1].lower() + wording[1:]
            group = next((g for g in groups if index not in g.samples
                          and phrases_match(words, g.words)), None)
            if group is None:
                group = _Group(words)
                groups.append(group)
            group.samples.add(index)
            group.positions.append(position / len(phrases))
            group.wordings.append(wording)
    kept = [g for g in groups if len(g.samples) >= min_votes]
    kept.sort(key=lambda g: sum(g.positions) / len(g.positions))
    answer = ", ".join(g.wording() for g in kept)
    return answer[:1].upper() + answer[1:]  # as the model writes its answers


def consensus_answers(model, tokenizer, diseases: list[str], voters: int = DEFAULT_VOTERS,
                      max_new_tokens: int = 40, seed: int = 42) -> list[str]:
    """One merged answer per disease from its greedy answer and ``voters - 1`` samples."""
    greedy = generate(model, tokenizer, diseases, GenerationSettings(
        max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.0))
    samples = generate(model, tokenizer, diseases, GenerationSettings(
        max_new_tokens=max_new_tokens, num_return_sequences=voters - 1, seed=seed, **SAMPLING))
    # where no two answers agree, the greedy answer (an empty one would say nothing)
    return [consensus_answer(first + rest) or first[0]
            for first, rest in zip(greedy, samples, strict=True)]
