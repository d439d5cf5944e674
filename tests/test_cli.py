"""End to end, as a user runs it: the CLIs as subprocesses (most refusals, and commands repeated
only to compare, in this process), on the real dataset and a tiny random GPT-2 with the real
GPT-2 tokenizer, with MLflow's default store in a fresh directory; the trained champion served
by `mlflow models serve`."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from experiments._cli import run_cli
from medlm.config import TrainConfig
from tests.conftest import background_server, free_port, run_module, write_hub_cache
from tests.test_bad_input import refused

pytestmark = pytest.mark.slow
EPOCHS = 2
METRICS = ["training_loss", "validation_loss", "validation_perplexity", "epoch_duration_sec",
           "train_samples_per_sec", "train_tokens_per_sec", "learning_rate"]
SCORES = ["symptom_precision", "symptom_recall", "symptom_f1", "word_f1"]  # epoch 0: untuned


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("user")


@pytest.fixture(scope="module")
def no_uri_env():
    """The user's environment without MLFLOW_TRACKING_URI, so MLflow's default applies."""
    return {"MLFLOW_TRACKING_URI": ""}


@pytest.fixture(scope="module")
def trained(workdir, tiny_model_dir, dataset_csv, no_uri_env):
    result = run_module("experiments.run", "--model", str(tiny_model_dir), "--dataset",
                        str(dataset_csv), "--max-samples", "60", "--epochs", str(EPOCHS),
                        "--lr", "3e-3", "--run-name", "e2e", "--score-every-epoch", cwd=workdir,
                        env_extra=no_uri_env)
    assert result.returncode == 0, result.stderr
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("medlm")
    (run,) = client.search_runs([experiment.experiment_id])
    return result, client, run


def test_run_finishes_in_the_default_store_with_every_metric_every_epoch(trained, workdir):
    result, client, run = trained
    assert (workdir / "mlflow.db").is_file() and (workdir / "mlruns").is_dir()
    assert run.info.status == "FINISHED" and run.info.run_name == "e2e"
    for metric in METRICS:
        history = client.get_metric_history(run.info.run_id, metric)
        assert sorted(point.step for point in history) == list(range(1, EPOCHS + 1)), metric
    for metric in SCORES:
        history = client.get_metric_history(run.info.run_id, metric)
        assert sorted(point.step for point in history) == list(range(EPOCHS + 1)), metric
    losses = {p.step: p.value for p in client.get_metric_history(run.info.run_id,
                                                                 "training_loss")}
    assert losses[2] < losses[1]
    assert "epoch 2: training loss" in result.stderr


def test_the_run_says_where_its_wall_time_went(trained, workdir):
    """Every phase's seconds, per epoch and in all, adding up to the run's wall time, which
    starts with the process (the interpreter and the imports count as start-up)."""
    from medlm.timing import PHASES

    result, client, run = trained
    metrics, run_id = run.data.metrics, run.info.run_id
    total = {name: metrics[f"time_total/{name}_sec"] for name in (*PHASES, "other")}
    assert sum(total.values()) == pytest.approx(metrics["time_total/wall_sec"], rel=1e-6)
    assert all(total[name] > 0 for name in PHASES), total
    assert total["startup"] > 0.5  # python, torch and transformers are not imported in 0.5 s
    assert metrics["time_total/non_training_fraction"] == pytest.approx(
        1 - total["training"] / metrics["time_total/wall_sec"])
    for name in ("training", "validation", "scoring", "samples", "checkpoint", "wall"):
        history = client.get_metric_history(run_id, f"time/{name}_sec")
        assert sorted(point.step for point in history) == list(range(EPOCHS + 1)), name
        assert all(point.value > 0 for point in history if point.step > 0), name
    startup = {point.step: point.value
               for point in client.get_metric_history(run_id, "time/startup_sec")}
    assert startup == {0: pytest.approx(total["startup"]), 1: 0, 2: 0}
    table = pd.read_json(client.download_artifacts(run_id, "time_split.json",
                                                   str(workdir / "time")), orient="split")
    assert "training" in set(table["phase"]) and table["percent"].sum() == pytest.approx(
        200, abs=1)  # the phases and the wall itself (100%)
    (line,) = [line for line in result.stderr.splitlines() if "time: " in line]
    assert "s in all: " in line and "training" in line and "not training" in line


def test_baselines_and_the_untuned_base_are_logged_and_shown_beside_every_epoch(trained):
    result, client, run = trained
    metrics = run.data.metrics
    for name in ("constant", "lookup"):
        assert 0 <= metrics[f"baseline_{name}_symptom_f1"] <= 1
        assert 0 <= metrics[f"baseline_{name}_word_f1"] <= 1
        assert f"baseline {name} (no model): symptom F1" in result.stderr
    untuned = [p for p in client.get_metric_history(run.info.run_id, "symptom_f1") if p.step == 0]
    assert metrics["untuned_symptom_f1"] == untuned[0].value
    # (an earlier test of this session may have run this tiny base on this split already)
    assert re.search(r"epoch 0 \(untuned base(, answers kept from an earlier run)?\): "
                     r"symptom F1", result.stderr)
    best = {score: max(("constant", "lookup"),
                       key=lambda name, score=score: metrics[f"baseline_{name}_{score}"])
            for score in ("symptom_f1", "word_f1")}
    epoch_lines = [line for line in result.stderr.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == EPOCHS + 1
    symptom, word = best["symptom_f1"], best["word_f1"]
    shown = (f"no model {metrics['baseline_' + symptom + '_symptom_f1']:.3f} ({symptom})/"
             f"{metrics['baseline_' + word + '_word_f1']:.3f} ({word})")
    assert all(shown in line for line in epoch_lines)
    summary = next(line for line in result.stderr.splitlines() if line.startswith("best epoch"))
    assert shown in summary and "untuned" in summary and "held-out diseases" in summary
    assert "names grouped with a variant" in result.stderr
    assert int(run.data.params["split_grouped_names"]) > 0


def test_params_describe_config_data_hardware_and_libraries(trained):
    _, _, run = trained
    params = run.data.params
    assert params["lr"] == "0.003" and params["batch_size"] == "8"
    assert params["epochs"] == str(EPOCHS)
    assert int(params["num_parameters"]) > 0
    assert params["rows_train"] != "0" and int(params["rows_train"]) + int(
        params["rows_validation"]) == 60
    assert len(params["dataset_content_sha256"]) == 64
    assert params["device_type"] == "cpu" and params["precision_effective"] in ("fp32", "bf16")
    assert {"torch_version", "transformers_version", "mlflow_version"} <= set(params)


def test_samples_results_and_plot_are_logged(trained, workdir, dataset_csv, tiny_model_dir):
    _, client, run = trained
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"samples.json", "results.csv", "loss_curve.png", "symptom_scores.json",
            "recipe.toml"} <= artifacts
    local = Path(client.download_artifacts(run.info.run_id, "", str(workdir / "dl")))
    # the run's settings as a recipe (the flags that change its math, not its run name):
    # --config with it trains them again
    again = TrainConfig.from_recipe(str(local / "recipe.toml"))
    assert (again.model, again.dataset, again.max_samples, again.epochs, again.lr,
            again.score_every_epoch, again.run_name) == (
        str(tiny_model_dir), str(dataset_csv), 60, EPOCHS, 3e-3, True, None)
    table = json.loads((local / "samples.json").read_text())
    samples = pd.DataFrame(table["data"], columns=table["columns"])
    assert sorted(samples["epoch"].unique()) == list(range(1, EPOCHS + 1))
    assert (samples["prompt"] == "Kidney Failure").sum() == EPOCHS
    assert len(samples) == 3 * EPOCHS  # Kidney Failure + the first two validation diseases
    validation_rows = samples[samples["prompt"] != "Kidney Failure"]
    assert (validation_rows["reference"] != "").all()
    assert (validation_rows["split"] == "held out").all()
    # Kidney Failure is row 220 of the dataset: not among these 60 rows, and labelled so.
    assert set(samples.loc[samples["prompt"] == "Kidney Failure", "split"]) == {
        "not in the dataset"}
    results = pd.read_csv(local / "results.csv")
    assert list(results.columns) == ["epoch", "transformer", "batch_size", "gpu",
                                     "training_loss", "validation_loss", "epoch_duration_sec"]
    assert results["epoch"].tolist() == list(range(1, EPOCHS + 1))
    assert (local / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    table = json.loads((local / "symptom_scores.json").read_text())
    scores = pd.DataFrame(table["data"], columns=table["columns"])
    from medlm.data import load_disease_data
    from medlm.split import split_by_disease

    validation = split_by_disease(load_disease_data(str(dataset_csv), 60).frame, 0.2, 42).validation
    assert len(scores) == (EPOCHS + 1) * validation["Name"].str.casefold().nunique()
    assert sorted(scores["epoch"].unique()) == list(range(EPOCHS + 1))
    assert {"baselines.json"} <= artifacts
    assert {"disease", "symptom_f1", "generated", "reference"} <= set(scores.columns)
    assert scores["symptom_f1"].between(0, 1).all()


def test_best_model_is_registered_as_champion_with_safetensors(trained, workdir):
    result, client, run = trained
    version = client.get_model_version_by_alias("medlm", "champion")
    assert version.run_id == run.info.run_id
    assert float(version.tags["validation_loss"]) == pytest.approx(
        min(p.value for p in client.get_metric_history(run.info.run_id, "validation_loss")))
    key = json.loads(version.tags["evaluation_key_json"])
    assert key["max_samples"] == "60" and key["seed"] == "42"
    assert key["dataset_content_sha256"] == run.data.params["dataset_content_sha256"]
    assert len(version.tags["evaluation_key"]) == 16 and version.tags["select_by"] == (
        "validation_loss")
    assert "first champion" in result.stderr
    model_dir = workdir / "mlruns"  # MLflow's default artifact root beside mlflow.db
    assert list(model_dir.rglob("*.safetensors"))
    assert not list(model_dir.rglob("*.bin")) and not list(model_dir.rglob("*.pt"))
    requirements = next(model_dir.rglob("requirements.txt")).read_text()
    assert "torch==" in requirements and "transformers==" in requirements


def test_generate_loads_the_champion_and_prints_completions(trained, workdir, no_uri_env):
    result = run_module("experiments.generate", "Kidney Failure", "Asthma",
                        "--max-new-tokens", "8", cwd=workdir, env_extra=no_uri_env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("Kidney Failure | ") and lines[1].startswith("Asthma | ")


@pytest.fixture
def in_workdir(workdir, monkeypatch):
    """This process in the trained run's directory, as a command started there: its
    ./mlflow.db. In-process, a command costs no interpreter start and imports."""
    import mlflow

    monkeypatch.chdir(workdir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    mlflow.set_tracking_uri(None)
    yield
    mlflow.set_tracking_uri(None)


def generated(argv, capsys) -> str:
    """What ``experiments.generate ARGV`` prints, run in this process."""
    from experiments import generate
    from experiments._cli import run_cli

    status = run_cli(generate.main, argv)
    printed = capsys.readouterr()
    assert status == 0, printed.err
    return printed.out


def test_generate_accepts_versions_run_uris_and_is_repeatable(trained, workdir, no_uri_env,
                                                              in_workdir, capsys):
    _, _, run = trained
    args = ["Kidney Failure", "--max-new-tokens", "8", "--num-return-sequences", "2",
            "--seed", "5"]
    by_version = run_module("experiments.generate", *args, "--model-uri", "1", cwd=workdir,
                            env_extra=no_uri_env)
    assert by_version.returncode == 0, by_version.stderr
    assert by_version.stdout.startswith("[1] Kidney Failure | ")
    assert "[2] Kidney Failure | " in by_version.stdout
    # the run's URI, and MLflow's own spellings: the newest version, and MLflow 3's
    # logged-model id (both were "no registered model" errors before); the same answers in
    # this process as in the command's own
    (logged,) = [model for model in
                 client_of(workdir).search_logged_models([run.info.experiment_id])
                 if model.source_run_id == run.info.run_id]
    for uri in (f"runs:/{run.info.run_id}/model", "models:/medlm/latest",
                f"models:/{logged.model_id}"):
        assert generated([*args, "--model-uri", uri], capsys) == by_version.stdout, uri


def client_of(workdir):
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_unknown_alias_is_one_line_listing_what_exists(trained, workdir, no_uri_env):
    result = run_module("experiments.generate", "Asthma", "--model-uri", "models:/medlm@best",
                        cwd=workdir, env_extra=no_uri_env)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "@champion -> 1" in result.stderr and "Traceback" not in result.stderr


def test_consensus_answers_are_one_per_disease_and_scored_beside_the_baselines(
        trained, workdir, no_uri_env):
    written = run_module("experiments.generate", "Asthma", "Kidney Failure", "--consensus", "3",
                         "--max-new-tokens", "6", cwd=workdir, env_extra=no_uri_env)
    assert written.returncode == 0, written.stderr
    lines = written.stdout.strip().splitlines()
    assert [line.split(" |")[0] for line in lines] == ["Asthma", "Kidney Failure"]
    scored = run_module("experiments.evaluate", "--consensus", "3", "--max-new-tokens", "6",
                        cwd=workdir, env_extra=no_uri_env)
    assert scored.returncode == 0, scored.stderr
    assert "consensus of 3 answers in " in scored.stdout
    assert "baseline: lookup (no model)" in scored.stdout
    assert "untuned base" not in scored.stdout  # the run's greedy epoch 0 is not comparable


def test_mlflow_models_serve_answers_disease_names_with_their_symptoms(trained, workdir,
                                                                       in_workdir, capsys):
    """The champion as MLflow serves it (`mlflow models serve` on 127.0.0.1), sent disease
    names over HTTP: it answers with symptoms, as `experiments.generate --greedy --precision
    fp32` writes them (MLflow serves in fp32, outside autocast).
    Before, it got the bare name, without the " |" it was trained to continue after, and
    echoed the prompt back in front of its answer."""
    import os
    import sys
    import urllib.request

    names = ["Kidney Failure", "Asthma"]
    expected = [line.split(" | ", 1)[1]
                for line in generated([*names, "--greedy", "--precision", "fp32"],
                                      capsys).splitlines()]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with background_server([sys.executable, "-m", "mlflow", "models", "serve", "-m",
                            "models:/medlm@champion", "--env-manager", "local", "--host",
                            "127.0.0.1", "--port", str(port)], f"{url}/ping", workdir,
                           # as in an activated virtualenv: MLflow runs `uvicorn` from PATH
                           env={**os.environ,
                                "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
                                "PATH": os.pathsep.join([os.path.dirname(sys.executable),
                                                         os.environ.get("PATH", "")])}):
        request = urllib.request.Request(
            f"{url}/invocations", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({"inputs": names}).encode())  # greedy: the served default
        with urllib.request.urlopen(request, timeout=120) as response:
            answers = json.loads(response.read())["predictions"]
    assert [answer.strip() for answer in answers] == expected
    assert not any(answer.strip().startswith(name) for answer, name in zip(answers, names,
                                                                           strict=True))


def test_the_default_model_is_the_champion_of_the_registered_model_named(trained, in_workdir,
                                                                        capsys):
    """--registered-model decides the default --model-uri too, not only bare versions."""
    from experiments import generate

    status, err = refused(generate.main, ["Asthma", "--registered-model", "smollm2"], capsys)
    assert status == 2
    assert err.count("\n") == 0 and "'smollm2'" in err


@pytest.mark.parametrize("flags, expected", [
    (["Asthma", "--greedy", "--num-return-sequences", "3"],
     "--num-return-sequences 3 with --greedy"),
    (["Asthma", " "], "' ' is empty: expected a disease name"),
    (["Asthma", "--consensus", "3", "--greedy"], "--consensus writes one answer per disease"),
    (["Asthma", "--consensus", "1"], "--consensus: '1' is invalid: expected a whole number "
                                     "from 2 to 64"),
])
def test_generate_refuses_what_it_cannot_do_in_one_line(flags, expected, mlflow_home, capsys):
    """In-process: test_unknown_alias_is_one_line_listing_what_exists runs a refusal as a
    command of its own."""
    from experiments import generate

    status, err = refused(generate.main, flags, capsys)
    assert status == 2
    assert err.count("\n") == 0 and expected in err, err


def test_generate_reads_a_save_pretrained_directory(tiny_model_dir, tmp_path):
    result = run_module("experiments.generate", "Asthma", "--model-uri", str(tiny_model_dir),
                        "--greedy", "--max-new-tokens", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Asthma | ")


def bad_inputs(tmp: Path, csv: Path, model: Path) -> dict[str, tuple[list[str], str]]:
    (tmp / "columns.csv").write_text("Disease,Signs\nFlu,Fever\n")
    (tmp / "empty.csv").write_text("")
    (tmp / "one.csv").write_text("Name,Symptoms\nFlu,Fever\n")
    return {
        "missing file": (["--dataset", str(tmp / "nope.csv")], "nope.csv"),
        "wrong columns": (["--dataset", str(tmp / "columns.csv")], "expected columns Name"),
        "empty file": (["--dataset", str(tmp / "empty.csv")], "is empty"),
        "single disease": (["--dataset", str(tmp / "one.csv")], "at least 2 distinct"),
        "negative lr": (["--lr", "-1e-4"], "--lr -0.0001 is invalid"),
        "text lr": (["--lr", "fast"], "'fast' is not a number"),
        "zero batch": (["--batch-size", "0"], "--batch-size 0 is invalid"),
        "zero epochs": (["--epochs", "0"], "--epochs 0 is invalid"),
        "unknown model": (["--model", str(tmp / "no-model")], "no-model"),
    }


@pytest.mark.parametrize("case", ["missing file", "wrong columns", "empty file",
                                  "single disease", "negative lr", "text lr", "zero batch",
                                  "zero epochs", "unknown model"])
def test_bad_input_is_one_line_exit_2_and_no_run(case, tmp_path, dataset_csv, tiny_model_dir,
                                                 mlflow_home, capsys):
    """One case as a command of its own, as a user runs it; the others in-process."""
    from experiments import run

    args, expected = bad_inputs(tmp_path, dataset_csv, tiny_model_dir)[case]
    defaults = ["--dataset", str(dataset_csv), "--model", str(tiny_model_dir), "--epochs", "1",
                "--max-samples", "20"]
    if case == "missing file":
        result = run_module("experiments.run", *defaults, *args, cwd=tmp_path,
                            env_extra={"MLFLOW_TRACKING_URI": ""})
        status, stderr = result.returncode, result.stderr
    else:
        status, stderr = refused(run.main, [*defaults, *args], capsys)
    assert status == 2, stderr
    assert "Traceback" not in stderr
    error_lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and expected in error_lines[0], stderr
    if (tmp_path / "mlflow.db").exists():
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
        assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_help_documents_every_setting(tmp_path):
    """Every TrainConfig setting has its flag in --help (an on/off one as --NAME and
    --no-NAME)."""
    from dataclasses import fields

    from medlm.config import TrainConfig, flag_of

    result = run_module("experiments.run", "--help", cwd=tmp_path)
    assert result.returncode == 0
    for declared in fields(TrainConfig):
        flags = [flag_of(declared.name)]
        if isinstance(declared.default, bool):
            flags.append("--no-" + flags[0][2:])
        for flag in flags:
            assert re.search(rf"{flag}[ ,\n]", result.stdout), flag


def test_default_hub_ids_train_from_the_hub_cache_when_the_hub_does_not_answer(
        tmp_path, tiny_model_dir, dataset_csv, silent_hub):
    """The default dataset and model ids go through the Hub code path; here the Hub endpoint
    accepts connections and never replies, and both are in the Hugging Face cache, as for a
    user who ran once online. They load from the cache after one question to the Hub, not
    after the Hub client's retries."""
    write_hub_cache(tmp_path / "hf", tiny_model_dir, dataset_csv)
    result = run_module("experiments.run", "--max-samples", "30", "--epochs", "1",
                        "--num-validation-samples", "0", cwd=tmp_path,
                        env_extra={"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": silent_hub.url,
                                   "MLFLOW_TRACKING_URI": ""})
    assert result.returncode == 0, result.stderr
    assert "distilgpt2 on cpu" in result.stderr and "first champion" in result.stderr
    for kind, name in (("dataset", "QuyenAnhDE/Diseases_Symptoms"), ("model", "distilgpt2")):
        assert (f"{kind} {name}: from the local Hugging Face cache (the Hub is not reachable: "
                f"{silent_hub.url} did not answer within 3 s)") in result.stderr
    assert silent_hub.connections == 1


