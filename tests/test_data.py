"""Data: files, label mapping, filters, seeded splits, and batches padded to their longest."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_texts

from lmprobe import ProbeDataModule, ProbeDataset
from lmprobe.data.dataset import pad_to_longest


def write(frame: pd.DataFrame, path, fmt: str):
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_reads_every_format_with_string_labels(tmp_path, tokenizer, fmt):
    texts, labels = make_texts(60)
    frame = pd.DataFrame(
        {"body": texts, "stars": ["pos" if y else "neg" for y in labels], "src": ["a", "b"] * 30}
    )
    path = tmp_path / f"data.{fmt}"
    write(frame, path, fmt)
    dm = ProbeDataModule(
        path=str(path),
        text_column="body",
        label_column="stars",
        tokenizer=tokenizer,
        test_size=0.25,
        val_size=0.25,
        seed=3,
    )
    dm.setup("fit")
    assert dm.label_names == {0: "neg", 1: "pos"}
    sizes = (len(dm.train_set), len(dm.val_set), len(dm.test_set))
    assert sizes == (30, 15, 15)
    for split in (dm.train_set, dm.val_set, dm.test_set):  # stratified
        assert abs(float(split.labels.float().mean()) - 0.5) < 0.1


def test_filters_label_map_balance_and_seeded_sample(tmp_path, tokenizer):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "text": [f"text {i}" for i in range(300)],
            "label": rng.choice(["good", "bad", "meh"], size=300, p=[0.6, 0.3, 0.1]),
        }
    )
    path = tmp_path / "d.csv"
    frame.to_csv(path, index=False)
    kwargs = dict(
        path=str(path),
        tokenizer=tokenizer,
        exclude={"label": ["meh"]},
        label_map={"bad": 0, "good": 1},
        sample_size=100,
        balance=True,
        seed=1,
    )
    a, b = ProbeDataModule(**kwargs), ProbeDataModule(**kwargs)
    a.setup(), b.setup()
    all_labels = torch.cat([a.train_set.labels, a.test_set.labels])
    assert len(all_labels) == 100 and int(all_labels.sum()) == 50
    assert a.label_names == {0: "bad", 1: "good"}
    assert torch.equal(a.train_set.input_ids, b.train_set.input_ids)  # seeded


def test_batches_are_trimmed_to_their_own_longest(tokenizer):
    texts = ["good", "the food was really quite awful and sad today"]
    for side in ("left", "right"):
        tokenizer.padding_side = side
        enc = tokenizer(texts, padding="max_length", max_length=40, return_tensors="pt")
        ds = ProbeDataset(enc["input_ids"], enc["attention_mask"], [0, 1])
        short = pad_to_longest([ds[0]])
        both = pad_to_longest([ds[0], ds[1]])
        assert short["input_ids"].shape == (1, int(enc["attention_mask"][0].sum()))
        assert both["input_ids"].shape[1] == int(enc["attention_mask"][1].sum())
        assert both["attention_mask"].sum() == enc["attention_mask"].sum()
    tokenizer.padding_side = "left"


def test_tt_split_is_seeded_and_stratified(dataset):
    a_train, a_test = dataset.tt_split(test_size=0.25, seed=2)
    b_train, b_test = dataset.tt_split(test_size=0.25, seed=2)
    assert torch.equal(a_test.input_ids, b_test.input_ids)
    assert len(a_test) == 30 and int(a_test.labels.sum()) == 15
    item = a_train[0]
    assert set(item) == {"input_ids", "attention_mask", "labels", "index"}


def test_scoring_batches_group_documents_of_similar_length(dataset):
    """Test and validation batches go longest first (less padding); every document is
    scored exactly once; training batches are grouped by length within groups of a seeded
    random order (see test_training_reference for what the probes see)."""
    module = ProbeDataModule(train_set=dataset, test_set=dataset, batch_size=8)
    module.setup("fit")
    lengths = dataset.attention_mask.sum(1)
    test_batches = list(module.test_dataloader())
    seen = torch.cat([b["index"] for b in test_batches])
    assert sorted(seen.tolist()) == list(range(len(dataset)))
    assert torch.equal(lengths[seen], lengths.sort(descending=True, stable=True).values)
    padded = sum(b["input_ids"].numel() for b in test_batches)
    train_batches = list(module.train_dataloader())
    seen = torch.cat([b["index"] for b in train_batches])
    assert sorted(seen.tolist()) == list(range(len(dataset)))
    order = np.random.default_rng(module.seed).permutation(len(dataset))
    assert sorted(seen.tolist()) == sorted(order.tolist())
    assert set(seen[:8].tolist()) <= set(order[: module.group_size].tolist())
    # a global sort pads least; length groups of the random order come close
    assert padded <= sum(b["input_ids"].numel() for b in train_batches)


def test_a_dataset_row_keeps_its_index_and_rejects_rows_past_either_end():
    """``dataset[i]`` of one row (what the DataLoader asks for) names row ``i`` in its
    ``index``, negative rows counting from the end as for a sequence."""
    n = 7
    dataset = ProbeDataset(
        torch.arange(n * 3).view(n, 3), torch.ones(n, 3, dtype=torch.long), torch.arange(n) % 2
    )
    for i in (0, 3, n - 1, -1, -n, np.int64(2)):
        item = dataset[i]
        row = range(n)[int(i)]
        assert item["index"].item() == row and item["index"].dim() == 0
        assert torch.equal(item["input_ids"], dataset.input_ids[row])
    assert dataset[[1, 4]]["index"].tolist() == [1, 4]
    assert dataset[2:5]["index"].tolist() == [2, 3, 4]
    for i in (n, -n - 1):
        with pytest.raises(IndexError, match=f"row {i} of a dataset of {n} documents"):
            dataset[i]


def test_test_texts_repeating_training_texts_are_counted_in_a_warning(tmp_path, tokenizer, caplog):
    """Issue 33, item 7: a test file that repeats training texts (3 of its 10 documents
    here), and a single file whose repeated texts fall in both splits, are warned about
    with the count and the files; distinct texts give no warning."""
    texts, labels = make_texts(40, seed=5)
    texts = [f"{i} {t}" for i, t in enumerate(texts)]  # all distinct
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    pd.DataFrame({"text": texts[:30], "label": labels[:30]}).to_csv(train, index=False)
    repeated = texts[:3] + texts[33:]
    pd.DataFrame({"text": repeated, "label": labels[:3] + labels[33:]}).to_csv(test, index=False)
    ProbeDataModule(path=str(train), test_path=str(test), tokenizer=tokenizer).setup()
    assert f"3 of the 10 test documents ({test})" in caplog.text
    assert f"training split ({train})" in caplog.text
    caplog.clear()
    pd.DataFrame({"text": texts[30:], "label": labels[30:]}).to_csv(test, index=False)
    ProbeDataModule(path=str(train), test_path=str(test), tokenizer=tokenizer).setup()
    assert "repeat a text" not in caplog.text
    # one file cut in two: every text twice, so each test text is also a training text
    # unless both copies were drawn for the test split
    single = tmp_path / "single.csv"
    pd.DataFrame({"text": texts[:20] * 2, "label": labels[:20] * 2}).to_csv(single, index=False)
    dm = ProbeDataModule(path=str(single), tokenizer=tokenizer, test_size=0.25, seed=0)
    dm.setup()
    decode = tokenizer.batch_decode
    train_texts = set(decode([dm.train_set.tokens(i) for i in range(len(dm.train_set))]))
    test_texts = decode([dm.test_set.tokens(i) for i in range(len(dm.test_set))])
    shared = sum(text in train_texts for text in test_texts)
    assert shared > 0
    assert f"{shared} of the {len(test_texts)} test documents ({single})" in caplog.text


def test_test_sentences_repeating_training_sentences_are_counted(tmp_path, tokenizer, caplog):
    from test_words import tagged_sentences, write_conllu

    sentences = tagged_sentences(30, seed=1)
    train = write_conllu(tmp_path / "train.conllu", sentences)
    test = write_conllu(tmp_path / "test.conllu", sentences[:2] + tagged_sentences(8, seed=2))
    columns = {"text_column": "form", "label_column": "upos"}
    ProbeDataModule(path=str(train), test_path=str(test), tokenizer=tokenizer, **columns).setup()
    assert f"2 of the 10 test sentences ({test})" in caplog.text


def test_a_data_source_of_frames_gives_the_splits_of_the_same_files(tmp_path, tokenizer):
    """Issue 34: every source feeds one split loader: a ``DataSource`` handing over rows from
    memory, a chunk at a time, gives the datasets, labels and dropped rows that the same rows
    written as a training and a test file give."""
    from lmprobe.data.sources import DataSource

    texts, labels = make_texts(50, seed=2)
    texts[3] = " "  # an empty text: dropped in both
    frames = {
        "train": pd.DataFrame(
            {"text": texts[:40], "label": ["pos" if y else "neg" for y in labels[:40]]}
        ),
        "test": pd.DataFrame(
            {"text": texts[40:], "label": ["pos" if y else "neg" for y in labels[40:]]}
        ),
    }

    class Frames(DataSource):
        splits = {"train": "train", "test": "test"}
        keys = {"val": "val_frame", "test": "test_frame"}

        def chunks(self, split, text_column, columns):
            frame = frames[split]
            return split, (frame.iloc[i : i + 7] for i in range(0, len(frame), 7))

    for split, frame in frames.items():
        frame.to_csv(tmp_path / f"{split}.csv", index=False)
    options = {"tokenizer": tokenizer, "val_size": 0.25, "sample_size": 30, "seed": 1}
    ours = ProbeDataModule(source=Frames(), **options)
    files = ProbeDataModule(
        path=str(tmp_path / "train.csv"), test_path=str(tmp_path / "test.csv"), **options
    )
    ours.setup()
    files.setup()
    assert ours.label_names == files.label_names == {0: "neg", 1: "pos"}
    for split in ("train_set", "val_set", "test_set"):
        a, b = getattr(ours, split), getattr(files, split)
        assert len(a) == len(b) > 0
        assert [a.tokens(i).tolist() for i in range(len(a))] == [
            b.tokens(i).tolist() for i in range(len(b))
        ]
        assert torch.equal(a.labels, b.labels)
    assert [(r["split"], r["reason"], r["rows"]) for r in ours.dropped_rows] == [
        (r["split"], r["reason"], r["rows"]) for r in files.dropped_rows
    ]
    assert ("train", "no text (empty 'text')", 1) in [
        (r["split"], r["reason"], r["rows"]) for r in ours.dropped_rows
    ]


def test_a_test_file_of_one_class_is_warned_about(tmp_path, tokenizer, caplog):
    """Issue 34: the single-class warning of a split is the split loader's, so a test file
    of one class is warned about as a test split cut from one file is."""
    texts, labels = make_texts(40, seed=3)
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    pd.DataFrame({"text": texts[:30], "label": labels[:30]}).to_csv(train, index=False)
    pd.DataFrame({"text": texts[30:], "label": [1] * 10}).to_csv(test, index=False)
    ProbeDataModule(path=str(train), test_path=str(test), tokenizer=tokenizer).setup()
    assert f"the test split of {test} has a single class" in caplog.text
    assert "the train split" not in caplog.text
