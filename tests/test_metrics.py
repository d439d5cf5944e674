import pandas as pd
import pytest

from medlm.metrics import (
    SymptomScore,
    micro_average,
    phrase_f1,
    references_by_disease,
    score_symptoms,
    split_phrases,
)


def test_phrases_are_normalised_and_deduplicated():
    assert split_phrases(" Fatigue,  SWELLING of the legs., fatigue,, (fever)") == [
        "fatigue", "swelling of the legs", "fever"]


def test_phrase_similarity_is_word_overlap_f1():
    assert phrase_f1("fatigue", "fatigue") == 1.0
    assert phrase_f1("fever", "chest pain") == 0.0
    assert phrase_f1("swelling in the legs", "swelling of the legs and ankles") == pytest.approx(
        2 * (3 / 4) * (3 / 6) / (3 / 4 + 3 / 6))


def test_a_perfect_answer_scores_one():
    score = score_symptoms("Fatigue, Nausea, Chest pain", "fatigue, nausea, chest pain")
    assert (score.precision, score.recall, score.f1) == (1.0, 1.0, 1.0)


def test_a_wrong_answer_scores_zero():
    score = score_symptoms("Rash, Itching", "Fatigue, Nausea")
    assert (score.precision, score.recall, score.f1) == (0.0, 0.0, 0.0)


def test_half_right_answer():
    # two of four generated phrases are right; two of three reference phrases are found
    score = score_symptoms("fatigue, nausea, rash, itching", "fatigue, nausea, chest pain")
    assert score == SymptomScore(matched=2, generated=4, reference=3)
    assert score.precision == 0.5 and score.recall == pytest.approx(2 / 3)
    assert score.f1 == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))


def test_repeating_a_right_phrase_earns_nothing_more():
    score = score_symptoms("fatigue, extreme fatigue, fatigue and tiredness", "fatigue, nausea")
    assert score.matched == 1 and score.recall == 0.5


def test_near_phrasings_match():
    score = score_symptoms("swelling in the legs", "Swelling of the legs and ankles")
    assert score.matched == 1


def test_empty_generation_scores_zero_without_dividing_by_zero():
    assert score_symptoms("", "fatigue").f1 == 0.0


def test_micro_average_sums_counts_before_dividing():
    overall = micro_average([SymptomScore(1, 1, 1), SymptomScore(0, 9, 9)])
    assert overall.precision == 0.1 and overall.recall == 0.1  # macro would say 0.5


def test_a_disease_listed_twice_is_scored_against_both_symptom_lists():
    frame = pd.DataFrame({"Name": ["Sciatica", "sciatica", "Flu"],
                          "Symptoms": ["Back pain, Numbness", "Back pain, Tingling", "Fever"]})
    references = references_by_disease(frame)
    assert references["sciatica"] == ("Sciatica", "Back pain, Numbness, Tingling")
    assert len(references) == 2
