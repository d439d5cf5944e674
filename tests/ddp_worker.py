"""Trains the tiny model with ``fit`` and writes what this process saw, for
test_distributed.py: ``torchrun --nproc_per_node N tests/ddp_worker.py MODEL CSV OUT`` (or plain
``python`` for the single-process reference). ``... OUT stop CHECKPOINT`` stops (as Ctrl-C would)
after epoch 1 is checkpointed; ``... OUT resume CHECKPOINT`` continues from there.
``MEDLM_TEST_GRAD_ACCUM=k`` accumulates k batches per optimizer step."""

import json
import os
import sys
from pathlib import Path

import torch

from medlm import distributed
from medlm.config import TrainConfig
from medlm.data import LanguageDataset, load_disease_data, make_loader
from medlm.modeling import load_tokenizer_and_model, resolve_precision
from medlm.split import split_by_disease
from medlm.train import Logger, Report, fit


class RecordingDataset(LanguageDataset):
    """Notes each row the loader fetches, under the epoch its sampler is drawing."""

    sampler = None
    seen: dict[int, list[int]]

    def __getitem__(self, index):
        self.seen.setdefault(self.sampler.epoch, []).append(int(index))
        return super().__getitem__(index)


class StopAfterFirstEpoch(Logger):
    def on_epoch_end(self, model, result):
        raise KeyboardInterrupt


def main(model_dir: str, dataset: str, out: str, mode: str = "", checkpoint: str = "") -> None:
    device = distributed.start(torch.device("cpu"))
    config = TrainConfig(epochs=2, lr=3e-3, batch_size=8, progress=False,
                         grad_accum=int(os.environ.get("MEDLM_TEST_GRAD_ACCUM", "1")))
    tokenizer, model = load_tokenizer_and_model(model_dir)
    for module in model.modules():  # dropout masks differ between processes by design
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    frame = load_disease_data(dataset, max_samples=120).frame
    split = split_by_disease(frame, 0.2, config.seed)
    train_frame, validation_frame = split.train, split.validation
    shard = {"shard": distributed.rank(), "num_shards": distributed.world_size()}
    train_set = RecordingDataset(train_frame, tokenizer)
    train_set.seen = {}
    train = make_loader(train_set, config, train=True, **shard)
    train_set.sampler = train.batch_sampler
    validation = make_loader(LanguageDataset(validation_frame, tokenizer), config, train=False,
                             **shard)
    result = fit(model, (train, validation), config, resolve_precision("fp32", device),
                 checkpoint_dir=checkpoint or None,
                 report=Report([StopAfterFirstEpoch()] if mode == "stop" else ()))
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    Path(out, f"rank{distributed.rank()}.json").write_text(json.dumps({
        "world_size": distributed.world_size(),
        "training_rows": len(train_set),
        "rows_by_epoch": train_set.seen,
        "losses": [[e.training_loss, e.validation_loss] for e in result.epochs],
        "samples_per_sec": [e.train_samples_per_sec for e in result.epochs],
        "weights": [float(weights.sum()), float(weights.abs().sum())],
    }))
    distributed.stop()


if __name__ == "__main__":
    main(*sys.argv[1:])
