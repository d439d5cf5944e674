"""From a dataset source to batches: load, clean, tokenize once, pad per batch (the split by
disease is ``medlm.split``)."""

from __future__ import annotations

import codecs
import hashlib
import io
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset, Sampler

from medlm._paths import looks_like_local_path
from medlm.config import TrainConfig
from medlm.errors import MedLMError, first_line
from medlm.hub import HubUnavailable, check_hub
from medlm.prompts import bos_ids, encode_texts, prompts_for, training_texts

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("Name", "Symptoms")
IGNORE_INDEX = -100  # label value that torch's cross-entropy skips


@dataclass
class DiseaseData:
    """A cleaned dataset and what is worth recording about where it came from."""

    frame: pd.DataFrame
    source: str
    raw_rows: int
    dropped_rows: int
    file_sha256: str | None  # of the file as read, when the source is a local file

    @property
    def path(self) -> str | None:
        """The local file's absolute path; None for a Hub dataset."""
        return os.path.abspath(os.path.expanduser(self.source)) if self.file_sha256 else None

    @property
    def content_sha256(self) -> str:
        """Hash of exactly the text the model trains on, whatever the source format."""
        text = self.frame[list(REQUIRED_COLUMNS)].to_csv(index=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_disease_data(source: str, max_samples: int | None = None) -> DiseaseData:
    """Read ``source`` (Hub dataset id or local CSV/TSV/Parquet/JSON path) and clean it."""
    if not source.strip():
        raise MedLMError(f"dataset {source!r} is empty: expected a local CSV, Parquet or JSON "
                         "file, or a Hugging Face Hub dataset id")
    path = os.path.expanduser(source)
    if os.path.isfile(path):
        raw, file_sha256 = _read_file(path)
    elif os.path.isdir(path):
        raise MedLMError(f"dataset {source!r} is a directory: expected a CSV, Parquet or JSON file")
    elif looks_like_local_path(source):
        raise MedLMError(f"dataset file {source!r} not found: expected a CSV, Parquet or JSON file")
    else:
        raw, file_sha256 = _read_hub(source), None
    frame, dropped = clean_frame(raw, source)
    if dropped:
        log.warning("dropped %d of %d rows with an empty or punctuation-only Name or Symptoms",
                    dropped, len(raw))
    if max_samples is not None:
        frame = frame.head(max_samples).reset_index(drop=True)
    return DiseaseData(frame, source, len(raw), dropped, file_sha256)


def _read_file(path: str) -> tuple[pd.DataFrame, str]:
    """The rows and the SHA-256 of the file's bytes, read once (a text file's parsed from them)."""
    try:
        with open(path, "rb") as handle:
            content = handle.read()
    except OSError as error:
        raise MedLMError(f"dataset file {path!r} cannot be read ({error.strerror or error}): "
                         "expected a file this user may read") from None
    suffix, sha256 = os.path.splitext(path)[1].lower(), hashlib.sha256(content).hexdigest()
    if suffix != ".parquet":  # text: named if it is not UTF-8, where pandas would not say
        if encoding := _wide_encoding(content[:4096]):
            raise MedLMError(f"dataset file {path!r} is {encoding} text: expected UTF-8 "
                             "(re-save it as UTF-8)")
        if b"\x00" in content[:1 << 16]:
            raise MedLMError(f"dataset file {path!r} is binary, not text (it has NUL "
                             "bytes): expected a UTF-8 CSV, Parquet or JSON file")
        try:
            content.decode("utf-8")
        except UnicodeDecodeError as error:
            line = content.count(b"\n", 0, error.start) + 1
            raise MedLMError(f"dataset file {path!r} is not UTF-8 text (byte "
                             f"0x{content[error.start]:02x} on line {line}): expected a UTF-8 "
                             "CSV, Parquet or JSON file (re-save it as UTF-8)") from None
    try:
        if suffix == ".parquet":  # by its path: pyarrow's errors name it
            return pd.read_parquet(path), sha256
        if suffix in (".json", ".jsonl"):
            return pd.read_json(io.BytesIO(content), lines=suffix == ".jsonl"), sha256
        return pd.read_csv(io.BytesIO(content), sep="\t" if suffix == ".tsv" else ",",
                           encoding="utf-8", dtype=str, keep_default_na=False), sha256
    except pd.errors.EmptyDataError:
        raise MedLMError(f"dataset file {path!r} is empty: expected a header with Name and "
                         "Symptoms and at least one row") from None
    except (ValueError, OSError, pd.errors.ParserError) as error:
        detail = first_line(error)
        if suffix not in (".parquet", ".json", ".jsonl", ".tsv"):  # read as comma-separated
            header = content.decode("utf-8").splitlines()[0]
            detail = ("," not in header and _separator_hint(header)) or detail
        raise MedLMError(f"dataset file {path!r} could not be parsed ({detail}): expected a "
                         "CSV, Parquet or JSON file") from None


def _wide_encoding(head: bytes) -> str | None:
    """"UTF-16" or "UTF-32" where a file starts as such text (a spreadsheet's "Unicode text"):
    by its byte-order mark, or by the NUL bytes that pad Latin letters to 2 or 4 bytes."""
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "UTF-32"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "UTF-16"
    for width, name in ((4, "UTF-32"), (2, "UTF-16")):
        units = [head[i:i + width] for i in range(0, len(head) - width + 1, width)]
        padding = b"\x00" * (width // 2)
        if head.strip(b"\x00") and units and (all(unit.endswith(padding) for unit in units)
                                              or all(unit.startswith(padding) for unit in units)):
            return name
    return None


def _read_hub(dataset_id: str) -> pd.DataFrame:
    offline = check_hub()  # before importing datasets, which reads the offline switch once
    import datasets  # slow import, only needed for Hub ids

    if not offline:
        log.info("loading dataset %s from the Hugging Face Hub (or its local cache)", dataset_id)
    try:
        frame = datasets.load_dataset(dataset_id, split="train").to_pandas()
    except Exception as error:  # the Hub client raises many types; all mean "cannot load this id"
        if offline:  # ConnectionError: nothing cached; else a cached copy that did not load
            detail = "" if isinstance(error, ConnectionError) else first_line(error)
            raise HubUnavailable("dataset", dataset_id, offline, detail) from None
        raise MedLMError(
            f"dataset {dataset_id!r} is not a local file and could not be loaded from the "
            f"Hugging Face Hub ({type(error).__name__}): expected a Hub dataset id or a local "
            "CSV/Parquet/JSON path") from None
    if offline:
        log.info("dataset %s: from the local Hugging Face cache (the Hub is not reachable: %s)",
                 dataset_id, offline)
    return frame


def clean_frame(raw: pd.DataFrame, source: str = "dataset") -> tuple[pd.DataFrame, int]:
    """(frame, rows dropped): Name and Symptoms (any case) with whitespace runs made single and
    symptom phrases re-joined by ", ", rows whose name or symptoms are empty or punctuation alone
    dropped; duplicated names and other columns kept."""
    by_lower = {str(column).strip().lower(): column for column in raw.columns}
    missing = [name for name in REQUIRED_COLUMNS if name.lower() not in by_lower]
    if missing:
        found = ", ".join(map(str, raw.columns)) or "none"
        hint = _separator_hint(str(raw.columns[0])) if len(raw.columns) == 1 else ""
        raise MedLMError(f"dataset {source!r} has columns [{found}]: expected columns "
                         f"{' and '.join(REQUIRED_COLUMNS)} (missing {', '.join(missing)}"
                         f"{'; ' * bool(hint)}{hint})")
    if raw.empty:
        raise MedLMError(f"dataset {source!r} has a header but no rows: expected at least one "
                         "row with Name and Symptoms")
    frame = raw.rename(columns={by_lower[name.lower()]: name for name in REQUIRED_COLUMNS})
    frame["Name"] = frame["Name"].map(_as_text).map(_join_words)
    frame["Symptoms"] = frame["Symptoms"].map(lambda text: ", ".join(
        phrase for phrase in map(_join_words, _as_text(text).split(",")) if phrase))
    keep = (frame["Name"] != "") & (frame["Symptoms"] != "")
    if not keep.any():
        raise MedLMError(f"dataset {source!r} has no usable rows ({len(raw)} read, all with an "
                         "empty or punctuation-only Name or Symptoms): expected rows with "
                         "both filled in")
    return frame[keep].reset_index(drop=True), int((~keep).sum())


def _separator_hint(header: str) -> str:
    """What a file whose header holds a ``;``, tab or ``|`` most likely is, else ""."""
    separator = next((s for s in (";", "\t", "|") if s in header), None)
    if separator is None:
        return ""
    tsv = " or a file named .tsv" if separator == "\t" else ""
    return f"the header looks {separator!r}-separated, expected commas{tsv}"


def _as_text(value: object) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, list | tuple | np.ndarray):
        return ", ".join(map(str, value))
    return str(value)


def _join_words(text: str) -> str:
    """Whitespace runs made single spaces; "" where there is no letter or digit."""
    return " ".join(text.split()) if any(char.isalnum() for char in text) else ""


class LanguageDataset(Dataset):
    """Rows as ``prompts.training_texts`` words them + end-of-text, tokenized once, in batch.
    Rows over ``max_length`` tokens are truncated with a warning (and keep no end-of-text); with
    ``loss_on="completion"`` each row carries its prompt's length, left out of the loss."""

    def __init__(self, frame: pd.DataFrame, tokenizer, max_length: int | None = None,
                 loss_on: str = "full", shuffle_symptoms_seed: int | None = None,
                 prompt_format: str = "plain"):
        if tokenizer.eos_token_id is None:
            raise MedLMError("the tokenizer has no end-of-text token: expected a causal LM "
                             "tokenizer with eos_token set")
        self._tokenizer, self._prefix = tokenizer, bos_ids(tokenizer)
        self.pad_token_id = tokenizer.pad_token_id
        self._format, self._cap = prompt_format, max_length
        self._names, self._symptoms = frame["Name"].tolist(), frame["Symptoms"].tolist()
        self._shuffle_seed = shuffle_symptoms_seed
        self._encode(self._symptoms)
        self.prompt_lengths = [0] * len(self._names)
        if loss_on == "completion":  # the shared prefix, should a tokenizer merge across "|"
            prompts = encode_texts(tokenizer, prompts_for(self._names, tokenizer, prompt_format))
            self.prompt_lengths = [
                len(os.path.commonprefix([ids.tolist(), self._prefix + prompt]))
                for ids, prompt in zip(self.examples, prompts, strict=True)]
        if self.num_truncated:
            log.warning("truncated %d row(s) longer than %d tokens", self.num_truncated, self._cap)
        # next-token targets the loss counts: with none, a loss of 0 would train nothing
        self.targets = sum(length - max(1, prompt) for length, prompt in
                           zip(self.lengths, self.prompt_lengths, strict=True) if length > prompt)

    def _encode(self, symptoms: list[str]) -> None:
        texts = training_texts(self._names, symptoms, self._tokenizer, self._format)
        encoded = [self._prefix + ids for ids in encode_texts(self._tokenizer, texts)]
        if self._cap is None:  # fixed by the first encoding: an epoch's order changes no cap
            self._cap = max((len(ids) + 1 for ids in encoded), default=1)
        self.num_truncated = sum(len(ids) + 1 > self._cap for ids in encoded)
        eos = self._tokenizer.eos_token_id
        rows = [ids[:self._cap] if len(ids) + 1 > self._cap else [*ids, eos] for ids in encoded]
        self.lengths = [len(ids) for ids in rows]
        # One flat tensor split into views: far cheaper than a tensor per row.
        flat = torch.tensor([token for ids in rows for token in ids], dtype=torch.long)
        self.examples: list[torch.Tensor] = list(torch.split(flat, self.lengths)) if rows else []
        self.max_length = max(self.lengths, default=0)

    def set_epoch(self, epoch: int) -> None:
        """Symptom-order augmentation (with ``shuffle_symptoms_seed``): each row's symptoms in a
        new order drawn from (seed, epoch), so a resumed run sees the same texts."""
        if self._shuffle_seed is None:
            return
        rng = np.random.default_rng((self._shuffle_seed, epoch))
        self._encode([", ".join(rng.permutation(text.split(", ")).tolist())
                      for text in self._symptoms])

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        return {"input_ids": self.examples[index], "prompt_length": self.prompt_lengths[index]}


class CausalLMCollator:
    """Pads a batch to its longest row, padding masked out of attention and loss by the row
    lengths, not the pad id (GPT-2 pads with the end-of-text id each row must learn to write)."""

    def __init__(self, pad_token_id: int, loss_on: str = "full"):
        self.pad_token_id, self.loss_on = pad_token_id, loss_on

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        rows = [example["input_ids"] for example in examples]
        input_ids = pad_sequence(rows, batch_first=True, padding_value=self.pad_token_id)
        positions = torch.arange(input_ids.shape[1])
        attention_mask = (positions < torch.tensor([len(row) for row in rows])[:, None]).long()
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        if self.loss_on == "completion":
            prompts = torch.tensor([example.get("prompt_length", 0) for example in examples])
            labels = labels.masked_fill(positions < prompts[:, None], IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class TrainingBatchSampler(Sampler[list[int]]):
    """Random training batches, drawn anew each epoch from ``(seed, epoch)``. With
    ``group_by_length``, rows of similar length share a batch, as in Hugging Face's
    ``LengthGroupedSampler`` (padded tokens per real token: 1.03, not 1.82 at batch 8).

    Under torchrun every process draws the same batches of ``batch_size`` rows and keeps
    ``batch[shard::num_shards]``, so one optimizer step sees the rows it would in one process;
    a last batch with fewer rows than processes joins the batch before it."""

    GROUP_SIZE = 50

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 42, *,
                 group_by_length: bool = True, shard: int = 0, num_shards: int = 1):
        if num_shards > 1 and batch_size < num_shards:
            raise MedLMError(f"--batch-size {batch_size} is smaller than the {num_shards} "
                             "processes: expected at least one row per process (--batch-size "
                             "is the batch of all processes together)")
        if len(lengths) < num_shards:
            raise MedLMError(f"the training set has {len(lengths)} rows: expected at least one "
                             f"per process ({num_shards})")
        self.lengths, self.batch_size, self.seed = np.asarray(lengths), batch_size, seed
        self.group_by_length, self.shard, self.num_shards = group_by_length, shard, num_shards
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        full, rest = divmod(len(self.lengths), self.batch_size)
        return full + (rest > 0) - (full > 0 and 0 < rest < self.num_shards)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng((self.seed, self.epoch))
        self.epoch += 1
        order = rng.permutation(len(self.lengths))
        group_rows = self.batch_size * self.GROUP_SIZE
        batches: list[list[int]] = []
        for start in range(0, len(order), group_rows):
            group = order[start:start + group_rows]
            if self.group_by_length:
                group = group[np.argsort(-self.lengths[group], kind="stable")]
            batches += [group[i:i + self.batch_size].tolist()
                        for i in range(0, len(group), self.batch_size)]
        if len(batches) > 1 and len(batches[-1]) < self.num_shards:
            last = batches.pop()
            batches[-1] += last
        if self.group_by_length:
            batches = [batches[index] for index in rng.permutation(len(batches))]
        for batch in batches:
            yield batch[self.shard::self.num_shards]


def make_loader(dataset: LanguageDataset, config: TrainConfig, *, train: bool,
                pin_memory: bool = False, shard: int = 0, num_shards: int = 1) -> DataLoader:
    """Batches of ``config.batch_size`` rows of all processes together. Training: shuffled
    (``TrainingBatchSampler``). Validation: sorted by length, which changes no loss (a sum over
    tokens) but removes most padding, each process taking every ``num_shards``-th batch of its
    share of the global batch (as in training: whole ones would need more memory)."""
    collate = CausalLMCollator(dataset.pad_token_id, config.loss_on)
    if train:
        batches = TrainingBatchSampler(dataset.lengths, config.batch_size, config.seed,
                                       group_by_length=config.group_by_length, shard=shard,
                                       num_shards=num_shards)
    else:
        per_process = max(1, math.ceil(config.batch_size / num_shards))
        by_length = sorted(range(len(dataset)), key=dataset.lengths.__getitem__)
        batches = [by_length[i:i + per_process]
                   for i in range(0, len(by_length), per_process)][shard::num_shards]
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate, pin_memory=pin_memory)
