"""Fine-tune a causal LM on disease -> symptoms and record the run in MLflow.

    python -m experiments.run --lr 5e-4
    torchrun --standalone --nproc_per_node 4 -m experiments.run --lr 5e-4   # 4 processes (DDP)
"""

from __future__ import annotations

import logging
import sys

from experiments._cli import (
    ArgumentParser,
    flags_given,
    non_negative_float,
    non_negative_int,
    offline_alternative,
    positive_float,
    positive_int,
    quiet_libraries,
    run_cli,
    seed,
)
from medlm.config import (
    AUTO_LORA_RANK,
    DEVICES,
    LORA_MODULES,
    LOSS_ON,
    PRECISIONS,
    RECIPES,
    SCHEDULERS,
    SELECT_BY,
    TrainConfig,
)
from medlm.errors import MedLMError
from medlm.hub import HubUnavailable
from medlm.prompts import PROMPT_FORMATS

log = logging.getLogger("medlm")


def by_recipe(name: str, default: str | None = None) -> str:
    """" (default: 4; --recipe seed-notebook: 10)": a recipe-set flag's values, for --help."""
    ours = default or str(getattr(TrainConfig(), name))
    others = "; ".join(f"--recipe {recipe}: {settings[name]}"
                       for recipe, settings in RECIPES.items() if name in settings)
    return f" (default: {ours}{'; ' + others if others else ''})"


