import logging
import re

import numpy as np
import pandas as pd
import pytest
import torch

from medlm.config import TrainConfig
from medlm.data import (
    IGNORE_INDEX,
    CausalLMCollator,
    LanguageDataset,
    TrainingBatchSampler,
    clean_frame,
    load_disease_data,
    make_loader,
)
from medlm.errors import MedLMError
from medlm.prompts import prompt_for
from medlm.split import split_by_disease, split_fold


def test_loads_the_real_dataset_keeping_duplicates_and_other_columns(dataset_csv):
    data = load_disease_data(str(dataset_csv))
    assert len(data.frame) == 400 and data.raw_rows == 400 and data.dropped_rows == 0
    assert (data.frame["Name"] == "Sciatica").sum() == 3
    assert {"Code", "Treatments"} <= set(data.frame.columns)
    assert "Sjögren's syndrome" in set(data.frame["Name"])
    assert data.file_sha256 == "6313d3f0537cf6e143d5a60cb47ab8892258797674fcaca2e9c64050ed709f7f"
    assert not data.frame["Name"].str.contains(r"^\s|\s$").any()


def test_cleaning_strips_rejoins_and_counts_dropped_rows():
    raw = pd.DataFrame({
        "name": ["  Flu ", "Empty", "", "Cold"],
        "SYMPTOMS": ["Fever ,cough,,  sore   throat ", " , ", "Headache", "Sneezing"],
        "Extra": [1, 2, 3, 4],
    })
    frame, dropped = clean_frame(raw)
    assert dropped == 2
    assert frame["Name"].tolist() == ["Flu", "Cold"]
    assert frame["Symptoms"].tolist() == ["Fever, cough, sore throat", "Sneezing"]
    assert frame["Extra"].tolist() == [1, 4]


def test_dropped_rows_are_reported(tmp_path, caplog):
    path = tmp_path / "d.csv"
    path.write_text("Name,Symptoms\nFlu,Fever\n,Cough\nCold,\nAsthma,Wheezing\n")
    with caplog.at_level(logging.WARNING):
        data = load_disease_data(str(path))
    assert data.dropped_rows == 2 and len(data.frame) == 2
    assert "dropped 2 of 4 rows" in caplog.text


@pytest.mark.parametrize("suffix", [".parquet", ".json", ".jsonl"])
def test_reads_other_local_formats(tmp_path, suffix):
    frame = pd.DataFrame({"Name": ["Flu", "Cold"], "Symptoms": ["Fever, Cough", "Sneezing"]})
    path = tmp_path / f"d{suffix}"
    if suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_json(path, orient="records", lines=suffix == ".jsonl")
    assert load_disease_data(str(path)).frame["Symptoms"].tolist() == ["Fever, Cough",
                                                                       "Sneezing"]


def test_max_samples_keeps_the_first_rows(dataset_csv):
    full = load_disease_data(str(dataset_csv)).frame
    head = load_disease_data(str(dataset_csv), max_samples=25).frame
    assert head["Name"].tolist() == full["Name"].head(25).tolist()


@pytest.mark.parametrize("content,expected", [
    ("", "is empty"),
    ("Disease,Signs\nFlu,Fever\n", "expected columns Name and Symptoms"),
    ("Name,Symptoms\n,\n", "no usable rows"),
])
def test_bad_files_give_one_line_errors(tmp_path, content, expected):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(MedLMError, match=expected) as error:
        load_disease_data(str(path))
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_tab_separated_file_named_csv_gets_the_tab_hint(tmp_path, dataset_csv):
    """Before: the CSV parser's "Expected 8 fields in line 5, saw 12", with no word of tabs."""
    path = tmp_path / "diseases.csv"
    pd.read_csv(dataset_csv, dtype=str).to_csv(path, sep="\t", index=False)
    with pytest.raises(MedLMError, match=re.escape("the header looks '\\t'-separated, expected "
                                                   "commas")) as error:
        load_disease_data(str(path))
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    assert ".tsv" in str(error.value)


