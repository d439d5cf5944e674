"""From a dataset source to batches: load, clean, tokenize once, pad per batch (the split by
disease is ``medlm.split``)."""

from __future__ import annotations

import codecs
import hashlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from medlm._paths import looks_like_local_path, sha256_file
from medlm.config import LOSS_ON
from medlm.errors import MedLMError, first_line, shorten
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
        """The local file's absolute path (``source`` as typed may be relative); None for a
        Hub dataset."""
        path = os.path.expanduser(self.source)
        return os.path.abspath(path) if self.file_sha256 is not None else None

    @property
    def content_sha256(self) -> str:
        """Hash of exactly the text the model trains on, whatever the source format."""
        text = self.frame[list(REQUIRED_COLUMNS)].to_csv(index=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_disease_data(source: str, max_samples: int | None = None) -> DiseaseData:
    """Read ``source`` (Hub dataset id or local CSV/TSV/Parquet/JSON path) and clean it."""
    raw, file_sha256 = _read_source(source)
    frame, dropped = clean_frame(raw, source)
    if dropped:
        log.warning("dropped %d of %d rows with an empty or punctuation-only Name or Symptoms",
                    dropped, len(raw))
    if max_samples is not None:
        frame = frame.head(max_samples).reset_index(drop=True)
    return DiseaseData(frame, source, len(raw), dropped, file_sha256)


def drop_long_names(data: DiseaseData, prompt_tokens: Sequence[int], most: int,
                    why: str) -> bool:
    """Drop the rows whose prompt (``prompt_tokens``, one per row) is longer than ``most``
    tokens, counted in ``dropped_rows`` and warned with their names; True if any. Meant for
    before the split, so training and held-out rows lose such a name alike: held out, its
    answer cannot be written; in training, truncation would keep the name and cut every
    symptom.
    ``why``: the limit, as the warning words it."""
    too_long = np.asarray(prompt_tokens) > most
    if not too_long.any():
        return False
    names = data.frame["Name"][too_long]
    shown = ", ".join(repr(shorten(name)) for name in names)
    log.warning("dropped %d row(s) whose disease name %s: %s", len(names), why, shown)
    data.frame = data.frame[~too_long].reset_index(drop=True)
    data.dropped_rows += len(names)
    return True


def _read_source(source: str) -> tuple[pd.DataFrame, str | None]:
    if not source.strip():
        raise MedLMError(f"dataset {source!r} is empty: expected a local CSV, Parquet or JSON "
                         "file, or a Hugging Face Hub dataset id")
    path = os.path.expanduser(source)
    if os.path.isfile(path):
        return _read_file(path), sha256_file(path)
    if os.path.isdir(path):
        raise MedLMError(f"dataset {source!r} is a directory: expected a CSV, Parquet or JSON file")
    if looks_like_local_path(source):
        raise MedLMError(f"dataset file {source!r} not found: expected a CSV, Parquet or JSON file")
    return _read_hub(source), None


def _read_file(path: str) -> pd.DataFrame:
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".parquet",):
        with open(path, "rb") as handle:
            head = handle.read(1 << 16)
        encoding = _wide_encoding(head)
        if encoding:
            raise MedLMError(f"dataset file {path!r} is {encoding} text: expected UTF-8 "
                             "(re-save it as UTF-8)")
        if b"\x00" in head:
            raise MedLMError(f"dataset file {path!r} is binary, not text (it has NUL "
                             "bytes): expected a UTF-8 CSV, Parquet or JSON file")
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix in (".json", ".jsonl"):
            return pd.read_json(path, lines=suffix == ".jsonl")
        return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", encoding="utf-8",
                           dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise MedLMError(f"dataset file {path!r} is empty: expected a header with Name and "
                         "Symptoms and at least one row") from None
    except UnicodeDecodeError:
        raise MedLMError(f"dataset file {path!r} is not UTF-8 text ({_first_bad_byte(path)}): "
                         "expected a UTF-8 CSV, Parquet or JSON file (re-save it as UTF-8)"
                         ) from None
    except (ValueError, OSError, pd.errors.ParserError) as error:
        detail = first_line(error)
        if suffix not in (".parquet", ".json", ".jsonl", ".tsv"):
            # a file separated by something else fails to parse when its rows hold different
            # numbers of commas: then its header says more than the parser does
            with open(path, encoding="utf-8", errors="replace") as handle:
                header = handle.readline()
            detail = ("," not in header and _separator_hint(header)) or detail
        raise MedLMError(f"dataset file {path!r} could not be parsed ({detail}): expected a "
                         "CSV, Parquet or JSON file") from None