def test_a_diverging_child_fails_alone_and_the_sweep_goes_on(tmp_path, tiny_model_dir,
                                                             dataset_csv):
    """Before: the first diverging child raised a user error, failed the parent, skipped the
    other children and exited 2."""
    result = run_module("experiments.run", "--model", str(tiny_model_dir), "--dataset",
                        str(dataset_csv), "--max-samples", "40", "--epochs", "1",
                        "--lr", "1e9", "3e-3", "--num-validation-samples", "0",
                        "--no-symptom-eval", cwd=tmp_path, env_extra={"MLFLOW_TRACKING_URI": ""})
    assert result.returncode == 0, result.stderr
    assert ("child 1/2 (lr=1e+09 batch_size=8 epochs=1 weight_decay=0 seed=42) FAILED"
            in result.stderr)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("medlm").experiment_id])
    status = {run.data.params.get("lr", "parent"): run.info.status for run in runs}
    assert status == {"1000000000.0": "FAILED", "0.003": "FINISHED", "parent": "FINISHED"}
    failed_id = next(run.info.run_id for run in runs if run.info.status == "FAILED")
    rows = [line.split() for line in result.stdout.splitlines()
            if line.strip()[:1].isdigit() or line.strip().startswith("- ")]
    assert [(row[0], row[-1]) for row in rows] == [("1", "FINISHED"), ("-", "diverged")]
    assert rows[1][1] == failed_id  # the child's own run, not the parent's


