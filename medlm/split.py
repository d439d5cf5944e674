"""The held-out diseases: names grouped so that no disease, and no variant of one, is on both
sides of the split; then a seeded split of the groups, or one fold of a cross-validation."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from medlm.errors import MedLMError
from medlm.text import STOPWORDS, split_phrases, word_form

# A name's head ends before one of these ("abscess of the lung" -> "abscess").
_HEAD_ENDS = frozenset("of due after in to from with on for".split())
# Heads too generic to group by alone: "kidney disease", not "disease", is the head term.
_GENERIC_HEADS = frozenset(
    "disease disorder syndrome cancer infection deficiency poisoning injury use abuse pain "
    "condition effect reaction".split())
_PARENTHESES = re.compile(r"\(([^)]*)\)")


def name_forms(name: str) -> list[tuple[str, ...]]:
    """A disease name as word sequences: the name without its parentheses, and what they hold
    ("Urinary Stones (Kidney Stones)" -> urinary stone; kidney stone). Case-folded, stopwords
    dropped, plurals singular, a numbered variant's suffix dropped ("poisoning-2")."""
    text = name.casefold()
    parts = [re.sub(r"-\d+\s*$", "", _PARENTHESES.sub(" ", text).strip()),
             *_PARENTHESES.findall(text)]
    forms = []
    for part in parts:
        words = tuple(word_form(w) for w in re.sub(r"[^\w]+", " ", part).split()
                      if w not in STOPWORDS or w in _HEAD_ENDS)
        if words:
            forms.append(words)
    return forms


def head_term(words: tuple[str, ...]) -> tuple[str, ...] | None:
    """The word a name is a kind of: its last word before a preposition ("type 1 diabetes" ->
    diabetes, "fracture of the arm" -> fracture), with the word before it when that word is
    generic ("chronic kidney disease" -> kidney disease); None for a lone generic word."""
    head = []
    for word in words:
        if word in _HEAD_ENDS:
            break
        head.append(word)
    if not head:
        return None
    if head[-1] in _GENERIC_HEADS:
        return tuple(head[-2:]) if len(head) >= 2 else None
    return (head[-1],)