def build_parser() -> ArgumentParser:
    defaults = TrainConfig()
    parser = ArgumentParser(  # no abbreviations: --resume must see --epochs as it is written
        prog="python -m experiments.run", description=__doc__.strip().splitlines()[0],
        allow_abbrev=False)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default=defaults.dataset,
                      help="Hub dataset id, or a local CSV/TSV/Parquet/JSON file with Name and "
                           "Symptoms columns")
    data.add_argument("--max-samples", type=positive_int, default=None,
                      help="use only the first N cleaned rows (quick runs)")
    data.add_argument("--max-length", type=positive_int, default=None,
                      help="cap on tokens per row; longer rows are truncated"
                           + by_recipe("max_length", "the model's context size"))
    data.add_argument("--validation-fraction", type=positive_float,
                      default=defaults.validation_fraction,
                      help="share of distinct diseases held out for validation")
    data.add_argument("--split-seed", type=seed, default=defaults.split_seed,
                      help="which diseases are held out: runs compare only on the same split")
    data.add_argument("--seed", type=seed, nargs="+", default=[defaults.seed],
                      help="seeds initialisation, shuffling, dropout, LoRA adapters and "
                           "samples (several values: a sweep, compared on one split)")
    model = parser.add_argument_group("model and hardware")
    model.add_argument("--model", default=defaults.model,
                       help="Hub model id, an offline base (smollm2-135m-instruct: python -m "
                            "experiments.download), a save_pretrained directory or a .gguf file")
    model.add_argument("--device", choices=DEVICES, default=defaults.device,
                       help="auto: cuda, then mps, then cpu")
    model.add_argument("--collective-timeout", dest="collective_timeout_min",
                       type=positive_float, default=defaults.collective_timeout_min,
                       help="torchrun: minutes a process waits for the others at a collective "
                            "before the job fails (raise it if scoring after an epoch is slower)")
    model.add_argument("--precision", choices=PRECISIONS, default=defaults.precision,
                       help="auto: bf16 autocast where the hardware has it (fp16 + GradScaler "
                            "on older GPUs), else fp32")
    train = parser.add_argument_group(
        "training (defaults: the best recipe measured, experiments/RESULTS.md)")
    train.add_argument("--recipe", choices=tuple(RECIPES), default=defaults.recipe,
                       help="a named set of the defaults below; flags given beside it win. "
                            "seed-notebook: the seed notebook's settings (full fine-tuning, "
                            "constant lr, 10 epochs, no early stopping, no clipping, random "
                            "batches, rows cut at 128 tokens)")
    sweep = " (several values: a sweep)"
    train.add_argument("--epochs", type=positive_int, nargs="+", default=None,
                       help="passes over the training set" + sweep + by_recipe("epochs"))
    train.add_argument("--batch-size", type=positive_int, nargs="+", default=None,
                       help="rows per batch (under torchrun: of all processes together)" + sweep
                            + by_recipe("batch_size"))
    train.add_argument("--lr", type=positive_float, nargs="+", default=None,
                       help="AdamW learning rate" + sweep + by_recipe("lr"))
    train.add_argument("--weight-decay", type=non_negative_float, nargs="+", default=None,
                       help="AdamW weight decay (0 = the seed notebook's Adam)" + sweep
                            + by_recipe("weight_decay"))
    train.add_argument("--max-grad-norm", type=non_negative_float, default=None,
                       help="gradient clipping; 0 = off" + by_recipe("max_grad_norm"))
    train.add_argument("--grad-accum", type=positive_int, default=defaults.grad_accum,
                       help="batches per optimizer step")
    train.add_argument("--scheduler", choices=SCHEDULERS, default=None,
                       help="learning-rate decay after warmup" + by_recipe("scheduler"))
    train.add_argument("--warmup-steps", type=non_negative_int, default=None,
                       help="optimizer steps of linear warmup" + by_recipe("warmup_steps"))
    train.add_argument("--no-group-by-length", dest="group_by_length", action="store_false",
                       default=None,
                       help="plain shuffled batches instead of batches of similar-length rows "
                            "(--recipe seed-notebook does this)")
    train.add_argument("--loss-on", choices=LOSS_ON, default=None,
                       help="full: the whole \"Name | Symptoms\" text; completion: only the "
                            "symptoms (the loss skips the \"Name |\" prompt)"
                            + by_recipe("loss_on"))
    train.add_argument("--prompt-format", choices=PROMPT_FORMATS, default=None,
                       help="plain: \"Name | Symptoms\" rows; chat: the name and symptoms as "
                            "the user's and the assistant's turns of the tokenizer's chat "
                            "template; auto: chat where the tokenizer has a template"
                            + by_recipe("prompt_format"))
    train.add_argument("--shuffle-symptoms", action="store_true", default=None,
                       help="symptom-order augmentation: each training row's symptoms in a new "
                            "order every epoch")
    train.add_argument("--neftune-alpha", type=non_negative_float, default=None,
                       help="NEFTune: noise on the input embeddings while training, of scale "
                            "alpha / sqrt(tokens x width) (TRL suggests 5); 0 = off"
                            + by_recipe("neftune_alpha"))
    train.add_argument("--label-smoothing", type=non_negative_float, default=None,
                       help="share of each target token's probability spread over the "
                            "vocabulary in the training loss (not the validation loss); 0 = off"
                            + by_recipe("label_smoothing"))
    train.add_argument("--lora-rank", type=non_negative_int, default=None,
                       help="train LoRA adapters of this rank on every linear layer of the "
                            "blocks (peft) instead of every weight; merged into the base before "
                            "the model is logged; 0 = full fine-tuning"
                            + by_recipe("lora_rank", f"{AUTO_LORA_RANK} on a pretrained base, "
                                        "0 on one with random weights (experiments.init_model)"))
    train.add_argument("--lora-alpha", type=positive_float, default=None,
                       help="LoRA scaling (the update is multiplied by alpha / rank; default: "
                            "2 x --lora-rank)")
    train.add_argument("--lora-dropout", type=non_negative_float, default=defaults.lora_dropout,
                       help="dropout on the LoRA adapters' input")
    train.add_argument("--lora-modules", choices=LORA_MODULES, default=defaults.lora_modules,
                       help="the layers with adapters: every linear layer of the blocks, or the "
                            "attention projections peft adapts by default (query and value in "
                            "SmolLM2 or Gemma 3, GPT-2's c_attn)")
    train.add_argument("--patience", type=non_negative_int, default=None,
                       help="stop after N epochs without a better --select-by value; 0 = off"
                            + by_recipe("patience"))
    train.add_argument("--select-by", choices=SELECT_BY, default=defaults.select_by,
                       help="what picks the best epoch (the weights kept), early stopping and "
                            "the champion: the lowest validation loss or the highest symptom "
                            "F1 on the validation diseases")
    samples = parser.add_argument_group("samples written after every epoch")
    samples.add_argument("--sample-prompt", action="append", dest="sample_prompts",
                         metavar="DISEASE",
                         help="disease to sample (repeatable; default: Kidney Failure); the "
                              "first --num-validation-samples validation diseases are added")
    samples.add_argument("--num-validation-samples", type=non_negative_int,
                         default=defaults.num_validation_samples,
                         help="validation diseases sampled besides --sample-prompt")
    samples.add_argument("--max-new-tokens", type=positive_int, default=defaults.max_new_tokens,
                         help="tokens generated per sample and per symptom-scored answer")
    samples.add_argument("--no-symptom-eval", dest="symptom_eval", action="store_false",
                         help="skip scoring greedy answers for the validation diseases "
                              "(symptom_precision/recall/f1, word_f1, and the untuned "
                              "base's epoch-0 score)")
    samples.add_argument("--score-every-epoch", action="store_true",
                         help="score the answers after every epoch, not only the best epoch's "
                              "at the end (always so with --select-by symptom_f1)")
    tracking = parser.add_argument_group("MLflow (tracking URI: $MLFLOW_TRACKING_URI, else "
                                         "./mlflow.db)")
    tracking.add_argument("--experiment", default=defaults.experiment,
                          help="MLflow experiment name")
    tracking.add_argument("--run-name", default=None, help="MLflow run name (default: MLflow's)")
    tracking.add_argument("--registered-model", default=defaults.registered_model,
                          help="Model Registry name the best model is registered under")
    tracking.add_argument("--no-register", dest="register", action="store_false",
                          help="smoke runs: log metrics and samples, but neither log nor "
                               "register the model")
    tracking.add_argument("--promote", action="store_true",
                          help="make this run's version @champion without comparing it (the "
                               "champion otherwise moves only to a better version with the "
                               "same evaluation key)")
    tracking.add_argument("--log-every-steps", type=non_negative_int,
                          default=defaults.log_every_steps,
                          help="per-step curves in MLflow (step/training_loss, "
                               "step/learning_rate, step/grad_norm, step/tokens_per_sec) every N "
                               "optimizer steps; 0 = per-epoch metrics only")
    tracking.add_argument("--no-system-metrics", dest="system_metrics", action="store_false",
                          help="do not log CPU, memory and GPU usage (system/* metrics)")
    parser.add_argument("--resume", metavar="RUN_ID", default=None,
                        help="continue an interrupted run from its last completed epoch, with "
                             "its own settings; beside it only --epochs (the run's new number of "
                             "epochs in all), this machine's --device and --precision, "
                             "--checkpoint-dir, --collective-timeout, --no-progress and "
                             "--no-system-metrics; a sweep's parent run id continues the whole "
                             "sweep")
    parser.add_argument("--checkpoint-dir", default=defaults.checkpoint_dir,
                        help="where each run keeps its resumable state (<dir>/<run id>/; "
                             "removed when the run finishes)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars (they are off anyway when stderr is not a TTY)")
    return parser


