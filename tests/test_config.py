import pytest

from medlm.config import TrainConfig
from medlm.errors import MedLMError


def test_defaults_are_the_seed_notebooks():
    config = TrainConfig()
    assert (config.model, config.batch_size, config.lr, config.epochs) == ("distilgpt2", 8,
                                                                           5e-4, 10)
    assert config.dataset == "QuyenAnhDE/Diseases_Symptoms"
    assert config.sample_prompts == ["Kidney Failure"]


@pytest.mark.parametrize("field,value,flag", [
    ("lr", -1e-4, "--lr"), ("lr", 0.0, "--lr"), ("lr", float("nan"), "--lr"),
    ("batch_size", 0, "--batch-size"), ("epochs", -3, "--epochs"),
    ("grad_accum", 0, "--grad-accum"), ("scheduler", "step", "--scheduler"),
    ("precision", "int8", "--precision"), ("validation_fraction", 1.0, "--validation-fraction"),
])
def test_invalid_values_name_the_flag_and_the_value(field, value, flag):
    with pytest.raises(MedLMError) as error:
        TrainConfig(**{field: value})
    message = str(error.value)
    assert flag in message and repr(value) in message and "expected" in message
    assert "\n" not in message


@pytest.mark.parametrize("settings,expected", [
    ({"select_by": "symptom_f1", "symptom_eval": False}, "--select-by symptom_f1 needs"),
    ({"promote": True, "register": False}, "--promote with --no-register is invalid"),
    ({"select_by": "bleu"}, "--select-by 'bleu' is invalid"),
])
def test_contradictory_selection_and_registry_flags_are_refused(settings, expected):
    with pytest.raises(MedLMError, match=expected):
        TrainConfig(**settings)


def test_params_are_flat_strings_or_numbers():
    params = TrainConfig(sample_prompts=["Asthma", "Kidney Failure"]).to_params()
    assert params["sample_prompts"] == "Asthma; Kidney Failure"
    assert params["lr"] == 5e-4
