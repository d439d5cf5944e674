"""Writing symptoms for disease names: sampling settings and a batched ``generate()``.

Consensus decoding: several answers for a disease merged into one, keeping the symptoms
that at least two of them name.

The answers are the greedy one and ``voters - 1`` samples (``SAMPLING``). Each is split into
phrases as the symptom score splits them; phrases that name the same symptom
(``phrases_match``) across answers form one group. A group that at least ``min_votes`` answers
contain is kept, written as its most frequent wording, in the order of its mean relative
position in the answers. A symptom one lucky sample names is dropped; a symptom several name
is kept once. (experiments/RESULTS.md, "Consensus decoding", has the measurements: 5 voters,
at least 2 agreeing.)"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from medlm.data import drop_long_names
from medlm.errors import MedLMError, shorten
from medlm.modeling import casts_cached, context_size
from medlm.prompts import bos_ids, encode_texts, prompt_format_of, prompts_for
from medlm.text import content_words, phrases_match


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
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            **(sampling if self.do_sample else {}),
            repetition_penalty=self.repetition_penalty,
            num_return_sequences=self.num_return_sequences,
            **({"num_beams": self.num_beams} if self.num_beams > 1 else {}),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )


def check_generation_length(model, prompt_tokens: int, max_new_tokens: int,
                            disease: str | None = None) -> None:
    """A prompt and its answer must fit the model's context (GPT-2's position embeddings end
    there: beyond, generation fails with an IndexError deep inside the model). ``disease``: the
    name whose prompt this is, named in the error."""

    context = context_size(model)
    named = f" ({shorten(disease)!r})" if disease is not None else ""
    if context is not None and prompt_tokens >= context:
        raise MedLMError(f"a prompt of {prompt_tokens} tokens{named} does not fit this model's "
                         f"context of {context} tokens: expected shorter prompts (disease names)")
    if context is not None and prompt_tokens + max_new_tokens > context:
        raise MedLMError(f"--max-new-tokens {max_new_tokens} is too long for this model: a "
                         f"prompt of {prompt_tokens} tokens{named} plus the answer must fit its "
                         f"context of {context} tokens: expected at most {context - prompt_tokens}")


def check_prompts_fit(model, tokenizer, diseases: list[str], max_new_tokens: int,
                      prompt_format: str) -> None:
    """``check_generation_length`` for the longest of the diseases' prompts, naming it."""
    lengths = prompt_lengths(tokenizer, diseases, prompt_format)
    longest = max(range(len(diseases)), key=lengths.__getitem__)
    check_generation_length(model, lengths[longest], max_new_tokens, diseases[longest])


def drop_unanswerable(data, model, tokenizer, max_new_tokens: int, prompt_format: str) -> bool:
    """Drop the rows (``medlm.data.drop_long_names``: counted, named in a warning) whose
    disease name leaves no room in the model's context for a ``max_new_tokens`` answer,
    before the split, so that a run and ``experiments.evaluate`` hold out the same rows; True
    if any. An answer too long for every name is the flag's fault: the error names it."""
    context = context_size(model)
    if context is None:
        return False
    names = data.frame["Name"].tolist()
    lengths = prompt_lengths(tokenizer, names, prompt_format)
    shortest = min(range(len(names)), key=lengths.__getitem__)
    check_generation_length(model, lengths[shortest], max_new_tokens, names[shortest])
    return drop_long_names(data, lengths, context - max_new_tokens,
                           f"leaves no room in the model's context of {context} tokens for a "
                           f"--max-new-tokens {max_new_tokens} answer")


def prompt_lengths(tokenizer, diseases: list[str], prompt_format: str) -> list[int]:
    """Tokens of each disease's prompt as ``generate()`` encodes it, beginning-of-text
    included."""
    prefix = len(bos_ids(tokenizer))
    return [prefix + len(ids) for ids in
            encode_texts(tokenizer, prompts_for(diseases, tokenizer, prompt_format))]


def forked_rng(device: torch.device):
    """Sampling's random numbers drawn from a fork of the CPU generator and ``device``'s own
    (CUDA or MPS), so a seeded sample neither reseeds nor advances training's dropout stream."""
    if device.type in ("cuda", "mps"):
        return torch.random.fork_rng(devices=[device], device_type=device.type)
    return torch.random.fork_rng(devices=[])


