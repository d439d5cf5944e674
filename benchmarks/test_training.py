"""Per-batch training throughput at batch size 8 on the real dataset, same model and rows for
every contender: the seed notebook's step, ``transformers.Trainer`` tuned as a user would tune
it, and MedLM's loop (``medlm.train.train_step``, the code ``fit`` runs). Also MFU, inference
throughput, and per-sample cost on the dataset replicated ``SCALE`` times."""

from __future__ import annotations

import itertools
import time

import pandas as pd
import pytest
import torch
from bench_settings import PRECISION, PRESET, RESULTS, ROUNDS, SCALE, SHORT
from seed_notebook import SeedLanguageDataset, seed_step

from medlm.config import TrainConfig
from medlm.data import LanguageDataset, make_loader
from medlm.modeling import resolve_precision
from medlm.train import FitResult, TrainState, make_scheduler, train_step

CPU = torch.device("cpu")
BATCH = 8
WARMUP_STEPS = 1 if SHORT else 2
STEPS = 4 if SHORT else 40  # ours and Trainer: a whole epoch of the training split
SEED_STEPS = 4 if SHORT else 10  # every seed batch costs the same (always 128 tokens)


def flops_per_token(model, sequence_length: float) -> float:
    """nanoGPT's estimate for a training step: 6N + 12 * layers * width * sequence length.
    With LoRA (frozen base) no weight gradient is computed for the base: 4N for it (forward 2N,
    gradients of the activations 2N), 6 per adapter parameter."""
    config = getattr(model, "base_model", model).config
    parameters = [p for name, p in model.named_parameters() if "wpe" not in name]
    frozen = sum(p.numel() for p in parameters if not p.requires_grad)
    trained = sum(p.numel() for p in parameters if p.requires_grad)
    return 4 * frozen + 6 * trained + 12 * config.n_layer * config.n_embd * sequence_length


def report(name: str, benchmark, seconds_per_batch: float, real_tokens_per_batch: float,
           mean_width: float, model, peak: float) -> dict[str, float]:
    figures = {
        "s/batch": seconds_per_batch,
        "samples/s": BATCH / seconds_per_batch,
        "real tokens/s": real_tokens_per_batch / seconds_per_batch,
        "MFU %": 100 * flops_per_token(model, mean_width) * real_tokens_per_batch
        / seconds_per_batch / peak,
    }
    benchmark.extra_info.update(figures)
    RESULTS[name] = figures
    return figures


def add_ratios(name: str, benchmark,
               baselines=("train: seed step", "train: transformers.Trainer")) -> None:
    ours = RESULTS[name]
    for baseline in baselines:
        if baseline in RESULTS:
            ratio = ours["samples/s"] / RESULTS[baseline]["samples/s"]
            ours[f"x vs {baseline.split(': ')[1]}"] = ratio
            benchmark.extra_info[f"speedup_vs_{baseline.split(': ')[1]}"] = ratio


def timed_steps(run_one, batches, warmup: int) -> float:
    """Seconds per batch over ``batches`` after ``warmup`` untimed ones."""
    for batch in batches[:warmup]:
        run_one(batch)
    started = time.perf_counter()
    for batch in batches[warmup:]:
        run_one(batch)
    return (time.perf_counter() - started) / len(batches[warmup:])


def test_seed_step(benchmark, train_frame, tokenizer, fresh_model, matmul_peak):
    dataset = SeedLanguageDataset(train_frame, tokenizer)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    batches = list(itertools.islice(loader, WARMUP_STEPS + SEED_STEPS))
    seconds = []

    def run():
        model = fresh_model()
        optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
        seconds.append(timed_steps(lambda batch: seed_step(model, optimizer, batch), batches,
                                   WARMUP_STEPS))
        return model

    model = benchmark.pedantic(run, rounds=ROUNDS)
    real = sum(int(b["attention_mask"].sum()) for b in batches[WARMUP_STEPS:]) / SEED_STEPS
    report("train: seed step", benchmark, min(seconds), real, 128, model, matmul_peak["fp32"])


def test_transformers_trainer(benchmark, train_frame, tokenizer, fresh_model, matmul_peak,
                              tmp_path):
    trainer_steps(benchmark, train_frame, tokenizer, fresh_model, matmul_peak, tmp_path,
                  "train: transformers.Trainer")


def trainer_steps(benchmark, train_frame, tokenizer, fresh_model, matmul_peak, tmp_path,
                  name: str) -> None:
    from transformers import (
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    low_precision = resolve_precision(PRECISION, CPU).name == "bf16"  # as MedLM's loop runs
    texts = (train_frame["Name"] + " | " + train_frame["Symptoms"] + tokenizer.eos_token)
    rows = [{"input_ids": ids} for ids in tokenizer(texts.tolist())["input_ids"]]
    step_ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())

    def run():
        step_ends.clear()
        model = fresh_model()
        arguments = TrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=BATCH,
            max_steps=WARMUP_STEPS + STEPS, learning_rate=5e-4,
            train_sampling_strategy="group_by_length", bf16=low_precision, use_cpu=True,
            report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
            dataloader_pin_memory=False, seed=0)
        trainer = Trainer(model=model, args=arguments, train_dataset=rows,
                          data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                          callbacks=[StepClock()])
        trainer.train()
        return model, (step_ends[-1] - step_ends[WARMUP_STEPS - 1]) / STEPS

    results = []
    model = benchmark.pedantic(lambda: results.append(run()) or results[-1][0], rounds=ROUNDS)
    lengths = sorted(len(row["input_ids"]) for row in rows)
    real = sum(lengths) / len(lengths) * BATCH
    width = sum(lengths) / len(lengths) * 1.03  # its grouping pads like ours (measured 1.03)
    peak = matmul_peak["bf16" if low_precision else "fp32"]
    report(name, benchmark, min(r[1] for r in results), real, width, model, peak)