def configs_from_args(args) -> tuple[list[TrainConfig], dict[str, list]]:
    """The runs the flags ask for: ``--recipe``'s settings under the flags given (a flag left
    out is None), one run per combination of the swept values; and the swept values."""
    from medlm.recipe import SWEEPABLE
    from medlm.sweep import sweep_configs

    given = {key: value for key, value in vars(args).items()
             if value is not None and key not in ("resume", "recipe")}
    given.setdefault("sample_prompts", TrainConfig().sample_prompts)
    base = TrainConfig.from_recipe(args.recipe, **{
        key: value for key, value in given.items() if key not in SWEEPABLE})
    grid = {name: list(dict.fromkeys(given.get(name, [getattr(base, name)])))
            for name in SWEEPABLE}
    return sweep_configs(base, grid), grid


# What --resume takes beside the run id: where and how this machine runs it, and how many
# epochs; anything else would change the run's math, which its checkpoint fixes.
RESUME_FLAGS = {"resume": "--resume", "checkpoint_dir": "--checkpoint-dir",
                "collective_timeout_min": "--collective-timeout", "epochs": "--epochs",
                "device": "--device", "precision": "--precision", "progress": "--no-progress",
                "system_metrics": "--no-system-metrics"}


def check_resume_flags(given: dict[str, str]) -> None:
    refused = sorted(option for dest, option in given.items() if dest not in RESUME_FLAGS)
    if refused:
        flags = ", ".join(refused)
        raise MedLMError(f"{flags} with --resume is invalid: a resumed run keeps the settings "
                         f"it was started with: expected only {', '.join(RESUME_FLAGS.values())}"
                         " beside --resume")


def main(argv: list[str] | None = None) -> int:
    from medlm import distributed, launch
    from medlm.timing import process_started
    from medlm.tracking import check_tracking_store, compare_runs_hint

    args = build_parser().parse_args(argv)
    try:
        quiet_libraries()
        if args.resume:
            given = flags_given(build_parser(), argv if argv is not None else sys.argv[1:])
            check_resume_flags(given)
            if distributed.is_main():  # under torchrun only rank 0 talks to MLflow
                check_tracking_store()
            epochs = None
            if "epochs" in given:  # how long the run goes on
                if len(args.epochs) > 1:
                    raise MedLMError("--epochs with --resume takes one value: expected the "
                                     "run's new number of epochs in all")
                epochs = args.epochs[0]
            machine = {name: getattr(args, name) for name in
                       ("device", "precision", "progress", "system_metrics") if name in given}
            launch.resume(args.resume, args.checkpoint_dir, args.collective_timeout_min,
                          epochs, started=process_started(), machine=machine)
            return 0
        configs, grid = configs_from_args(args)  # the flags first, then the store
        if distributed.is_main():
            check_tracking_store()
        try:
            launch.run(configs, grid, started=process_started())
        except HubUnavailable as error:  # setup failed, no run started: what works offline
            raise offline_alternative(error, build_parser(), argv, "--dataset", "--model",
                                      configs[0].model) from None
        log.info("compare runs: %s    generate: python -m experiments.generate "
                 "\"Kidney Failure\"", compare_runs_hint())
        return 0
    finally:
        distributed.stop()


if __name__ == "__main__":
    sys.exit(run_cli(main))