def encode_prompts(tokenizer, prompts: list[str]):
    """Prompts as a left-padded batch, each starting with the beginning-of-text id where the
    tokenizer adds one (as training rows do). Pads on the tokenizer's own ``padding_side``."""
    prefix = bos_ids(tokenizer)
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    return tokenizer.pad({"input_ids": [prefix + ids for ids in encoded]}, padding=True,
                         return_tensors="pt")


MAX_BATCH_SEQUENCES = 128  # sequences (or beams) in one model.generate call: bounds memory


def generate(model, tokenizer, diseases: list[str],
             settings: GenerationSettings | None = None) -> list[list[str]]:
    """Symptoms written for each disease name: one list of ``num_return_sequences`` per name.

    Prompts are batched with left padding, at most ``MAX_BATCH_SEQUENCES`` sequences at a
    time, so many names or many completions per name do not need memory for all at once.
    With a seed, the global RNG is forked, so sampling is repeatable and a training run's
    random stream is left as it was.
    """
    settings = settings or GenerationSettings()
    if not diseases:
        return []
    device = next(model.parameters()).device
    per_prompt = settings.num_return_sequences
    config = settings.to_generation_config(tokenizer)
    prompt_format = prompt_format_of(model)  # as it was trained
    check_prompts_fit(model, tokenizer, diseases, settings.max_new_tokens, prompt_format)
    prompts = prompts_for(diseases, tokenizer, prompt_format)
    # (prompts, sequences per prompt) per call: several prompts with all their completions
    # (beam search: all their beams, kept together), or one prompt's completions in parts when
    # they alone exceed the bound
    beams = max(settings.num_beams, 1)
    if beams > 1 or per_prompt <= MAX_BATCH_SEQUENCES:
        step = max(MAX_BATCH_SEQUENCES // max(per_prompt, beams), 1)
        calls = [(prompts[start:start + step], per_prompt)
                 for start in range(0, len(prompts), step)]
    else:
        calls = [([prompt], min(MAX_BATCH_SEQUENCES, per_prompt - done))
                 for prompt in prompts for done in range(0, per_prompt, MAX_BATCH_SEQUENCES)]
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batches = [(encode_prompts(tokenizer, chunk), count) for chunk, count in calls]
    finally:
        tokenizer.padding_side = padding_side
    was_training = model.training
    model.eval()
    texts = []
    # no_grad, not inference_mode: under inference_mode autocast casts every weight again at
    # every step (its cast cache is off there); under no_grad each weight is cast once per
    # call: scoring 78 names with distilgpt2 in bf16 spent a third of its time in those casts
    with forked_rng(device), torch.no_grad(), casts_cached(model, device):
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        for batch, count in batches:
            batch = batch.to(device)
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
    wordings: Counter[str] = field(default_factory=Counter)
    shown: dict[str, str] = field(default_factory=dict)


def _phrases(text: str) -> list[tuple[frozenset[str], str]]:
    """The answer's distinct phrases, each as (content words, wording as written)."""
    seen, phrases = set(), []
    for raw in text.split(","):
        words = content_words(raw)
        if words and words not in seen:
            seen.add(words)
            wording = " ".join(raw.split())
            if not phrases and wording[1:2].islower():  # an answer's capital, not an acronym's
                wording = wording[:1].lower() + wording[1:]
            phrases.append((words, wording))
    return phrases


def consensus_answer(samples: Sequence[str], min_votes: int = MIN_VOTES) -> str:
    """One comma-separated answer: the symptoms that at least ``min_votes`` of ``samples``
    name."""
    if min_votes < 1:
        raise ValueError(f"min_votes {min_votes!r}: expected a whole number >= 1")
    groups: list[_Group] = []
    for index, sample in enumerate(samples):
        phrases = _phrases(sample)
        for position, (words, wording) in enumerate(phrases):
            group = next((g for g in groups if index not in g.samples
                          and phrases_match(words, g.words)), None)
            if group is None:
                group = _Group(words)
                groups.append(group)
            group.samples.add(index)
            group.positions.append(position / max(len(phrases), 1))
            # counted case-folded ("Fever", "fever"), written as first seen ("HIV" stays)
            group.shown.setdefault(wording.casefold(), wording)
            group.wordings[wording.casefold()] += 1
    kept = [g for g in groups if len(g.samples) >= min_votes]
    kept.sort(key=lambda g: sum(g.positions) / len(g.positions))
    answer = ", ".join(g.shown[g.wordings.most_common(1)[0][0]] for g in kept)
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