def test_several_values_run_a_sweep_of_child_runs_under_one_parent(tmp_path, tiny_model_dir,
                                                                   dataset_csv):
    result = run_module("experiments.run", "--model", str(tiny_model_dir), "--dataset",
                        str(dataset_csv), "--max-samples", "40", "--epochs", "1",
                        "--lr", "3e-3", "1e-4", "--num-validation-samples", "0",
                        cwd=tmp_path, env_extra={"MLFLOW_TRACKING_URI": ""})
    assert result.returncode == 0, result.stderr
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("medlm").experiment_id])
    (parent,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") ==
                parent.info.run_id]
    assert sorted(run.data.params["lr"] for run in children) == ["0.0001", "0.003"]
    assert all(run.info.status == "FINISHED" for run in runs)
    best = min(children, key=lambda run: run.data.metrics["best_validation_loss"])
    assert parent.data.tags["best_child_run_id"] == best.info.run_id
    assert parent.data.metrics["best_validation_loss"] == best.data.metrics[
        "best_validation_loss"]
    ranked = [line.split() for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in ranked] == ["1", "2"] and ranked[0][1] == best.info.run_id


def test_a_sweep_over_training_seeds_gives_each_recipe_one_figure(tmp_path, tiny_model_dir,
                                                                  dataset_csv):
    result = run_module("experiments.run", "--model", str(tiny_model_dir), "--dataset",
                        str(dataset_csv), "--max-samples", "40", "--epochs", "1",
                        "--lr", "3e-3", "--seed", "1", "2",
                        "--num-validation-samples", "0", "--no-register", cwd=tmp_path,
                        env_extra={"MLFLOW_TRACKING_URI": ""})
    assert result.returncode == 0, result.stderr
    assert "over training seeds (mean, standard deviation and 95% t-interval):" in result.stdout
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("medlm").experiment_id])
    (parent,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    path = client.download_artifacts(parent.info.run_id, "sweep_seeds.csv", str(tmp_path))
    by_seed = pd.read_csv(path)
    assert by_seed["lr"].tolist() == [3e-3] and by_seed["seeds"].tolist() == ["1 2"]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId")]
    for row in by_seed.itertuples():
        f1s = [run.data.metrics["best_symptom_f1"] for run in children
               if float(run.data.params["lr"]) == row.lr]
        assert row.symptom_f1 == pytest.approx(sum(f1s) / 2)
        assert row.symptom_f1_ci_low <= row.symptom_f1 <= row.symptom_f1_ci_high


def test_folds_cross_validate_as_children_of_a_parent_with_mean_and_interval(
        tmp_path, tiny_model_dir, dataset_csv):
    result = run_module("experiments.run", "--model", str(tiny_model_dir), "--dataset",
                        str(dataset_csv), "--max-samples", "40", "--epochs", "1",
                        "--lr", "3e-3", "--folds", "3", "--num-validation-samples", "0",
                        cwd=tmp_path, env_extra={"MLFLOW_TRACKING_URI": ""})
    assert result.returncode == 0, result.stderr
    assert "over folds, best first (mean, standard deviation and 95% t-interval):" \
        in result.stdout
    assert ("cross-validated over 3 folds (mean ± sd [95% interval]): symptom F1 "
            in result.stderr and "(no model: constant 0." in result.stderr)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("medlm").experiment_id])
    (parent,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId")]
    assert sorted(run.data.params["fold"] for run in children) == ["0", "1", "2"]
    assert client.search_registered_models() == []  # a cross-validation estimates
    # every row held out once, by folds of other diseases
    assert sum(int(run.data.params["rows_validation"]) for run in children) == 40
    assert len({run.data.params["split_validation_sha256"] for run in children}) == 3
    losses = [run.data.metrics["best_validation_loss"] for run in children]
    metrics = parent.data.metrics
    assert metrics["cv_validation_loss"] == pytest.approx(sum(losses) / 3)
    assert metrics["cv_validation_loss_ci_low"] < metrics["cv_validation_loss"] \
        < metrics["cv_validation_loss_ci_high"]
    assert metrics["cv_validation_loss_std"] == pytest.approx(pd.Series(losses).std())
    for name in ("symptom_f1", "word_f1"):
        assert {f"cv_{name}", f"cv_{name}_std", f"cv_{name}_ci_low"} <= set(metrics)
    for name in ("baseline_constant_symptom_f1", "baseline_lookup_word_f1", "untuned_word_f1"):
        folds = [run.data.metrics[name] for run in children]  # each fold's own held-out diseases
        assert metrics[f"cv_{name}"] == pytest.approx(sum(folds) / 3), name
    artifacts = {item.path for item in client.list_artifacts(parent.info.run_id)}
    assert {"sweep.csv", "sweep_folds.csv", "cv_scores.png"} <= artifacts


def test_evaluate_reads_the_runs_split_and_prints_baselines(trained, workdir, no_uri_env,
                                                           dataset_csv, tmp_path, monkeypatch,
                                                           capsys):
    _, _, run = trained
    output = tmp_path / "scores.csv"
    result = run_module("experiments.evaluate", "--output", str(output), cwd=workdir,
                        env_extra=no_uri_env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split()[:5] == ["disease", "precision", "recall", "f1", "word_f1"]
    # The run's own --dataset, --max-samples 60 and seed, from its params.
    from medlm.data import load_disease_data
    from medlm.split import split_by_disease

    validation = split_by_disease(load_disease_data(str(dataset_csv), 60).frame, 0.2, 42).validation
    table = pd.read_csv(output)
    assert sorted(table["disease"]) == sorted(validation["Name"].drop_duplicates())
    assert f"as run {run.info.run_id} logged" in result.stdout
    assert "40 new tokens" in result.stdout and not result.stderr.strip()
    assert re.search(r"greedy answers in (fp32|bf16), 40 new tokens", result.stdout)
    summary = result.stdout[result.stdout.index("answers"):]
    assert "this model" in summary and "baseline: constant (no model)" in summary
    assert "baseline: lookup (no model)" in summary and "untuned base" in summary
    assert f"{run.data.metrics['baseline_lookup_symptom_f1']:.4f}" in summary
    assert table["symptom_f1"].between(0, 1).all()

    # the same command again with other settings, in this process (its imports paid once)
    import mlflow

    from experiments import evaluate

    monkeypatch.chdir(workdir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    mlflow.set_tracking_uri(None)  # forget any URI an earlier test in this process set
    capsys.readouterr()
    assert run_cli(evaluate.main, ["--max-new-tokens", "8", "--split-seed", "7"]) == 0
    other = capsys.readouterr()
    assert "note: --split-seed 7 overrides the run's 42" in other.err
    assert "note: --max-new-tokens 8 overrides the run's 40" in other.err
    assert "as run" not in other.out and "untuned base" not in other.out

    assert run_cli(evaluate.main, ["--num-beams", "3", "--max-new-tokens", "8", "--output",
                                   str(tmp_path / "beams.csv")]) == 0, capsys.readouterr().err
    beams = capsys.readouterr()
    assert "; beam search (3) in " in beams.out
    assert "untuned base" not in beams.out  # the run's greedy epoch 0 is not comparable
    assert sorted(pd.read_csv(tmp_path / "beams.csv")["disease"]) == sorted(table["disease"])


def test_evaluate_finds_a_dataset_the_run_named_by_a_relative_path_from_anywhere(
        tmp_path, tiny_model_dir, dataset_csv):
    (tmp_path / "project" / "data").mkdir(parents=True)
    (tmp_path / "project" / "data" / "d.csv").write_bytes(dataset_csv.read_bytes())
    (tmp_path / "elsewhere").mkdir()
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    result = run_module("experiments.run", "--model", str(tiny_model_dir), "--dataset",
                        "data/d.csv", "--max-samples", "40", "--epochs", "1",
                        "--num-validation-samples", "0", cwd=tmp_path / "project",
                        env_extra=env)
    assert result.returncode == 0, result.stderr
    scored = run_module("experiments.evaluate", "--max-new-tokens", "4",
                        cwd=tmp_path / "elsewhere", env_extra=env)
    assert scored.returncode == 0, scored.stderr
    assert "d.csv" in scored.stdout and "all rows" not in scored.stdout  # the run's 40 rows
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("medlm").experiment_id])
    assert run.data.params["dataset"] == "data/d.csv"  # what the user typed, kept
    assert run.data.params["dataset_path"] == str(tmp_path / "project" / "data" / "d.csv")


def test_a_smoke_run_leaves_the_champion_where_it_was(trained, workdir, tiny_model_dir,
                                                      dataset_csv, no_uri_env):
    _, client, run = trained
    smoke = run_module("experiments.run", "--model", str(tiny_model_dir), "--dataset",
                       str(dataset_csv), "--max-samples", "32", "--epochs", "1", "--lr", "3e-2",
                       "--num-validation-samples", "0", cwd=workdir, env_extra=no_uri_env)
    assert smoke.returncode == 0, smoke.stderr
    assert client.get_model_version_by_alias("medlm", "champion").run_id == run.info.run_id
    assert "champion stays at version 1: not compared" in smoke.stderr
    assert "max_samples 60 vs 32" in smoke.stderr
    versions = client.search_model_versions("name = 'medlm'")
    unregistered = run_module("experiments.run", "--model", str(tiny_model_dir), "--dataset",
                              str(dataset_csv), "--max-samples", "32", "--epochs", "1",
                              "--no-register", "--no-symptom-eval", cwd=workdir,
                              env_extra=no_uri_env)
    assert unregistered.returncode == 0, unregistered.stderr
    assert "not registered (--no-register)" in unregistered.stderr
    assert len(client.search_model_versions("name = 'medlm'")) == len(versions)


@pytest.mark.parametrize("logged, native_bf16, requested, decoded, note", [
    ("fp32", True, None, "fp32", None),  # was: this machine's auto, bf16
    ("bf16", True, None, "bf16", None),
    ("bf16", False, None, "fp32", "not native here; --precision bf16 forces it"),
    ("fp16", True, None, "fp32", None),  # fp16 runs decode their answers in fp32
    ("bf16", True, "fp32", "fp32", "answers decoded in fp32, the run decoded its own in bf16"),
    (None, True, None, "bf16", None),  # not a run: this machine's auto
])
def test_evaluate_decodes_in_the_runs_precision_where_this_machine_has_it(
        logged, native_bf16, requested, decoded, note, monkeypatch):
    import torch

    from medlm.inference import answer_precision

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    params = None if logged is None else {"precision_effective": logged}
    precision, said = answer_precision(requested, params, torch.device("cpu"))
    assert ("bf16" if precision.name == "bf16" else "fp32") == decoded
    assert (said is None) == (note is None) and (note is None or note in said)


@pytest.mark.parametrize("params, tf32", [
    ({"precision_effective": "fp32"}, False),  # a run from before TF32: it scored IEEE fp32
    ({"precision_effective": "fp32", "tf32": "True"}, True),
    ({"precision_effective": "fp32", "tf32": "False"}, False),
    (None, True),  # not a run: resolve_precision's default
])
def test_answers_are_decoded_with_the_runs_tf32_setting(params, tf32, monkeypatch):
    import medlm.inference

    asked, resolve = [], medlm.inference.resolve_precision
    monkeypatch.setattr(medlm.inference, "resolve_precision", lambda requested, device, tf32: (
        asked.append(tf32) or resolve(requested, device, tf32)))
    medlm.inference.answer_precision(None, params, "cpu")
    assert asked == [tf32]


def answers_printed(printed: str, names: list[str]) -> list[str]:
    """Each name's answer in what ``experiments.generate NAMES`` printed (an answer may hold
    newlines)."""
    answers = []
    for name, following in zip(names, [*names[1:], None], strict=True):
        assert printed.startswith(f"{name} | "), printed
        end = printed.index(f"\n{following} | ") if following else len(printed) - 1
        answers.append(printed[len(name) + 3:end])
        printed = printed[end + 1:]
    return answers


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_generate_answers_as_evaluate_scored_them(precision, trained, in_workdir, tmp_path,
                                                  monkeypatch, capsys):
    """The issue "generate's answers differ from the scored ones": generate decoded in fp32
    outside autocast, while the run and experiments.evaluate decode under
    ``answer_autocast()`` (bf16 where the run trained in bf16). Now generate's greedy answers
    are evaluate's, decoded in the same autocast, with --precision and by default."""
    import torch
    from transformers import GenerationMixin

    from experiments import evaluate

    _, _, run = trained
    decoded, model_generate = [], GenerationMixin.generate

    def recorded(model, *args, **kwargs):
        decoded.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return model_generate(model, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", recorded)
    scored = tmp_path / "scored.csv"
    assert run_cli(evaluate.main, ["--precision", precision, "--output", str(scored)]) == 0, (
        capsys.readouterr().err)
    capsys.readouterr()
    evaluated, decoded[:] = set(decoded), []
    assert evaluated == ({(True, torch.bfloat16)} if precision == "bf16" else
                         {(False, torch.get_autocast_dtype("cpu"))})
    table = pd.read_csv(scored, keep_default_na=False)  # an empty answer stays ""
    names = list(table["disease"])
    greedy = [*names, "--greedy", "--repetition-penalty", "1", "--max-new-tokens",
              run.data.params["max_new_tokens"]]
    assert answers_printed(generated([*greedy, "--precision", precision], capsys), names) == (
        list(table["generated"]))
    assert set(decoded) == evaluated
    if precision == ("bf16" if run.data.params["precision_effective"] == "bf16" else "fp32"):
        assert answers_printed(generated(greedy, capsys), names) == list(table["generated"])


# A tiny model trained on a few rows, in this process or in a command of its own (argv: the
# model directory, the dataset); `signal_here()` is called after the first optimizer step.
FIT_TINY_MODEL = """
import sys
import torch
from torch.utils.data import DataLoader
from medlm import train
from medlm.config import TrainConfig
from medlm.data import CausalLMCollator, LanguageDataset, load_disease_data
from medlm.modeling import load_tokenizer_and_model, resolve_precision

def fit_tiny_model(model_dir, csv, signal_here, steps):
    tokenizer, model = load_tokenizer_and_model(model_dir)
    rows = LanguageDataset(load_disease_data(csv, max_samples=16).frame, tokenizer)
    loader = DataLoader(rows, batch_size=4, collate_fn=CausalLMCollator(tokenizer.pad_token_id))
    config = TrainConfig(epochs=2, scheduler="constant", warmup_steps=0, patience=0,
                         progress=False)
    step = train.train_step

    def counted_step(*args, **kwargs):
        answer = step(*args, **kwargs)
        steps.append(len(steps) + 1)
        if len(steps) == 1:
            signal_here()
        return answer

    train.train_step = counted_step
    try:
        train.fit(model, (loader, loader), config, resolve_precision("fp32", "cpu"))
    finally:
        train.train_step = step
    return 0
"""


def test_a_sigterm_lost_in_a_destructor_still_stops_training_at_the_next_step(
        tiny_model_dir, dataset_csv, monkeypatch, capsys):
    """A signal handler's raise is lost when the signal lands while a ``__del__`` (or a
    garbage-collector callback) runs: Python prints "Exception ignored" and goes on, and a
    scheduler's SIGKILL then left the MLflow run RUNNING. The handler also records the stop:
    training stops at its next optimizer step."""
    import signal
    import sys

    from experiments._cli import _interrupt, run_cli

    namespace: dict = {}
    exec(FIT_TINY_MODEL, namespace)

    class Finalized:
        def __del__(self):  # SIGTERM arriving while this runs
            _interrupt(signal.SIGTERM, None)

    lost, steps = [], []
    monkeypatch.setattr(sys, "unraisablehook", lost.append)
    status = run_cli(lambda argv: namespace["fit_tiny_model"](
        str(tiny_model_dir), str(dataset_csv), Finalized, steps))
    assert [type(unraisable.exc_value) for unraisable in lost] == [KeyboardInterrupt]
    assert status == 130 and steps == [1]  # not the 2 epochs' 8 steps
    assert "interrupted (SIGTERM)" in capsys.readouterr().err


def test_a_sigterm_landing_in_a_garbage_collector_callback_stops_the_command(
        tmp_path, tiny_model_dir, dataset_csv):
    """A real SIGTERM, sent while the command provably runs a gc callback (it says so from
    inside one, then spins there until the signal comes): exit status 130, not a finished run."""
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    script = FIT_TINY_MODEL + """
import gc, time
from experiments._cli import run_cli

def spin_in_gc_once():
    def spin(phase, info):
        gc.callbacks.remove(spin)
        print("in a gc callback", flush=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            pass

    gc.callbacks.append(spin)
    garbage = [[index] for index in range(100_000)]  # allocations: the collector runs

sys.exit(run_cli(lambda argv: fit_tiny_model(sys.argv[1], sys.argv[2], spin_in_gc_once, [])))
"""
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(tiny_model_dir), str(dataset_csv)], cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        assert process.stdout.readline() == "in a gc callback\n"
        process.send_signal(signal.SIGTERM)
        stderr = process.communicate(timeout=60)[1]
    finally:
        process.kill()
    assert "Exception ignored" in stderr and "KeyboardInterrupt: SIGTERM" in stderr  # lost
    assert process.returncode == 130, stderr
    assert "interrupted (SIGTERM)" in stderr