@pytest.mark.parametrize("encoding,expected", [
    ("utf-16", "UTF-16"), ("utf-16-le", "UTF-16"), ("utf-16-be", "UTF-16"),
    ("utf-32", "UTF-32"), ("utf-32-le", "UTF-32"),
])
def test_utf16_and_utf32_files_are_named_by_their_encoding(tmp_path, dataset_csv, encoding,
                                                           expected):
    """Before: "is binary, not text (it has NUL bytes)", which a spreadsheet's "Unicode text"
    export is not."""
    path = tmp_path / "diseases.csv"
    path.write_text(dataset_csv.read_text(encoding="utf-8"), encoding=encoding)
    with pytest.raises(MedLMError) as error:
        load_disease_data(str(path))
    message = str(error.value)
    assert f"is {expected} text: expected UTF-8" in message and "re-save it as UTF-8" in message
    assert str(path) in message and "\n" not in message and "binary" not in message


def test_punctuation_only_names_and_symptoms_are_dropped_and_counted(tmp_path, caplog):
    path = tmp_path / "d.csv"
    path.write_text('Name,Symptoms\nFlu,"Fever, ..., cough, -"\nCold,...\nAsthma,-\nGout, ? \n'
                    '"?!",Rash\n--,Itching\nMigraine,Headache\n')
    with caplog.at_level(logging.WARNING):
        data = load_disease_data(str(path))
    assert data.frame["Name"].tolist() == ["Flu", "Migraine"]
    assert data.frame["Symptoms"].tolist() == ["Fever, cough", "Headache"]
    assert data.dropped_rows == 5
    assert "dropped 5 of 7 rows" in caplog.text and "punctuation" in caplog.text


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_file_this_user_may_not_read_is_one_line(tmp_path, monkeypatch, suffix):
    import builtins

    path = tmp_path / f"d{suffix}"
    path.write_bytes(b"Name,Symptoms\nFlu,Fever\n")
    real_open = builtins.open

    def denied(file, *args, **kwargs):  # as chmod 000 does, also for root
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denied)
    with pytest.raises(MedLMError, match=r"cannot be read \(Permission denied\): expected a "
                                         "file this user may read"):
        load_disease_data(str(path))


def test_missing_file_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(MedLMError, match="not found"):
        load_disease_data(str(tmp_path / "nope.csv"))
    with pytest.raises(MedLMError, match="not found"):
        load_disease_data("./data/nope")


def test_split_is_grouped_by_disease_seeded_and_about_80_20(dataset_csv):
    frame = load_disease_data(str(dataset_csv)).frame
    split = split_by_disease(frame, 0.2, seed=42)
    train, validation = split.train, split.validation
    assert len(train) + len(validation) == len(frame)
    assert not set(train["Name"].str.casefold()) & set(validation["Name"].str.casefold())
    assert 0.15 < len(validation) / len(frame) < 0.25
    again_validation = split_by_disease(frame, 0.2, seed=42).validation
    assert again_validation["Name"].tolist() == validation["Name"].tolist()
    other_validation = split_by_disease(frame, 0.2, seed=7).validation
    assert other_validation["Name"].tolist() != validation["Name"].tolist()


def test_folds_hold_out_every_disease_once_in_even_seeded_folds_of_whole_groups(dataset_csv):
    frame = load_disease_data(str(dataset_csv)).frame
    folds = [split_fold(frame, 5, fold, seed=42) for fold in range(5)]
    held_out = [set(split.validation["Name"].str.casefold()) for split in folds]
    names = set(frame["Name"].str.casefold())
    assert set().union(*held_out) == names and sum(map(len, held_out)) == len(names)
    for split, names_out in zip(folds, held_out, strict=True):
        assert len(split.train) + len(split.validation) == len(frame)
        assert not set(split.train["Name"].str.casefold()) & names_out
        for group in split.groups:  # no group on both sides
            assert set(group) <= names_out or not set(group) & names_out
    largest_group = max(map(len, folds[0].groups))
    assert max(map(len, held_out)) - min(map(len, held_out)) <= largest_group
    assert split_fold(frame, 5, 2, seed=42).validation.equals(folds[2].validation)
    assert not split_fold(frame, 5, 2, seed=7).validation.equals(folds[2].validation)
    small = pd.DataFrame({"Name": ["Flu", "Cold", "Gout"], "Symptoms": ["a", "b", "c"]})
    with pytest.raises(MedLMError, match=r"--folds 4 is invalid .* 3 groups: expected at most 3"):
        split_fold(small, 4, 0)