def group_diseases(frame: pd.DataFrame) -> list[list[str]]:
    """Distinct (case-folded) names of ``frame`` in groups that must stay on one side of a
    split: names that are the same, contain one another as whole words ("otitis media" / "acute
    otitis media", "rheumatoid arthritis" / "juvenile rheumatoid arthritis"), share their head
    term ("type 1 diabetes" / "gestational diabetes"), or list the same symptoms (the dataset
    has such pairs: "Warthin tumor" / "Pleomorphic adenoma"); transitively. Groups keep
    first-seen order."""
    keys = list(dict.fromkeys(frame["Name"].str.casefold()))
    index_of = {key: index for index, key in enumerate(keys)}
    parent = list(range(len(keys)))

    def root(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    def join(a: int, b: int) -> None:
        parent[max(root(a), root(b))] = min(root(a), root(b))

    owner: dict[tuple, int] = {}  # a name form, head term or symptom list -> first name with it
    forms = [[tuple(w for w in form if w not in _HEAD_ENDS) for form in name_forms(key)]
             for key in keys]
    for index, key in enumerate(keys):
        heads = [head_term(form) for form in name_forms(key)]
        for found in [*forms[index], *(("head:", *head) for head in heads if head)]:
            join(index, owner.setdefault(found, index))
    for name, symptoms in zip(frame["Name"], frame["Symptoms"], strict=True):
        phrases = ("symptoms:", frozenset(split_phrases(symptoms)))
        join(index_of[name.casefold()], owner.setdefault(phrases, index_of[name.casefold()]))
    for index, key_forms in enumerate(forms):  # containment: any shorter whole-word run
        for form in key_forms:
            for size in range(1, len(form)):
                for start in range(len(form) - size + 1):
                    found = owner.get(form[start:start + size])
                    if found is not None:
                        join(index, found)
    groups: dict[int, list[str]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(root(index), []).append(key)
    return list(groups.values())


@dataclass
class DiseaseSplit:
    """Training and validation rows, and how the names were grouped to keep them apart."""

    train: pd.DataFrame
    validation: pd.DataFrame
    groups: list[list[str]]  # every group of case-folded names, singletons included

    @property
    def grouped_names(self) -> int:
        """Distinct names that share a group with another name."""
        return sum(len(group) for group in self.groups if len(group) > 1)

    @property
    def validation_sha256(self) -> str:
        """Fingerprint of the validation diseases: runs with equal ones held out the same."""
        names = "\n".join(sorted(set(self.validation["Name"].str.casefold())))
        return hashlib.sha256(names.encode("utf-8")).hexdigest()

    def side(self, name: str) -> str:
        """"held out" (a validation disease), "seen in training", or "not in the dataset"."""
        key = name.casefold()
        if key in set(self.validation["Name"].str.casefold()):
            return "held out"
        if key in set(self.train["Name"].str.casefold()):
            return "seen in training"
        return "not in the dataset"


def split_by_disease(
    frame: pd.DataFrame, validation_fraction: float = 0.2, seed: int = 42,
    source: str = "dataset",
) -> DiseaseSplit:
    """Seeded split of the distinct disease names, so that no disease, and no variant of one
    (``group_diseases``), is on both sides.

    The groups are shuffled; in that order, each group that still fits goes to validation
    (first fit), up to ``round(fraction * distinct names)`` names. Where no group fits, the
    first smallest group in that order goes; training always keeps at least one group.
    """
    keys = frame["Name"].str.casefold()
    groups = group_diseases(frame)
    if len(groups) < 2:
        shown = ", ".join(groups[0][:4]) + (", ..." if len(groups[0]) > 4 else "")
        why = (f"{len(frame)} row(s) of 1 distinct disease name ({shown})"
               if keys.nunique() == 1 else
               f"its {keys.nunique()} distinct disease names ({shown}) form one group (names "
               "containing one another, a shared head term or identical symptoms)")
        raise MedLMError(f"cannot split {source!r}: {why}; expected at least 2 distinct disease "
                         "names that are not variants of one another (one for validation)")
    rng = np.random.default_rng(seed)
    order = [groups[index] for index in rng.permutation(len(groups))]
    target = max(1, round(validation_fraction * keys.nunique()))
    validation_keys: set[str] = set()
    for group in order:
        if len(validation_keys) + len(group) <= target:
            validation_keys.update(group)
    if not validation_keys:
        validation_keys.update(min(order, key=len))
    if len(validation_keys) == keys.nunique():
        validation_keys.difference_update(max(order, key=len))
    is_validation = keys.isin(validation_keys)
    return DiseaseSplit(frame[~is_validation].reset_index(drop=True),
                        frame[is_validation].reset_index(drop=True), groups)


def fold_of_groups(groups: list[list[str]], folds: int, seed: int) -> list[int]:
    """Each group's fold (0 to ``folds`` - 1): the groups shuffled by ``seed``, then, largest
    first, each to the fold with the fewest names so far (the first of those on a tie), so the
    folds are as even as whole groups allow."""
    sizes = [0] * folds
    fold_of = [0] * len(groups)
    shuffled = np.random.default_rng(seed).permutation(len(groups))
    for index in sorted(shuffled, key=lambda index: -len(groups[index])):
        fold = min(range(folds), key=sizes.__getitem__)
        fold_of[index] = fold
        sizes[fold] += len(groups[index])
    return fold_of


def split_fold(frame: pd.DataFrame, folds: int, fold: int, seed: int = 42,
               source: str = "dataset") -> DiseaseSplit:
    """Fold ``fold`` of a ``folds``-fold cross-validation over the name groups
    (``group_diseases``): its groups held out, the others trained on. Over the folds, every
    disease is held out once."""
    groups = group_diseases(frame)
    if len(groups) < folds:
        raise MedLMError(f"--folds {folds} is invalid for {source!r}: its distinct disease "
                         f"names form {len(groups)} groups: expected at most {len(groups)} "
                         "folds (one group or more held out in each)")
    held_out = {name for group, group_fold in zip(groups, fold_of_groups(groups, folds, seed),
                                                  strict=True)
                if group_fold == fold for name in group}
    is_validation = frame["Name"].str.casefold().isin(held_out)
    return DiseaseSplit(frame[~is_validation].reset_index(drop=True),
                        frame[is_validation].reset_index(drop=True), groups)


def split_rows(frame: pd.DataFrame, validation_fraction: float, seed: int, folds: int = 0,
               fold: int | None = None, source: str = "dataset") -> DiseaseSplit:
    """A run's split: fold ``fold`` of ``folds`` (``split_fold``) where it has folds, else
    ``split_by_disease``."""
    if folds:
        if fold is None:
            raise ValueError(f"a run of --folds {folds} holds out one fold: expected its fold")
        return split_fold(frame, folds, fold, seed, source)
    return split_by_disease(frame, validation_fraction, seed, source)
