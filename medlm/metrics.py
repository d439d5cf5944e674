"""Symptom-level scores: does the generated text name the disease's symptoms?

Both texts are split into comma-separated phrases, normalised (case-folded, punctuation dropped,
whitespace collapsed) and de-duplicated. A generated phrase *matches* a reference phrase when the
F1 of their word multisets is at least ``MATCH_THRESHOLD`` (0.5): "swelling in the legs" matches
"swelling of the legs and ankles" (F1 0.67), "fatigue" matches "fatigue", "fever" does not match
"chest pain". Phrases are paired one to one, best pairs first, so repeating a right phrase earns
nothing. Precision = matched / generated phrases, recall = matched / reference phrases;
``micro_average`` sums the counts over diseases before dividing.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

MATCH_THRESHOLD = 0.5
_NOT_WORD = re.compile(r"[^\w\s]+")


def split_phrases(text: str) -> list[str]:
    phrases = []
    for raw in text.split(","):
        phrase = " ".join(_NOT_WORD.sub(" ", raw.casefold()).split())
        if phrase and phrase not in phrases:
            phrases.append(phrase)
    return phrases


def phrase_f1(generated: str, reference: str) -> float:
    generated_words, reference_words = Counter(generated.split()), Counter(reference.split())
    common = sum((generated_words & reference_words).values())
    if common == 0:
        return 0.0
    precision = common / sum(generated_words.values())
    recall = common / sum(reference_words.values())
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class SymptomScore:
    matched: int
    generated: int
    reference: int

    @property
    def precision(self) -> float:
        return self.matched / self.generated if self.generated else 0.0

    @property
    def recall(self) -> float:
        return self.matched / self.reference if self.reference else 0.0

    @property
    def f1(self) -> float:
        total = self.precision + self.recall
        return 2 * self.precision * self.recall / total if total else 0.0


def score_symptoms(generated: str, reference: str) -> SymptomScore:
    generated_phrases, reference_phrases = split_phrases(generated), split_phrases(reference)
    pairs = sorted(
        ((phrase_f1(g, r), i, j) for i, g in enumerate(generated_phrases)
         for j, r in enumerate(reference_phrases)),
        reverse=True)
    used_generated: set[int] = set()
    used_reference: set[int] = set()
    for similarity, i, j in pairs:
        if similarity < MATCH_THRESHOLD:
            break
        if i not in used_generated and j not in used_reference:
            used_generated.add(i)
            used_reference.add(j)
    return SymptomScore(len(used_generated), len(generated_phrases), len(reference_phrases))


def micro_average(scores: Iterable[SymptomScore]) -> SymptomScore:
    scores = list(scores)
    return SymptomScore(sum(s.matched for s in scores), sum(s.generated for s in scores),
                        sum(s.reference for s in scores))


def references_by_disease(frame) -> dict[str, tuple[str, str]]:
    """Disease key (case-folded name) -> (name as written, reference symptoms).

    A name listed on several rows (the dataset has 8) gets the union of their phrases.
    """
    references: dict[str, tuple[str, list[str]]] = {}
    for name, symptoms in zip(frame["Name"], frame["Symptoms"], strict=True):
        shown, phrases = references.setdefault(name.casefold(), (name, []))
        phrases += [p.strip() for p in symptoms.split(",") if p.strip() not in phrases]
    return {key: (shown, ", ".join(phrases)) for key, (shown, phrases) in references.items()}


def evaluate_symptoms(model, tokenizer, frame, max_new_tokens: int = 40, batch_size: int = 16):
    """Greedy-decode every distinct disease of ``frame`` and score it against its symptoms.

    Returns (per-disease table as a DataFrame, micro-averaged ``SymptomScore``).
    """
    import pandas as pd

    from medlm.generate import GenerationSettings, generate

    references = list(references_by_disease(frame).values())
    settings = GenerationSettings(max_new_tokens=max_new_tokens, do_sample=False,
                                  repetition_penalty=1.2)
    rows, scores = [], []
    for start in range(0, len(references), batch_size):
        chunk = references[start:start + batch_size]
        completions = generate(model, tokenizer, [name for name, _ in chunk], settings)
        for (name, reference), texts in zip(chunk, completions, strict=True):
            score = score_symptoms(texts[0], reference)
            scores.append(score)
            rows.append({"disease": name, "symptom_precision": score.precision,
                         "symptom_recall": score.recall, "symptom_f1": score.f1,
                         "generated": texts[0], "reference": reference})
    return pd.DataFrame(rows), micro_average(scores)