def test_split_keeps_case_variants_of_a_name_together():
    frame = pd.DataFrame({"Name": ["Flu", "flu", "Cold", "Asthma", "Gout"],
                          "Symptoms": ["a", "b", "c", "d", "e"]})
    for seed in range(10):
        split = split_by_disease(frame, 0.5, seed)
        train, validation = split.train, split.validation
        assert {"Flu", "flu"} <= set(train["Name"]) or {"Flu", "flu"} <= set(validation["Name"])


def test_a_single_disease_cannot_be_split():
    frame = pd.DataFrame({"Name": ["Flu", "Flu"], "Symptoms": ["a", "b"]})
    with pytest.raises(MedLMError, match="at least 2 distinct"):
        split_by_disease(frame)
    variants = pd.DataFrame({"Name": ["Otitis Media", "Acute Otitis Media"],
                             "Symptoms": ["a", "b"]})
    with pytest.raises(MedLMError, match=r"\(otitis media, acute otitis media\) form one group"):
        split_by_disease(variants)


def _words(name: str) -> str:
    return " " + " ".join(re.sub(r"[^\w]+", " ", name.casefold()).split()) + " "


@pytest.mark.parametrize("seed", [0, 1, 7, 42, 1234])
def test_no_validation_name_is_contained_in_a_training_name(dataset_csv, seed):
    frame = load_disease_data(str(dataset_csv)).frame
    split = split_by_disease(frame, 0.2, seed)
    train = {_words(name) for name in split.train["Name"]}
    validation = {_words(name) for name in split.validation["Name"]}
    assert not [(v, t) for v in validation for t in train if v in t or t in v]
    assert 70 <= len(validation) <= 80  # about 20% of the 392 distinct names


def test_variants_and_shared_head_terms_stay_on_one_side(dataset_csv):
    frame = load_disease_data(str(dataset_csv)).frame
    families = [{"otitis media", "acute otitis media", "chronic otitis media"},
                {"rheumatoid arthritis", "juvenile rheumatoid arthritis", "arthritis"},
                {"type 1 diabetes", "type 2 diabetes", "gestational diabetes"},
                {"complex regional pain syndrome", "complex regional pain syndrome (crps)"},
                {"kidney stone", "urinary stones (kidney stones)"},
                {"warthin tumor", "pleomorphic adenoma"}]  # identical symptom lists
    for seed in range(20):
        split = split_by_disease(frame, 0.2, seed)
        validation = set(split.validation["Name"].str.casefold())
        for family in families:
            assert family <= validation or not family & validation, (seed, family)
    assert split.grouped_names == sum(len(group) for group in split.groups if len(group) > 1)
    assert split.grouped_names >= sum(len(family) for family in families)


def test_head_terms_group_names_but_generic_heads_and_word_parts_do_not():
    frame = pd.DataFrame({"Name": ["Heart Failure", "Kidney Failure", "Chronic Kidney Disease",
                                   "Huntington Disease", "Osteoarthritis", "Arthritis"],
                          "Symptoms": ["a", "b", "c", "d", "e", "f"]})
    groups = split_by_disease(frame, 0.5, 0).groups
    assert ["heart failure", "kidney failure"] in groups  # same head term: failure
    assert ["chronic kidney disease"] in groups and ["huntington disease"] in groups
    assert ["osteoarthritis"] in groups  # whole words only