def _wide_encoding(head: bytes) -> str | None:
    """"UTF-16" or "UTF-32" where the file's first bytes are such text (a spreadsheet's
    "Unicode text" export): by its byte-order mark, or without one by the NUL bytes that pad
    Latin letters to 2 or 4 bytes. Such a file would otherwise be called binary."""
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "UTF-32"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "UTF-16"
    sample = head[:4096]
    if not sample.strip(b"\x00"):
        return None
    for width, name in ((4, "UTF-32"), (2, "UTF-16")):
        units = [sample[i:i + width] for i in range(0, len(sample) - width + 1, width)]
        padding = b"\x00" * (width // 2)
        if units and (all(unit.endswith(padding) for unit in units)
                      or all(unit.startswith(padding) for unit in units)):
            return name
    return None


def _first_bad_byte(path: str) -> str:
    with open(path, "rb") as handle:
        content = handle.read()
    try:
        content.decode("utf-8")
    except UnicodeDecodeError as error:
        line = content[:error.start].count(b"\n") + 1
        return f"byte 0x{content[error.start]:02x} on line {line}"
    return "undecodable bytes"


def _read_hub(dataset_id: str) -> pd.DataFrame:
    offline = check_hub()  # before importing datasets, which reads the offline switch once
    import datasets  # slow import, only needed for Hub ids

    if not offline:
        log.info("loading dataset %s from the Hugging Face Hub (or its local cache)", dataset_id)
    try:
        frame = datasets.load_dataset(dataset_id, split="train").to_pandas()
    except Exception as error:  # the Hub client raises many types; all mean "cannot load this id"
        if offline:
            # datasets says ConnectionError when nothing is cached; anything else is a cached
            # copy that did not load, worth naming
            detail = "" if isinstance(error, ConnectionError) else first_line(error)
            raise HubUnavailable("dataset", dataset_id, offline, detail) from None
        raise MedLMError(
            f"dataset {dataset_id!r} is not a local file and could not be loaded from the "
            f"Hugging Face Hub ({type(error).__name__}): expected a Hub dataset id or a local "
            "CSV/Parquet/JSON path"
        ) from None
    if offline:
        log.info("dataset %s: from the local Hugging Face cache (the Hub is not reachable: %s)",
                 dataset_id, offline)
    return frame


def clean_frame(raw: pd.DataFrame, source: str = "dataset") -> tuple[pd.DataFrame, int]:
    """Normalize Name and Symptoms the way the seed did, drop empty rows; return (frame, dropped).

    Symptoms are split on commas, each phrase stripped, empty phrases removed and re-joined with
    ", ". A name or phrase of punctuation alone (``...``, ``-``, ``?``: a placeholder, not a
    symptom) counts as empty, so the model is not trained to write it. Duplicated disease names
    are kept (they carry different symptom lists). Other columns are kept untouched. Column
    names match case-insensitively.
    """
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
    frame = frame.copy()
    frame["Name"] = frame["Name"].map(_as_text).map(_join_words)
    frame["Symptoms"] = frame["Symptoms"].map(_as_text).map(_join_phrases)
    keep = (frame["Name"] != "") & (frame["Symptoms"] != "")
    frame = frame[keep].reset_index(drop=True)
    if frame.empty:
        raise MedLMError(f"dataset {source!r} has no usable rows ({len(raw)} read, all with an "
                         "empty or punctuation-only Name or Symptoms): expected rows with "
                         "both filled in")
    return frame, int((~keep).sum())


def _separator_hint(header: str) -> str:
    """"the header looks ';'-separated, expected commas" where a header holds a ``;``, tab or
    ``|``, else "": what a file separated by something else most likely is."""
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
    """``text`` with its whitespace runs made single spaces; "" where it has no letter or
    digit."""
    return " ".join(text.split()) if any(char.isalnum() for char in text) else ""


def _join_phrases(symptoms: str) -> str:
    phrases = (_join_words(phrase) for phrase in symptoms.split(","))
    return ", ".join(phrase for phrase in phrases if phrase)


class LanguageDataset(Dataset):
    """Rows as ``"{Name} | {Symptoms}"`` (or, with ``prompt_format="chat"``, the name and
    symptoms as a chat's two turns: medlm.prompts) + end-of-text (after the beginning-of-text
    token where the tokenizer starts texts with one), tokenized once, up front, in batch.

    ``max_length`` caps the tokens per row (pass the model's context size); longer rows are
    truncated with a warning and lose their end-of-text token, since their text did not end.
    ``self.max_length`` is then the longest example actually kept. With
    ``loss_on="completion"`` each row also carries its prompt's length, which the
    collator leaves out of the loss (another tokenizer pass, so only when asked).
    """

    def __init__(self, frame: pd.DataFrame, tokenizer, max_length: int | None = None,
                 loss_on: str = "full", shuffle_symptoms_seed: int | None = None,
                 prompt_format: str = "plain"):
        if tokenizer.eos_token_id is None:
            raise MedLMError("the tokenizer has no end-of-text token: expected a causal LM "
                             "tokenizer with eos_token set")
        self._tokenizer, self._prefix = tokenizer, bos_ids(tokenizer)
        self._format = prompt_format
        self._names, self._symptoms = frame["Name"].tolist(), frame["Symptoms"].tolist()
        self._shuffle_seed = shuffle_symptoms_seed
        self.prompt_lengths = [0] * len(self._names)
        self._cap = max_length
        self._encode(self._symptoms)
        if loss_on == "completion":
            prompts = [self._prefix + ids for ids in encode_texts(
                tokenizer, prompts_for(self._names, tokenizer, prompt_format))]
            # The shared prefix, should a tokenizer merge across the "|" boundary.
            self.prompt_lengths = [_common_prefix(ids.tolist(), prompt) for ids, prompt in
                                   zip(self.examples, prompts, strict=True)]
        if self.num_truncated:
            log.warning("truncated %d row(s) longer than %d tokens", self.num_truncated,
                        self._cap)
        # next-token targets the loss counts: none, and a loss of 0 would train nothing
        self.targets = sum(length - max(1, prompt) for length, prompt in
                           zip(self.lengths, self.prompt_lengths, strict=True) if length > prompt)

    def _encode(self, symptoms: list[str]) -> None:
        texts = training_texts(self._names, symptoms, self._tokenizer, self._format)
        encoded = [self._prefix + ids for ids in encode_texts(self._tokenizer, texts)]
        eos = self._tokenizer.eos_token_id
        if self._cap is None:  # fixed by the first encoding: an epoch's order changes no cap
            self._cap = max((len(ids) + 1 for ids in encoded), default=1)
        cap = self._cap
        self.num_truncated = sum(len(ids) + 1 > cap for ids in encoded)
        rows = [ids[:cap] if len(ids) + 1 > cap else [*ids, eos] for ids in encoded]
        self.lengths = [len(ids) for ids in rows]
        # One flat tensor split into views: far cheaper than a tensor per row.
        flat = torch.tensor([token for ids in rows for token in ids], dtype=torch.long)
        self.examples: list[torch.Tensor] = list(torch.split(flat, self.lengths)) if rows else []
        self.max_length = max(self.lengths, default=0)

    def set_epoch(self, epoch: int) -> None:
        """Symptom-order augmentation (with ``shuffle_symptoms_seed``): each row's symptoms in
        a new order for every epoch, drawn from (seed, epoch), so a resumed run sees the same
        texts. The dataset's order is arbitrary, and the scores ignore order; without this the
        model also learns which symptom comes first. The names, so the prompts, stay."""
        if self._shuffle_seed is None:
            return
        rng = np.random.default_rng((self._shuffle_seed, epoch))
        self._encode([", ".join(rng.permutation(text.split(", ")).tolist())
                      for text in self._symptoms])

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        return {"input_ids": self.examples[index], "prompt_length": self.prompt_lengths[index]}


def _common_prefix(ids: list[int], prefix: list[int]) -> int:
    length = 0
    for token, expected in zip(ids, prefix, strict=False):
        if token != expected:
            break
        length += 1
    return length


class CausalLMCollator:
    """Pads a batch to its own longest row; padding is masked out of attention and of the loss.

    The mask comes from the row lengths, not from the pad id: GPT-2 pads with its end-of-text
    id, and each row's real end-of-text token must still be learned. With
    ``loss_on="completion"`` the ``"{Name} |"`` prompt tokens are left out of the loss too, so
    the model is trained only to write symptoms.
    """

    def __init__(self, pad_token_id: int, loss_on: str = "full"):
        if loss_on not in LOSS_ON:
            raise MedLMError(f"--loss-on {loss_on!r} is invalid: expected one of "
                             f"{', '.join(LOSS_ON)}")
        self.pad_token_id = pad_token_id
        self.loss_on = loss_on

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        rows = [example["input_ids"] for example in examples]
        longest = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = row
            attention_mask[i, : len(row)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        if self.loss_on == "completion":
            for i, example in enumerate(examples):
                labels[i, : example.get("prompt_length", 0)] = IGNORE_INDEX
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class TrainingBatchSampler(Sampler[list[int]]):
    """Random training batches, drawn anew each epoch from ``(seed, epoch)``.

    With ``group_by_length`` (the default), rows of similar length share a batch, so padding
    nearly vanishes: shuffle the rows, cut them into groups of ``group_size`` batches, sort each
    group by length, cut it into batches and shuffle the batch order — the scheme of Hugging
    Face's ``LengthGroupedSampler``. On this dataset it cuts padded tokens per real token from
    1.82 (random batches of 8) to 1.03. Without it, batches are plain slices of a permutation.

    Several processes (``torchrun``): every process draws the same batches of ``batch_size``
    rows and keeps its own rows ``batch[shard::num_shards]``, so the processes see disjoint
    shards that together cover the training set every epoch, take the same number of steps, and
    one optimizer step sees the same rows as it would in a single process. A last batch with
    fewer rows than processes joins the batch before it, so no process is ever left without rows.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 42, *,
                 group_by_length: bool = True, group_size: int = 50, shard: int = 0,
                 num_shards: int = 1):
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} is not in [0, {num_shards})")
        if num_shards > 1 and batch_size < num_shards:
            raise MedLMError(f"--batch-size {batch_size} is smaller than the {num_shards} "
                             "processes: expected at least one row per process (--batch-size "
                             "is the batch of all processes together)")
        if len(lengths) < num_shards:
            raise MedLMError(f"the training set has {len(lengths)} rows: expected at least one "
                             f"per process ({num_shards})")
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.group_size = group_size
        self.shard, self.num_shards = shard, num_shards
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        full, rest = divmod(len(self.lengths), self.batch_size)
        merged = full > 0 and 0 < rest < self.num_shards
        return full + (rest > 0) - merged

    def global_batches(self) -> list[list[int]]:
        """This epoch's batches of all processes together, in training order."""
        rng = np.random.default_rng((self.seed, self.epoch))
        order = rng.permutation(len(self.lengths))
        group_rows = self.batch_size * self.group_size
        batches: list[list[int]] = []
        for start in range(0, len(order), group_rows):
            group = order[start:start + group_rows]
            if self.group_by_length:
                group = group[np.argsort(-self.lengths[group], kind="stable")]
            batches += [group[i:i + self.batch_size].tolist()
                        for i in range(0, len(group), self.batch_size)]
        if len(batches) > 1 and len(batches[-1]) < self.num_shards:
            last = batches.pop()
            batches[-1] = batches[-1] + last
        if self.group_by_length:
            batches = [batches[index] for index in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_batches()
        self.epoch += 1
        for batch in batches:
            yield batch[self.shard::self.num_shards]


def make_loader(dataset: LanguageDataset, batch_size: int, pad_token_id: int, *,
                train: bool, seed: int = 42, pin_memory: bool = False,
                group_by_length: bool = True, loss_on: str = "full", shard: int = 0,
                num_shards: int = 1) -> torch.utils.data.DataLoader:
    """Training: shuffled batches (length-grouped unless told otherwise), see
    ``TrainingBatchSampler``. Validation: sorted by length, which changes no loss (a sum over
    tokens) but removes most padding; with several processes each takes every
    ``num_shards``-th batch. ``batch_size`` is the batch of all processes together."""
    from torch.utils.data import DataLoader

    collate = CausalLMCollator(pad_token_id, loss_on)
    if train:
        sampler = TrainingBatchSampler(dataset.lengths, batch_size, seed,
                                       group_by_length=group_by_length, shard=shard,
                                       num_shards=num_shards)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                          pin_memory=pin_memory)
    # each process's validation batch is its share of the global batch, as in training (whole
    # global batches per process would need num_shards times the memory at epoch end)
    per_process = max(1, math.ceil(batch_size / num_shards))
    by_length = sorted(range(len(dataset)), key=dataset.lengths.__getitem__)
    batches = [by_length[i:i + per_process] for i in range(0, len(by_length), per_process)]
    return DataLoader(dataset, batch_sampler=batches[shard::num_shards], collate_fn=collate,
                      pin_memory=pin_memory)
