"""The held-out diseases: names grouped so that no disease, and no variant of one, is on both
sides of the split; then a seeded split of the groups, or one fold of a cross-validation."""

from __future__ import annotations

import hashlib
import itertools
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
    forms = [tuple(word_form(w) for w in re.sub(r"[^\w]+", " ", part).split()
                   if w not in STOPWORDS or w in _HEAD_ENDS) for part in parts]
    return [form for form in forms if form]


def head_term(words: tuple[str, ...]) -> tuple[str, ...] | None:
    """The word a name is a kind of: its last word before a preposition ("type 1 diabetes" ->
    diabetes, "fracture of the arm" -> fracture), with the word before it when that word is
    generic ("chronic kidney disease" -> kidney disease); None for a lone generic word."""
    head = list(itertools.takewhile(lambda word: word not in _HEAD_ENDS, words))
    if not head or head[-1] in _GENERIC_HEADS and len(head) < 2:
        return None
    return tuple(head[-2:]) if head[-1] in _GENERIC_HEADS else (head[-1],)


def group_diseases(frame: pd.DataFrame) -> list[list[str]]:
    """Distinct (case-folded) names of ``frame`` in groups that must stay on one side of a
    split, in first-seen order: names that are the same, contain one another as whole words
    ("otitis media" / "acute otitis media"), share their head term ("type 1 diabetes" /
    "gestational diabetes"), or list the same symptoms ("Warthin tumor" / "Pleomorphic
    adenoma"); transitively."""
    keys = list(dict.fromkeys(frame["Name"].str.casefold()))
    index_of = {key: index for index, key in enumerate(keys)}
    owner: dict[tuple, int] = {}  # a name form, head term or symptom list -> first name with it
    edges = []  # pairs of names in one group
    forms = [[tuple(w for w in form if w not in _HEAD_ENDS) for form in name_forms(key)]
             for key in keys]
    for index, key in enumerate(keys):
        heads = [("head:", *head) for head in map(head_term, name_forms(key)) if head]
        edges += [(index, owner.setdefault(found, index)) for found in [*forms[index], *heads]]
    for name, symptoms in zip(frame["Name"].str.casefold(), frame["Symptoms"], strict=True):
        phrases = ("symptoms:", frozenset(split_phrases(symptoms)))
        edges.append((index_of[name], owner.setdefault(phrases, index_of[name])))
    # containment: any shorter whole-word run of a name's form
    edges += [(index, owner[run]) for index, key_forms in enumerate(forms) for form in key_forms
              for size in range(1, len(form)) for start in range(len(form) - size + 1)
              if (run := form[start:start + size]) in owner]
    from scipy.sparse import coo_matrix  # here: scipy costs every importer of scores ~0.5 s
    from scipy.sparse.csgraph import connected_components

    rows, columns = zip(*edges, strict=True)
    graph = coo_matrix((np.ones(len(edges)), (rows, columns)), shape=(len(keys), len(keys)))
    groups: dict[int, list[str]] = {}
    for key, group in zip(keys, connected_components(graph, directed=False)[1], strict=True):
        groups.setdefault(group, []).append(key)
    return list(groups.values())


@dataclass
class DiseaseSplit:
    """Training and validation rows, and how the names were grouped to keep them apart."""

    train: pd.DataFrame
    validation: pd.DataFrame
    groups: list[list[str]]  # every group of case-folded names, singletons included

    @classmethod
    def holding_out(cls, frame: pd.DataFrame, names: set[str],
                    groups: list[list[str]]) -> DiseaseSplit:
        """The rows of the case-folded ``names`` held out, the others trained on."""
        is_validation = frame["Name"].str.casefold().isin(names)
        return cls(frame[~is_validation].reset_index(drop=True),
                   frame[is_validation].reset_index(drop=True), groups)

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
        for rows, side in ((self.validation, "held out"), (self.train, "seen in training")):
            if name.casefold() in set(rows["Name"].str.casefold()):
                return side
        return "not in the dataset"


def split_by_disease(frame: pd.DataFrame, validation_fraction: float = 0.2, seed: int = 42,
                     source: str = "dataset") -> DiseaseSplit:
    """Seeded split of the name groups (``group_diseases``): shuffled, each group that still
    fits goes to validation, up to ``round(fraction * distinct names)`` names. Where none fits,
    the first smallest group goes; training always keeps at least one group."""
    distinct = frame["Name"].str.casefold().nunique()
    groups = group_diseases(frame)
    if len(groups) < 2:
        shown = ", ".join(groups[0][:4]) + (", ..." if len(groups[0]) > 4 else "")
        why = (f"{len(frame)} row(s) of 1 distinct disease name ({shown})" if distinct == 1 else
               f"its {distinct} distinct disease names ({shown}) form one group (names "
               "containing one another, a shared head term or identical symptoms)")
        raise MedLMError(f"cannot split {source!r}: {why}; expected at least 2 distinct disease "
                         "names that are not variants of one another (one for validation)")
    order = [groups[index] for index in np.random.default_rng(seed).permutation(len(groups))]
    target = max(1, round(validation_fraction * distinct))
    held_out: set[str] = set()
    for group in order:
        if len(held_out) + len(group) <= target:
            held_out.update(group)
    if not held_out:
        held_out.update(min(order, key=len))
    if len(held_out) == distinct:
        held_out.difference_update(max(order, key=len))
    return DiseaseSplit.holding_out(frame, held_out, groups)


def split_fold(frame: pd.DataFrame, folds: int, fold: int, seed: int = 42,
               source: str = "dataset") -> DiseaseSplit:
    """Fold ``fold`` of a ``folds``-fold cross-validation over the name groups: the groups
    shuffled by ``seed``, then, largest first, each to the fold with the fewest names so far,
    so the folds are as even as whole groups allow. Over the folds, every disease is held out
    once."""
    groups = group_diseases(frame)
    if len(groups) < folds:
        raise MedLMError(f"--folds {folds} is invalid for {source!r}: its distinct disease "
                         f"names form {len(groups)} groups: expected at most {len(groups)} "
                         "folds (one group or more held out in each)")
    sizes, held_out = [0] * folds, set()
    shuffled = np.random.default_rng(seed).permutation(len(groups))
    for index in sorted(shuffled, key=lambda index: -len(groups[index])):
        group_fold = min(range(folds), key=sizes.__getitem__)
        sizes[group_fold] += len(groups[index])
        if group_fold == fold:
            held_out.update(groups[index])
    return DiseaseSplit.holding_out(frame, held_out, groups)


def split_rows(frame: pd.DataFrame, validation_fraction: float, seed: int, folds: int = 0,
               fold: int | None = None, source: str = "dataset") -> DiseaseSplit:
    """A run's split: fold ``fold`` of ``folds`` where it has folds, else ``split_by_disease``."""
    if folds:
        if fold is None:
            raise ValueError(f"{folds} folds and no fold: expected the fold to hold out")
        return split_fold(frame, folds, fold, seed, source)
    return split_by_disease(frame, validation_fraction, seed, source)