def test_each_prompt_is_labelled_by_its_side(dataset_csv):
    split = split_by_disease(load_disease_data(str(dataset_csv)).frame, 0.2, 42)
    held_out = split.validation["Name"].iloc[0]
    assert split.side(held_out.upper()) == "held out"
    assert split.side(split.train["Name"].iloc[0]) == "seen in training"
    assert split.side("Kidney Failure") == "seen in training"  # the showcase, at seed 42
    assert split.side("Dragon Pox") == "not in the dataset"


def test_prompt_is_name_and_separator():
    assert prompt_for("Kidney Failure") == "Kidney Failure |"
    assert prompt_for(" Kidney Failure | ") == "Kidney Failure |"


def test_language_dataset_text_ends_with_end_of_text(gpt2_tokenizer):
    frame = pd.DataFrame({"Name": ["Flu"], "Symptoms": ["Fever, Cough"]})
    dataset = LanguageDataset(frame, gpt2_tokenizer)
    ids = dataset[0]["input_ids"]
    assert gpt2_tokenizer.decode(ids) == "Flu | Fever, Cough<|endoftext|>"
    assert ids[-1].item() == gpt2_tokenizer.eos_token_id


def test_max_length_is_the_longest_example_not_a_fixed_128(dataset_csv, gpt2_tokenizer):
    frame = load_disease_data(str(dataset_csv)).frame
    dataset = LanguageDataset(frame, gpt2_tokenizer, max_length=1024)
    longest = max(len(gpt2_tokenizer(name + " | " + symptoms)["input_ids"]) + 1
                  for name, symptoms in zip(frame["Name"], frame["Symptoms"], strict=True))
    assert dataset.max_length == longest != 128
    assert dataset.num_truncated == 0


def test_long_rows_are_truncated_with_a_warning(gpt2_tokenizer, caplog):
    frame = pd.DataFrame({"Name": ["Flu", "Long"],
                          "Symptoms": ["Fever", ", ".join(["persistent cough"] * 50)]})
    with caplog.at_level(logging.WARNING):
        dataset = LanguageDataset(frame, gpt2_tokenizer, max_length=16)
    assert dataset.num_truncated == 1 and dataset.max_length == 16
    assert len(dataset[1]["input_ids"]) == 16
    assert dataset[0]["input_ids"][-1].item() == gpt2_tokenizer.eos_token_id
    assert "truncated 1 row" in caplog.text


def test_collator_pads_to_the_batch_longest_and_masks_padding_from_the_loss(gpt2_tokenizer):
    eos = gpt2_tokenizer.eos_token_id
    collate = CausalLMCollator(pad_token_id=eos)
    batch = collate([{"input_ids": torch.tensor([5, 6, 7, eos])},
                     {"input_ids": torch.tensor([8, eos])}])
    assert batch["input_ids"].shape == (2, 4)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7, eos], [8, eos, IGNORE_INDEX, IGNORE_INDEX]]


def test_hub_loader_reads_a_dataset_repository(tmp_path, dataset_csv):
    """The code path for Hub ids (datasets.load_dataset), on a local repository layout."""
    from medlm.data import _read_hub, clean_frame

    repository = tmp_path / "Diseases_Symptoms"
    (repository / "data").mkdir(parents=True)
    (repository / "data" / "train.csv").write_bytes(dataset_csv.read_bytes())
    frame, dropped = clean_frame(_read_hub(str(repository)))
    assert len(frame) == 400 and dropped == 0
    assert {"Name", "Symptoms", "Treatments"} <= set(frame.columns)


def padding_ratio(loader) -> float:
    padded = real = 0
    for batch in loader:
        padded += batch["attention_mask"].numel()
        real += int(batch["attention_mask"].sum())
    return padded / real


