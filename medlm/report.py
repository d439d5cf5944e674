"""The loop's logger beside the MLflow run's own: ``EpochReport`` (each epoch's scores, console
line, tables and samples); and a run's name and description."""

from __future__ import annotations

import logging
from pathlib import Path

from medlm import untuned
from medlm.generate import generate
from medlm.lora import merged
from medlm.metrics import references_by_disease
from medlm.modeling import describe_device
from medlm.scores import evaluate_symptoms, interval_text, score_answers, scores_text
from medlm.train import Logger

log = logging.getLogger("medlm")


def run_name(config) -> str:
    """What the runs table of ``mlflow ui`` calls a run whose settings are definite, instead of
    MLflow's random name: "smollm2-135m-instruct lora16 lr5e-4", "distilgpt2 seed-notebook
    full lr5e-4" (a recipe other than the default, a prompt format other than plain, a fold)."""
    recipe = Path(config.recipe).stem if config.recipe.endswith(".toml") else config.recipe
    mantissa, exponent = f"{config.lr:.2e}".split("e")
    parts = [Path(config.model.rstrip("/")).name or config.model,  # a path's or Hub id's last part
             "" if recipe == "default" else recipe,
             "" if config.prompt_format == "plain" else config.prompt_format,
             f"lora{config.lora_rank}" if config.lora_rank else "full",
             f"lr{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}",
             f"fold {config.fold} of {config.folds}" if config.folds and config.fold is not None
             else ""]
    return " ".join(part for part in parts if part)


def run_description(config, best=None, epochs: int | None = None) -> str:
    """A run's description in the UI; once ended, with its kept epoch's scores."""
    trains = f"LoRA rank {config.lora_rank}" if config.lora_rank else "full fine-tuning"
    text = (f"{config.model}, recipe {config.recipe} ({trains}, lr {config.lr:g}, "
            f"{config.epochs} epochs)"
            + (f", fold {config.fold} of {config.folds}" if config.folds else ""))
    if best is None:
        return text + ": training"
    return (f"{text}: best epoch {best.epoch} of {epochs} by {config.select_by}: "
            + scores_text({"validation_loss": best.validation_loss, **best.scores}))


class EpochReport(Logger):
    """Scores each epoch's greedy answers for the validation diseases (``score``) and reports
    the epoch: a console line beside the baselines, MLflow tables, and samples."""

    def __init__(self, run):
        """``run``: the ``medlm.recipe.Run`` it reports on, set up and training."""
        config, self.precision = run.config, run.precision
        # every epoch scored where the selection needs it (or asked); else the kept one alone
        self.every_epoch = config.score_every_epoch or config.select_by == "symptom_f1"
        self.stopwatch, self.tokenizer, self.settings, self.tracker, self.split = (
            run.stopwatch, run.tokenizer, run.settings, run.tracker, run.split)
        self.prompts = list(dict.fromkeys(
            config.sample_prompts + run.validation_names[:config.num_validation_samples]))
        self.references = {key: symptoms for key, (_, symptoms)
                           in references_by_disease(run.data.frame).items()}
        self.baselines = {name: scores for name, (_, scores) in run.baselines.items()}
        self.untuned: dict[str, float] = {}
        self._table = None

    def score(self, model) -> dict[str, float]:
        return self._score(model) if self.every_epoch else {}

    def _score(self, model) -> dict[str, float]:
        with merged(model) as answering, self.precision.answer_autocast():
            self._table, overall = evaluate_symptoms(answering, self.tokenizer,
                                                     self.split.validation,
                                                     self.settings.max_new_tokens)
        return overall.as_metrics()

    def score_untuned(self, model) -> None:
        """Epoch 0: the base model's scores, its answers decoded once per base and split."""
        names = [name for name, _ in references_by_disease(self.split.validation).values()]
        key = untuned.answers_key(model, self.tokenizer, names, self.settings.max_new_tokens,
                                  self.precision.numerics, describe_device(self.precision.device))
        answers = untuned.load_answers(key, names)
        if answers is None:
            scores = self._score(model)
            untuned.save_answers(key, names, self._table["generated"].tolist())
        else:
            self._table, overall = score_answers(answers, self.split.validation)
            scores = overall.as_metrics()
        self.tracker.log_symptom_scores(0, self._table, scores)
        self._table = None  # epoch 0's: never logged as a later epoch's
        log.info("epoch 0 (untuned base%s): %s",
                 ", answers kept from an earlier run" if answers is not None else "",
                 self.compared(scores))
        self.untuned = scores

    def score_best(self, model, best) -> None:
        """After training, when epochs were not scored as they ended: the kept epoch's."""
        best.scores = self._score(model)
        self.tracker.log_symptom_scores(best.epoch, self._table, best.scores)

    def compared(self, scores: dict[str, float]) -> str:
        """"symptom F1 0.312 [0.251-0.372], word F1 0.298 [0.250-0.346] | no model 0.138
        (constant)/0.133 (lookup) | untuned 0.000/0.013": beside the best baseline of each."""
        best_symptom = max(self.baselines, key=lambda n: self.baselines[n].symptom.f1)
        best_word = max(self.baselines, key=lambda n: self.baselines[n].word.f1)
        text = (f"symptom F1 {interval_text(scores, 'symptom_f1')}, word F1 "
                f"{interval_text(scores, 'word_f1')} | "
                f"no model {self.baselines[best_symptom].symptom.f1:.3f} ({best_symptom})/"
                f"{self.baselines[best_word].word.f1:.3f} ({best_word})")
        if self.untuned:
            text += f" | untuned {self.untuned['symptom_f1']:.3f}/{self.untuned['word_f1']:.3f}"
        return text

    def on_epoch_end(self, model, result) -> None:
        scores = ""
        if result.scores:
            if self._table is None and self.tracker.lacks(result.epoch, "symptom_scores.json"):
                self._score(model)  # the checkpointed weights again: the same greedy answers
            if self._table is not None:
                self.tracker.log_symptom_scores(result.epoch, self._table, result.scores)
                self._table = None
            scores = ", " + self.compared(result.scores)
        log.info("epoch %d: training loss %.4f, validation loss %.4f (perplexity %.2f), "
                 "%.1f s, %.0f tokens/s, MFU %.1f%%%s%s", result.epoch, result.training_loss,
                 result.validation_loss, result.validation_perplexity, result.epoch_duration_sec,
                 result.train_tokens_per_sec, 100 * result.model_flops_utilization,
                 " *best*" if result.is_best else "", scores)
        if not self.tracker.lacks(result.epoch, "samples.json"):
            return
        with (self.stopwatch.phase("samples"), merged(model) as answering,
              self.precision.answer_autocast()):
            completions = generate(answering, self.tokenizer, self.prompts, self.settings)
        rows = []
        for prompt, texts in zip(self.prompts, completions, strict=True):
            side = self.split.side(prompt)
            log.info("  %s (%s) | %s", prompt, side, texts[0])
            rows.append({"epoch": result.epoch, "prompt": prompt, "split": side,
                         "generated": texts[0],
                         "reference": self.references.get(prompt.casefold(), "")})
        self.tracker.log_samples(rows)

