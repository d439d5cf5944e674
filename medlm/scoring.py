"""A model's held-out score: its greedy answers for every validation disease
(``medlm.generate``), scored by ``medlm.metrics``."""

from __future__ import annotations

from medlm.generate import GenerationSettings, generate
from medlm.heldout import score_answers
from medlm.metrics import SCORING_REPETITION_PENALTY, references_by_disease


def evaluate_symptoms(model, tokenizer, frame, max_new_tokens: int = 40, *,
                      repetition_penalty: float = SCORING_REPETITION_PENALTY,
                      num_beams: int = 1):
    """Greedy-decode (or, with ``num_beams`` > 1, beam-search) every distinct disease of
    ``frame`` and score it against its symptoms.

    The names go to ``generate`` together, which decodes them in as few batches as its bound
    allows: a decoding step of SmolLM2-135M costs a fixed ~70 ms plus ~2.5 ms per sequence
    (2-core AVX512-BF16 CPU, fp32), so 40 names take 6.9 s in one batch against 11.8 s in
    batches of 16, and 78 names 10.2 s in one against 13.6 s in two.

    Returns (per-disease table as a DataFrame, micro-averaged ``AnswerScores``).
    """
    names = [name for name, _ in references_by_disease(frame).values()]
    settings = GenerationSettings(max_new_tokens=max_new_tokens, do_sample=False,
                                  repetition_penalty=repetition_penalty, num_beams=num_beams)
    answers = [texts[0] for texts in generate(model, tokenizer, names, settings)]
    return score_answers(answers, frame)
