"""Consensus decoding: several answers for a disease merged into one, keeping the symptoms
that at least two of them name.

The answers are the greedy one and ``voters - 1`` samples (``SAMPLING``). Each is split into
phrases as the symptom score splits them; phrases that name the same symptom
(``phrases_match``) across answers form one group. A group that at least ``min_votes`` answers
contain is kept, written as its most frequent wording, in the order of its mean relative
position in the answers. A symptom one lucky sample names is dropped; a symptom several name
is kept once. (experiments/RESULTS.md, "Consensus decoding", has the measurements: 5 voters,
at least 2 agreeing.)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from medlm.generate import GenerationSettings, generate
from medlm.text import content_words, phrases_match

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