def test_length_grouped_batches_cover_every_row_once_and_cut_padding(dataset_csv,
                                                                    gpt2_tokenizer):
    frame = load_disease_data(str(dataset_csv)).frame
    dataset = LanguageDataset(frame, gpt2_tokenizer)
    sampler = TrainingBatchSampler(dataset.lengths, batch_size=8, seed=1)
    first, second = list(sampler), list(sampler)
    for epoch in (first, second):
        assert sorted(i for batch in epoch for i in batch) == list(range(len(dataset)))
        assert len(epoch) == len(sampler) == 50
    assert first != second  # a new order every epoch
    sampler.set_epoch(0)
    assert list(sampler) == first  # and a repeatable one
    grouped = make_loader(dataset, TrainConfig(seed=1), train=True)
    plain = make_loader(dataset, TrainConfig(seed=1, group_by_length=False), train=True)
    assert padding_ratio(grouped) < 1.1 < 1.5 < padding_ratio(plain)


@pytest.mark.parametrize("group_by_length", [True, False])
@pytest.mark.parametrize("num_rows,batch_size,num_shards", [(320, 8, 2), (101, 8, 3), (21, 4, 3)])
def test_processes_train_on_disjoint_shards_that_cover_the_training_set(
        group_by_length, num_rows, batch_size, num_shards):
    lengths = np.random.default_rng(0).integers(5, 90, num_rows)
    single = TrainingBatchSampler(lengths, batch_size, seed=3, group_by_length=group_by_length)
    shards = [TrainingBatchSampler(lengths, batch_size, seed=3, group_by_length=group_by_length,
                                   shard=shard, num_shards=num_shards)
              for shard in range(num_shards)]
    for epoch in range(3):
        for sampler in (single, *shards):
            sampler.set_epoch(epoch)
        per_shard = [list(sampler) for sampler in shards]
        assert len({len(batches) for batches in per_shard}) == 1  # same number of steps
        assert len(per_shard[0]) == len(shards[0])
        rows = [row for batches in per_shard for batch in batches for row in batch]
        assert sorted(rows) == list(range(num_rows))  # disjoint, and together every row
        assert all(batch for batches in per_shard for batch in batches)  # none left idle
        steps = [sorted(sum(step, [])) for step in zip(*per_shard, strict=True)]
        if 0 < num_rows % batch_size < num_shards:  # the short last batch joined another
            assert len(steps) == len(single) - 1
        else:  # an optimizer step sees the rows a single process's step would
            assert steps == [sorted(batch) for batch in single]


def test_a_batch_smaller_than_the_process_count_is_refused():
    with pytest.raises(MedLMError, match="--batch-size 2 is smaller than the 4 processes"):
        TrainingBatchSampler([5] * 40, batch_size=2, shard=0, num_shards=4)


def test_validation_loader_sorts_by_length_and_keeps_every_row(dataset_csv, gpt2_tokenizer):
    frame = load_disease_data(str(dataset_csv), max_samples=50).frame
    dataset = LanguageDataset(frame, gpt2_tokenizer)
    loader = make_loader(dataset, TrainConfig(batch_size=8), train=False)
    widths = [batch["input_ids"].shape[1] for batch in loader]
    assert widths == sorted(widths)
    assert sum(len(batch["input_ids"]) for batch in loader) == 50


def test_batch_tokenization_matches_the_tokenizers_own_encoding(dataset_csv, gpt2_tokenizer):
    frame = load_disease_data(str(dataset_csv)).frame
    dataset = LanguageDataset(frame, gpt2_tokenizer)
    texts = (frame["Name"] + " | " + frame["Symptoms"]).tolist()
    expected = gpt2_tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = gpt2_tokenizer.eos_token_id
    assert [dataset[i]["input_ids"].tolist() for i in range(len(dataset))] == [
        [*ids, eos] for ids in expected]


