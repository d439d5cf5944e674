import logging
import re

import pandas as pd
import pytest
import torch

from medlm.errors import MedLMError
from medlm.generate import GenerationSettings, generate


def test_one_list_of_completions_per_disease(tiny_model):
    tokenizer, model = tiny_model
    settings = GenerationSettings(max_new_tokens=6, num_return_sequences=3)
    completions = generate(model, tokenizer, ["Kidney Failure", "Asthma"], settings)
    assert len(completions) == 2 and all(len(texts) == 3 for texts in completions)
    assert all(isinstance(text, str) for texts in completions for text in texts)


def test_seeded_sampling_repeats_and_leaves_the_global_rng_alone(tiny_model):
    tokenizer, model = tiny_model
    settings = GenerationSettings(max_new_tokens=12, seed=3)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = generate(model, tokenizer, ["Kidney Failure"], settings)
    assert torch.rand(1) == expected_next
    assert generate(model, tokenizer, ["Kidney Failure"], settings) == first


def test_batched_prompts_match_single_prompts_under_greedy_decoding(tiny_model):
    tokenizer, model = tiny_model
    greedy = GenerationSettings(max_new_tokens=8, do_sample=False)
    together = generate(model, tokenizer, ["Flu", "Chronic kidney disease"], greedy)
    alone = [generate(model, tokenizer, [name], greedy)[0]
             for name in ("Flu", "Chronic kidney disease")]
    assert together == alone


def test_many_names_and_completions_are_written_a_bounded_batch_at_a_time(tiny_model,
                                                                        monkeypatch):
    """Before, every name times every completion went to the model in one batch: memory grew
    with both. Greedy answers are the same whatever the batch; each name still gets all its
    completions."""
    import medlm.generate

    tokenizer, model = tiny_model
    names = ["Flu", "Asthma", "Chronic kidney disease", "Gout", "Kidney Failure"]
    greedy = GenerationSettings(max_new_tokens=6, do_sample=False)
    whole = generate(model, tokenizer, names, greedy)
    batch_sizes = []
    model_generate = model.generate

    def recorded(**kwargs):
        batch_sizes.append(kwargs["input_ids"].shape[0]
                           * kwargs["generation_config"].num_return_sequences)
        return model_generate(**kwargs)

    monkeypatch.setattr(model, "generate", recorded)
    monkeypatch.setattr(medlm.generate, "MAX_BATCH_SEQUENCES", 2)
    assert generate(model, tokenizer, names, greedy) == whole
    assert batch_sizes == [2, 2, 1]
    batch_sizes.clear()
    sampled = GenerationSettings(max_new_tokens=6, num_return_sequences=2)
    completions = generate(model, tokenizer, names, sampled)
    assert batch_sizes == [2] * 5 and [len(texts) for texts in completions] == [2] * 5
    assert generate(model, tokenizer, names, sampled) == completions  # still repeatable
    batch_sizes.clear()
    many = GenerationSettings(max_new_tokens=4, num_return_sequences=3)
    assert [len(texts) for texts in generate(model, tokenizer, names[:2], many)] == [3, 3]
    assert batch_sizes == [2, 1, 2, 1]  # one name's completions in parts


def test_generation_config_carries_the_seed_notebooks_sampling(gpt2_tokenizer):
    config = GenerationSettings().to_generation_config(gpt2_tokenizer)
    assert (config.do_sample, config.top_k, config.top_p, config.temperature,
            config.repetition_penalty, config.max_new_tokens) == (True, 8, 0.95, 0.5, 1.2, 40)
    assert config.pad_token_id == gpt2_tokenizer.eos_token_id


@pytest.mark.parametrize("device_type", ["mps", "cuda"])
def test_sampling_forks_the_accelerators_generator_too(monkeypatch, device_type):
    """On MPS as on CUDA, generation's seeding must not touch the device generator training's
    dropout uses: its state is saved and restored around sampling."""
    import torch

    from medlm.generate import forked_rng

    module = getattr(torch, device_type)
    calls = []
    monkeypatch.setattr(module, "get_rng_state",
                        lambda device=None: calls.append("get") or torch.zeros(1))
    monkeypatch.setattr(module, "set_rng_state",
                        lambda state, device=None: calls.append("set"))
    with forked_rng(torch.device(device_type)):
        calls.append("sample")
    assert calls == ["get", "sample", "set"]


LONG_NAME = "Hereditary " + " ".join(f"Zorbulan{index} Quixatic" for index in range(60))


def test_generate_names_the_disease_too_long_for_the_context(tiny_model):
    """Before: "a prompt of N tokens does not fit", which left the user to find the name."""
    tokenizer, model = tiny_model
    with pytest.raises(MedLMError, match=re.escape(LONG_NAME[:40])) as error:
        generate(model, tokenizer, ["Flu", LONG_NAME], GenerationSettings(max_new_tokens=4))
    assert "context of 256 tokens" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("scoring", [True, False])
@pytest.mark.parametrize("folds", [0, 5])
def test_a_name_too_long_for_the_answer_is_dropped_on_both_sides_with_a_warning(
        tiny_model_dir, dataset_csv, tmp_path, caplog, folds, scoring):
    """Before: held out (always so over --folds), the name stopped the run with a message that
    named no disease; in training, the row was truncated to its name, every symptom cut. A run
    that writes no answers drops it too: experiments.evaluate re-creates the same split."""
    from medlm.config import TrainConfig
    from medlm.recipe import Run

    path = tmp_path / "diseases.csv"
    rows = pd.read_csv(dataset_csv, dtype=str)
    rows.loc[len(rows)] = {"Name": LONG_NAME, "Symptoms": "Fever, cough"}
    rows.to_csv(path, index=False)
    config = TrainConfig.from_recipe(
        "default", model=str(tiny_model_dir), dataset=str(path), system_metrics=False,
        folds=folds, fold=0 if folds else None, max_new_tokens=40, symptom_eval=scoring,
        num_validation_samples=3 if scoring else 0)
    with caplog.at_level(logging.WARNING):
        prepared = Run(config).setup()
    names = {*prepared.split.train["Name"], *prepared.split.validation["Name"]}
    assert LONG_NAME not in names and len(names) == rows["Name"].nunique() - 1
    assert prepared.data.dropped_rows == 1 and len(prepared.data.frame) == 400
    assert LONG_NAME[:40] in caplog.text and "--max-new-tokens 40" in caplog.text


def test_a_sample_prompt_too_long_for_the_context_is_named(tiny_model_dir, dataset_csv):
    from medlm.config import TrainConfig
    from medlm.recipe import Run

    config = TrainConfig.from_recipe(
        "default", model=str(tiny_model_dir), dataset=str(dataset_csv), system_metrics=False,
        sample_prompts=["Flu", LONG_NAME + LONG_NAME])
    with pytest.raises(MedLMError, match=re.escape(LONG_NAME[:40])):
        Run(config).setup()


def test_generate_help_offers_the_precision_evaluate_decodes_in():
    from experiments import evaluate, generate

    def precision_flag(parser):
        (action,) = [action for action in parser._actions if "--precision" in action.option_strings]
        return action.choices, action.default, action.help

    assert "--precision {auto,fp32,bf16}" in generate.build_parser().format_help()
    assert precision_flag(generate.build_parser()) == precision_flag(evaluate.build_parser())
