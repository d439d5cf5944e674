"""Disease text as words: content words in one form each, the comma-separated phrases of an
answer (the rules: medlm/README.md, "Is the model any good?")."""

import re
from collections.abc import Iterable

MATCH_SHARE = 2 / 3  # the shorter phrase has at least this share of the longer's words
STOPWORDS = frozenset("""
a an the and or nor but of in on at to into onto from by for with within as is are be
being been was were it its this that these those there their them they he she his her him
which who whom what when where while than then so such very can may might could would should
will also other some any all both each more most less due especially sometimes often usually
like eg ie etc per about around over under up down out off
""".split())
MODIFIERS = frozenset("""
severe mild moderate extreme persistent chronic frequent sudden excessive recurrent recurring
occasional constant intense significant slight
""".split())
_NOT_WORD = re.compile(r"[^\w]+")
_ES_STEMS = ("ch", "sh", "ss", "x", "z")  # whose plural is "-es"


def word_form(word: str) -> str:
    """Plural ``s``/``ies`` dropped, and an ``e`` after ch/sh/ss/x/z: "rashes", "rash" -> "rash";
    "headaches", "headache" -> "headach"."""
    if len(word) > 3 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    if len(word) > 3 and word.endswith("e") and word[:-1].endswith(_ES_STEMS):
        return word[:-1]
    return word


def content_words(text: str) -> frozenset[str]:
    """The words of ``text`` that carry meaning, in one form each."""
    ignored = STOPWORDS | MODIFIERS
    return frozenset(word_form(word) for word in _NOT_WORD.sub(" ", text.casefold()).split()
                     if word not in ignored and word_form(word) not in ignored
                     and not word.isdigit())


def worded_phrases(text: str) -> dict[frozenset[str], str]:
    """The distinct phrases of a comma-separated answer, in order: content words -> the first
    wording, its whitespace runs made single spaces."""
    phrases: dict[frozenset[str], str] = {}
    for raw in text.split(","):
        if words := content_words(raw):
            phrases.setdefault(words, " ".join(raw.split()))
    return phrases


def split_phrases(text: str) -> list[frozenset[str]]:
    """The distinct phrases of a comma-separated answer, each as its content words, in order."""
    return list(worded_phrases(text))


def phrases_match(generated: Iterable[str] | str, reference: Iterable[str] | str) -> bool:
    """Do two phrases (text or content words) name the same symptom?"""
    shorter, longer = sorted((content_words(phrase) if isinstance(phrase, str) else
                              frozenset(phrase) for phrase in (generated, reference)), key=len)
    return bool(shorter) and shorter <= longer and len(shorter) >= MATCH_SHARE * len(longer) - 1e-9