def ours(benchmark, frame, tokenizer, fresh_model, matmul_peak, name: str) -> dict:
    precision = resolve_precision(PRECISION, CPU)
    dataset = LanguageDataset(frame, tokenizer)
    loader = make_loader(dataset, TrainConfig(batch_size=BATCH, seed=0), train=True)
    batches = list(itertools.islice(loader, WARMUP_STEPS + STEPS))
    config = TrainConfig()
    seconds = []

    def run():
        model = fresh_model()
        parameters = [p for p in model.parameters() if p.requires_grad]  # as fit builds it
        optimizer = torch.optim.AdamW(
            [{"params": [p for p in parameters if p.dim() >= 2],
              "weight_decay": config.weight_decay},
             {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0}],
            lr=config.lr, fused=True)
        state = TrainState(optimizer, make_scheduler(optimizer, config, len(batches)),
                           precision.grad_scaler(), None, FitResult())
        loss_sums = []

        def one(batch):
            loss_sums.append(train_step(model, [batch], state, precision, config)[0])

        seconds.append(timed_steps(one, batches, WARMUP_STEPS))
        assert torch.isfinite(torch.stack(loss_sums)).all()  # read once, at the end, as fit does
        return model

    model = benchmark.pedantic(run, rounds=ROUNDS)
    measured = batches[WARMUP_STEPS:]
    real = sum(int(b["attention_mask"].sum()) for b in measured) / len(measured)
    width = sum(b["input_ids"].shape[1] for b in measured) / len(measured)
    peak = matmul_peak[precision.name if precision.name != "fp16" else "fp32"]
    figures = report(name, benchmark, min(seconds), real, width, model, peak)
    benchmark.extra_info["precision"] = precision.name
    return figures


def test_medlm_loop(benchmark, train_frame, tokenizer, fresh_model, matmul_peak):
    ours(benchmark, train_frame, tokenizer, fresh_model, matmul_peak, "train: MedLM loop")
    add_ratios("train: MedLM loop", benchmark)


def test_medlm_loop_at_scale(benchmark, train_frame, tokenizer, fresh_model, matmul_peak):
    """Per-sample cost on the training split replicated SCALE times (same batches, bigger
    epoch): building batches over 100x the rows must not make a step dearer."""
    big = pd.concat([train_frame] * SCALE, ignore_index=True)
    figures = ours(benchmark, big, tokenizer, fresh_model, matmul_peak,
                   f"train: MedLM loop, data x{SCALE}")
    base = RESULTS.get("train: MedLM loop")
    if base:
        figures["per-sample cost vs x1"] = base["samples/s"] / figures["samples/s"]
        benchmark.extra_info["per_sample_cost_vs_x1"] = figures["per-sample cost vs x1"]


def test_inference_throughput(benchmark, frame, tokenizer, fresh_model):
    from medlm.generate import GenerationSettings, generate

    model = fresh_model().eval()
    prompts = frame["Name"].head(BATCH).tolist()
    settings = GenerationSettings(max_new_tokens=16 if SHORT else 40)
    precision = resolve_precision(PRECISION, CPU)  # as a run writes its samples

    def run():
        with precision.answer_autocast():
            return generate(model, tokenizer, prompts, settings)

    completions = benchmark.pedantic(run, rounds=ROUNDS + 1, warmup_rounds=1)
    generated = sum(len(tokenizer(text[0])["input_ids"]) for text in completions)
    figures = {"prompts": len(prompts), "generated tokens/s": generated / benchmark.stats.stats.min}
    benchmark.extra_info.update(figures)
    RESULTS["generate: batch of prompts"] = figures


@pytest.fixture(autouse=True, scope="module")
def _name_the_model():
    RESULTS.setdefault("model", {"preset is distilgpt2": float(PRESET == "distilgpt2")})


LORA_RANK = 16


def lora_model(fresh_model):
    """The same base with rank-16 adapters on every block's linear layers (the recipe's)."""
    from medlm.lora import add_lora

    return lambda: add_lora(fresh_model(), LORA_RANK, seed=0).train()


def test_transformers_trainer_with_peft_lora(benchmark, train_frame, tokenizer, fresh_model,
                                             matmul_peak, tmp_path):
    trainer_steps(benchmark, train_frame, tokenizer, lora_model(fresh_model), matmul_peak,
                  tmp_path, "train: Trainer + peft LoRA r16")


def test_medlm_loop_with_lora(benchmark, train_frame, tokenizer, fresh_model, matmul_peak):
    """LoRA rank 16 in MedLM's loop: against full fine-tuning in the same loop, and against
    Trainer with the same peft model."""
    name = "train: MedLM loop, LoRA r16"
    ours(benchmark, train_frame, tokenizer, lora_model(fresh_model), matmul_peak, name)
    add_ratios(name, benchmark, ("train: Trainer + peft LoRA r16", "train: MedLM loop"))
