"""Consensus decoding: the symptoms most sampled answers agree on, each once."""

import pytest

from medlm.generate import consensus_answer
from medlm.metrics import score_symptoms


def test_a_symptom_several_answers_name_is_kept_once_and_a_lone_one_is_dropped():
    samples = ["Fever, cough, rash", "fever, Cough, sore throat", "Cough, high fever, fever",
               "cough, fatigue"]
    answer = consensus_answer(samples)
    assert answer == "Cough, fever"  # cough in 4 of 4, fever in 3 of 4; the rest once each


def test_phrases_that_name_one_symptom_are_grouped_as_the_score_matches_them():
    samples = ["swelling of the legs, fatigue", "swelling in the legs and ankles",
               "leg swelling, nausea"]
    answer = consensus_answer(samples, min_votes=3)
    assert answer == "Swelling of the legs"
    # the kept phrase is one the score counts as the reference's symptom
    assert score_symptoms(answer, "Swelling of the legs and ankles, fatigue").matched == 1


def test_min_votes_decides_how_many_answers_must_agree():
    samples = ["a headache, nausea", "headache", "headache, vomiting", "nausea"]
    assert consensus_answer(samples, min_votes=3) == "Headache"
    assert consensus_answer(samples, min_votes=2) == "Headache, nausea"
    assert consensus_answer(samples, min_votes=1) == "Headache, nausea, vomiting"


def test_no_agreement_is_an_empty_answer_and_a_bad_count_an_error():
    assert consensus_answer(["cough", "rash", "fever"]) == ""
    assert consensus_answer([]) == ""
    with pytest.raises(ValueError, match="min_votes 0"):
        consensus_answer(["cough"], min_votes=0)


def test_consensus_answers_merge_the_greedy_answer_and_seeded_samples(tiny_model):
    from medlm.generate import SAMPLING, GenerationSettings, consensus_answers, generate

    tokenizer, model = tiny_model
    names = ["Asthma", "Kidney Failure"]
    merged = consensus_answers(model, tokenizer, names, voters=3, max_new_tokens=6, seed=1)
    assert merged == consensus_answers(model, tokenizer, names, voters=3, max_new_tokens=6,
                                       seed=1)  # repeatable
    greedy = generate(model, tokenizer, names, GenerationSettings(
        max_new_tokens=6, do_sample=False, repetition_penalty=1.0))
    samples = generate(model, tokenizer, names, GenerationSettings(
        max_new_tokens=6, num_return_sequences=2, seed=1, **SAMPLING))
    assert merged == [consensus_answer(own + rest) or own[0]
                      for own, rest in zip(greedy, samples, strict=True)]


def test_acronyms_keep_their_case():
    assert consensus_answer(["HIV infection, fever", "fever, HIV infection"]) == (
        "HIV infection, fever")