def test_tokenization_ignores_padding_left_on_the_tokenizer_by_other_calls(gpt2_tokenizer):
    frame = pd.DataFrame({"Name": ["Flu"], "Symptoms": ["Fever"]})
    gpt2_tokenizer("warm", max_length=128, padding="max_length", truncation=True)
    padding_before = gpt2_tokenizer.backend_tokenizer.padding
    dataset = LanguageDataset(frame, gpt2_tokenizer)
    assert gpt2_tokenizer.decode(dataset[0]["input_ids"]) == "Flu | Fever<|endoftext|>"
    assert gpt2_tokenizer.backend_tokenizer.padding == padding_before


def test_completion_loss_masks_the_name_prompt(gpt2_tokenizer):
    frame = pd.DataFrame({"Name": ["Kidney Failure", "Flu"], "Symptoms": ["Fatigue", "Fever"]})
    dataset = LanguageDataset(frame, gpt2_tokenizer, loss_on="completion")
    prompt = gpt2_tokenizer("Kidney Failure |")["input_ids"]
    assert dataset.prompt_lengths[0] == len(prompt)
    assert dataset[0]["input_ids"][: len(prompt)].tolist() == prompt
    full = CausalLMCollator(gpt2_tokenizer.eos_token_id)([dataset[0], dataset[1]])
    completion = CausalLMCollator(gpt2_tokenizer.eos_token_id, "completion")([dataset[0],
                                                                            dataset[1]])
    assert (full["labels"][0, : len(prompt)] != IGNORE_INDEX).all()
    assert (completion["labels"][0, : len(prompt)] == IGNORE_INDEX).all()
    symptoms = completion["labels"][0][completion["labels"][0] != IGNORE_INDEX]
    assert gpt2_tokenizer.decode(symptoms) == " Fatigue<|endoftext|>"
    assert torch.equal(full["input_ids"], completion["input_ids"])


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_each_process_validates_its_share_of_the_global_batch(gpt2_tokenizer, dataset_csv,
                                                              num_shards):
    """Under torchrun each process's validation batch is batch_size / processes rows, as in
    training (before: whole global batches on every process), and together they cover every
    validation row once."""
    from medlm.data import LanguageDataset, make_loader

    frame = load_disease_data(str(dataset_csv), 50).frame
    dataset = LanguageDataset(frame, gpt2_tokenizer)
    seen = []
    for shard in range(num_shards):
        loader = make_loader(dataset, TrainConfig(batch_size=8), train=False, shard=shard,
                             num_shards=num_shards)
        for batch in loader:
            assert len(batch["input_ids"]) <= -(-8 // num_shards)
        seen += [index for batch in loader.batch_sampler for index in batch]
    assert sorted(seen) == list(range(len(dataset)))


def test_shuffled_symptoms_are_a_new_order_each_epoch_of_the_same_symptoms(gpt2_tokenizer):
    frame = pd.DataFrame({"Name": ["Flu", "Asthma"],
                          "Symptoms": ["fever, cough, sore throat, body aches, chills",
                                       "wheezing, shortness of breath, chest tightness"]})

    def texts(dataset):
        return [gpt2_tokenizer.decode(ids) for ids in dataset.examples]

    plain = LanguageDataset(frame, gpt2_tokenizer)
    original = texts(plain)
    plain.set_epoch(3)
    assert texts(plain) == original  # no augmentation unless asked
    shuffled = LanguageDataset(frame, gpt2_tokenizer, shuffle_symptoms_seed=5)
    orders = []
    for epoch in range(4):
        shuffled.set_epoch(epoch)
        orders.append(texts(shuffled))
    assert len({tuple(order) for order in orders}) > 1
    for order in orders:
        for text, reference in zip(order, original, strict=True):
            name, symptoms = text.removesuffix("<|endoftext|>").split(" | ")
            assert name == reference.split(" | ")[0]
            assert sorted(symptoms.split(", ")) == sorted(
                reference.removesuffix("<|endoftext|>").split(" | ")[1].split(", "))
    again = LanguageDataset(frame, gpt2_tokenizer, shuffle_symptoms_seed=5)
    again.set_epoch(2)
    assert texts(again) == orders[2]  # from (seed, epoch): a resumed run sees the same texts
