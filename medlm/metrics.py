"""Symptom F1, word F1 and the answers that need no model (the rules, with examples:
medlm/README.md, "Is the model any good?")."""

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medlm.text import content_words, phrases_match, split_phrases

METRIC_VERSION = "4"  # bumped when a change to the rules makes old scores incomparable
# no repetition penalty: the seed's 1.2 penalises commas, the separator the metric splits on
# (experiments/RESULTS.md, "Repetition penalty of the scored answers")
SCORING_REPETITION_PENALTY = 1.0


@dataclass(frozen=True)
class SymptomScore:
    """Counts behind a precision/recall/F1: of phrases (symptom scores) or of words (word F1)."""

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
    """Phrase-level counts of one answer against its reference symptoms: as many one-to-one
    pairs of matching phrases as there can be (a maximum bipartite matching)."""
    from scipy.sparse import csr_array  # deferred: scipy's import is paid only when scoring
    from scipy.sparse.csgraph import maximum_bipartite_matching

    generated_phrases, reference_phrases = split_phrases(generated), split_phrases(reference)
    shape = len(generated_phrases), len(reference_phrases)
    pairs = np.array([[phrases_match(g, r) for r in reference_phrases]
                      for g in generated_phrases], dtype=bool).reshape(shape)
    matched = int((maximum_bipartite_matching(csr_array(pairs), perm_type="column") >= 0).sum())
    return SymptomScore(matched, *shape)


def score_words(generated: str, reference: str) -> SymptomScore:
    """Content-word counts of the whole answer against the whole reference (word F1)."""
    generated_words, reference_words = content_words(generated), content_words(reference)
    return SymptomScore(len(generated_words & reference_words), len(generated_words),
                        len(reference_words))


def references_by_disease(frame) -> dict[str, tuple[str, str]]:
    """Case-folded name -> (name, the union of its rows' symptoms)."""
    references: dict[str, tuple[str, list[str]]] = {}
    for name, symptoms in zip(frame["Name"], frame["Symptoms"], strict=True):
        shown, phrases = references.setdefault(name.casefold(), (name, []))
        phrases += [p.strip() for p in symptoms.split(",") if p.strip() not in phrases]
    return {key: (shown, ", ".join(phrases)) for key, (shown, phrases) in references.items()}


def constant_answer(train_frame, size: int = 5) -> str:
    """The ``size`` phrases most training rows list, as one answer."""
    counts: Counter[frozenset[str]] = Counter()
    shown: dict[frozenset[str], str] = {}
    for symptoms in train_frame["Symptoms"]:
        for raw in symptoms.split(","):
            if phrase := content_words(raw):
                shown.setdefault(phrase, " ".join(raw.casefold().split()))
        counts.update(set(split_phrases(symptoms)))
    return ", ".join(shown[phrase] for phrase, _ in counts.most_common(size))


def nearest_name_answers(train_frame, names: Sequence[str], fallback: str) -> list[str]:
    """For each name, the symptoms of the training disease whose name shares the most content
    words (ties: fewest extra words, first row), else ``fallback``; indexed by word (all pairs
    of a 20,000-row dataset: 18 s)."""
    first_rows: dict[frozenset[str], int] = {}
    for row, name in enumerate(train_frame["Name"]):
        first_rows.setdefault(content_words(name), row)
    rows_with: dict[str, list[int]] = defaultdict(list)
    for words, row in first_rows.items():
        for word in words:
            rows_with[word].append(row)
    word_count = {row: len(words) for words, row in first_rows.items()}
    train_symptoms = train_frame["Symptoms"].tolist()
    answers = []
    for name in names:
        shared = Counter(row for word in content_words(name) for row in rows_with.get(word, ()))
        best = max(shared, default=None, key=lambda row: (shared[row], -word_count[row], -row))
        answers.append(fallback if best is None else train_symptoms[best])
    return answers
