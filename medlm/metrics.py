"""Does a generated answer name the disease's symptoms? Two scores, and the answers that need no
model, so a score is never read alone.

**Symptom F1** (phrase level). Both texts are split into comma-separated phrases. A phrase is
reduced to its *content words*: case-folded, punctuation dropped, a plural ``s`` dropped
("legs" -> "leg"), and ``STOPWORDS`` (function words such as "in", "the", "of", "and"),
``MODIFIERS`` (intensity and timing words such as "severe", "persistent") and plain numbers left
out. Phrases with
no content word are ignored; phrases with the same content words count once. A generated phrase
*matches* a reference phrase when the content words of one include all those of the other, and
the shorter has at least two thirds as many as the longer:

- "swelling in the legs" matches "swelling of the legs and ankles" (2 of 3),
- "chest pain" matches "pain in the chest" and "severe chest pain" (2 of 2),
- "back pain" does not match "chest pain", nor "low blood pressure" "high blood pressure": a
  word of each is missing from the other; "in the" is no phrase at all,
- "fever" does not match "high fever" and "nausea" does not match "nausea and vomiting" (1 of 2):
  a generic half of a symptom is not the symptom.

Matches pair one generated phrase with one reference phrase (a maximum matching), so repeating
a right phrase earns nothing. Precision = matched / generated phrases, recall = matched /
reference phrases; ``micro_average`` sums the counts over diseases before dividing.

**Word F1** (whole answer). The set of content words of the whole answer against that of the
reference: no phrase splitting or pairing, so a quirk of one metric cannot decide alone.

**Baselines**: ``constant_answer`` (the most frequent training phrases, for every disease) and
``nearest_name_answers`` (the symptoms of the training disease whose name shares the most
words). A model that has learnt something scores above both, on diseases it never saw.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from medlm.text import content_words, phrases_match, split_phrases

# bump when a change to the rules makes old scores incomparable; 3: a run's answers are decoded
# under its bf16 autocast (where it trains in bf16), all validation names in one batch;
# 4: "-es" plurals meet their singulars ("rashes" / "rash")
METRIC_VERSION = "4"
# Greedy answers for scoring: no repetition penalty. The seed's 1.2 penalises every token
# already written, commas included, which is the separator the metric splits on (experiments/
# RESULTS.md, "Repetition penalty of the scored answers", has the measurement).
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


def _maximum_matching(edges: list[list[int]], right_size: int) -> int:
    """Size of a maximum bipartite matching (Kuhn's augmenting paths; answers are short)."""
    owner = [-1] * right_size

    def augment(left: int, seen: set[int]) -> bool:
        for right in edges[left]:
            if right not in seen:
                seen.add(right)
                if owner[right] == -1 or augment(owner[right], seen):
                    owner[right] = left
                    return True
        return False

    return sum(augment(left, set()) for left in range(len(edges)))


def score_symptoms(generated: str, reference: str) -> SymptomScore:
    """Phrase-level counts of one answer against its reference symptoms."""
    generated_phrases, reference_phrases = split_phrases(generated), split_phrases(reference)
    edges = [[j for j, r in enumerate(reference_phrases) if phrases_match(g, r)]
             for g in generated_phrases]
    matched = _maximum_matching(edges, len(reference_phrases))
    return SymptomScore(matched, len(generated_phrases), len(reference_phrases))


def score_words(generated: str, reference: str) -> SymptomScore:
    """Content-word counts of the whole answer against the whole reference (word F1)."""
    generated_words, reference_words = content_words(generated), content_words(reference)
    return SymptomScore(len(generated_words & reference_words), len(generated_words),
                        len(reference_words))


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


def constant_answer(train_frame, size: int = 5) -> str:
    """The ``size`` phrases most training diseases list (a phrase counts once per row), as one
    answer: what a model that ignores the disease name would best say."""
    counts: Counter[frozenset[str]] = Counter()
    shown: dict[frozenset[str], str] = {}
    for symptoms in train_frame["Symptoms"]:
        for raw in symptoms.split(","):
            phrase = content_words(raw)
            if phrase:
                shown.setdefault(phrase, " ".join(raw.casefold().split()))
        counts.update(set(split_phrases(symptoms)))
    return ", ".join(shown[phrase] for phrase, _ in counts.most_common(size))


def nearest_name_answers(train_frame, names: Sequence[str], fallback: str) -> list[str]:
    """For each name, the symptoms of the training disease whose name shares the most content
    words (ties: the fewest extra words, then the first row); ``fallback`` where none shares
    a word. No model: what a lookup table by name scores.

    An index from each content word to the training names that hold it means only names
    sharing a word are scored: comparing every pair took 18 s of a 20,000-row start-up. Equal
    word sets are indexed once, by their first row, which wins their ties anyway.
    """
    first_rows: dict[frozenset[str], int] = {}
    for row, name in enumerate(train_frame["Name"]):
        first_rows.setdefault(content_words(name), row)
    rows_with: dict[str, list[int]] = defaultdict(list)
    word_count: dict[int, int] = {}
    for words, row in first_rows.items():
        word_count[row] = len(words)
        for word in words:
            rows_with[word].append(row)
    train_symptoms = train_frame["Symptoms"].tolist()
    answers = []
    for name in names:
        shared = Counter(row for word in content_words(name) for row in rows_with.get(word, ()))
        best = max(shared, default=None,
                   key=lambda row: (shared[row], -word_count[row], -row))
        answers.append(fallback if best is None else train_symptoms[best])
    return answers
