import pytest

from medlm.config import TrainConfig
from medlm.errors import MedLMError


def test_defaults_keep_the_seed_notebooks_model_data_rate_and_batch():
    config = TrainConfig()
    assert (config.model, config.batch_size, config.lr) == ("distilgpt2", 8, 5e-4)
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
    ({"promote": True, "register": False}, "--promote with --no-register"),
    ({"select_by": "bleu"}, "--select-by 'bleu' is invalid"),
])
def test_contradictory_selection_and_registry_flags_are_refused(settings, expected):
    with pytest.raises(MedLMError, match=expected):
        TrainConfig(**settings)


def test_params_are_flat_strings_or_numbers():
    params = TrainConfig(sample_prompts=["Asthma", "Kidney Failure"]).to_params()
    assert params["sample_prompts"] == "Asthma; Kidney Failure"
    assert params["lr"] == 5e-4


def test_collective_timeout_reaches_the_process_group(monkeypatch):
    """--collective-timeout (minutes) is the timeout torchrun's processes wait at a collective;
    before, a hang was seen only after a fixed hour."""
    import datetime

    import torch
    import torch.distributed as dist

    from experiments.run import build_parser
    from medlm import distributed

    args = build_parser().parse_args(["--collective-timeout", "2.5"])
    assert args.collective_timeout_min == 2.5
    assert TrainConfig().collective_timeout_min == 15.0
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, **kwargs: calls.append((backend, kwargs["timeout"])))
    distributed.start(torch.device("cpu"), args.collective_timeout_min)
    assert calls == [("gloo", datetime.timedelta(minutes=2.5))]


@pytest.mark.parametrize("value", ["0", "-1", "inf"])
def test_collective_timeout_must_be_positive_minutes(value):
    from experiments.run import build_parser, configs_from_args

    with pytest.raises(MedLMError, match="--collective-timeout .* is invalid: expected a "
                                         "number of minutes > 0"):
        configs_from_args(build_parser().parse_args(["--collective-timeout", value]))


def test_a_value_is_refused_in_the_same_words_from_a_flag_a_sweep_a_recipe_or_code(tmp_path):
    """One check, TrainConfig's, whichever way a value comes in."""
    from experiments.run import build_parser, configs_from_args

    recipe = tmp_path / "bad.toml"
    recipe.write_text("lr = -0.001\n")
    for flags in (["--lr", "-1e-3"], ["--lr", "1e-3", "-1e-3"], ["--config", str(recipe)]):
        with pytest.raises(MedLMError) as error:
            configs_from_args(build_parser().parse_args(flags))
        assert str(error.value) == "--lr -0.001 is invalid: expected a number > 0"
    with pytest.raises(MedLMError, match="^--lr -0.001 is invalid: expected a number > 0$"):
        TrainConfig(lr=-1e-3)
