"""Data read a chunk at a time (``lmprobe.data.streaming``, ``lmprobe.data.packed``): the rows chosen
and the batches the model sees are those of the whole-file pipeline (``read_table`` ->
``prepare_frame`` -> ``tokenize_texts`` -> ``ProbeDataset``), whatever the chunk size."""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_texts

from lmprobe import ProbeDataModule, ProbeDataset
from lmprobe.data import readers as readers_module
from lmprobe.data.dataset import batches, split_indices
from lmprobe.data.packed import PackedDataset
from lmprobe.data.readers import prepare_frame, read_chunks, read_table
from lmprobe.data.streaming import effective_max_length, ensure_pad_token
from lmprobe.errors import LmProbeError


def tokenize_texts(
    tokenizer: Any, texts: Sequence[str], max_length: int | None, model_max: int | None = None
) -> dict[str, torch.Tensor]:
    """The whole-file reference: every text tokenized at once, padded to the longest."""
    ensure_pad_token(tokenizer)
    max_length = effective_max_length(max_length, model_max)
    return tokenizer(
        list(texts),
        padding=True,
        truncation=max_length is not None,
        max_length=max_length,
        return_tensors="pt",
    )


def messy_frame(n: int = 240) -> pd.DataFrame:
    """Three labels, a filter column, missing and blank texts, missing labels."""
    texts, _ = make_texts(n, seed=7)
    rng = np.random.default_rng(5)
    frame = pd.DataFrame(
        {
            "text": texts,
            "label": rng.choice(["good", "bad", "meh"], size=n, p=[0.5, 0.35, 0.15]),
            "src": rng.choice(["a", "b", "c"], size=n),
        }
    )
    frame.loc[[i for i in (3, 50, 121) if i < n], "text"] = None
    frame.loc[[i for i in (7, 99) if i < n], "text"] = "   "
    frame.loc[[i for i in (11, 200) if i < n], "label"] = None
    return frame


def write(frame: pd.DataFrame, path, fmt: str) -> None:
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)


def reference_splits(path, tokenizer, options: dict, test_size: float, seed: int):
    """The whole-file pipeline: every row in memory, tokenized at once, padded to the longest."""
    dropped: list[dict] = []
    frame, names = prepare_frame(
        read_table(str(path)),
        "text",
        "label",
        options.get("label_map"),
        options.get("exclude"),
        options.get("include"),
        options.get("sample_size"),
        options.get("balance", False),
        seed,
        source=f"data file {str(path)!r}",
        dropped=dropped,
    )
    enc = tokenize_texts(tokenizer, frame["text"].astype(str).tolist(), options.get("max_length"))
    labels = frame["_label"].to_numpy()
    full = ProbeDataset(enc["input_ids"], enc["attention_mask"], labels, names)
    train, test = split_indices(len(frame), test_size, seed, labels)
    return full.subset(train), full.subset(test), names, dropped


def assert_same_batches(ours, theirs) -> None:
    ours, theirs = list(ours), list(theirs)
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_streamed_batches_equal_the_whole_file_pipeline(
    tmp_path, tokenizer, monkeypatch, fmt, side
):
    tokenizer.padding_side = side
    path = tmp_path / f"d.{fmt}"
    write(messy_frame(), path, fmt)
    options = dict(
        exclude={"src": ["c"]},
        label_map={"bad": 0, "good": 1, "meh": 2},
        sample_size=90,
        balance=True,
        max_length=9,  # some texts are cut
    )
    ref_train, ref_test, names, dropped = reference_splits(path, tokenizer, options, 0.25, seed=4)
    monkeypatch.setattr(readers_module, "CHUNK_ROWS", 7)  # many chunks, a short last one
    dm = ProbeDataModule(
        path=str(path), tokenizer=tokenizer, test_size=0.25, seed=4, batch_size=8, **options
    )
    dm.setup("fit")
    assert isinstance(dm.train_set, PackedDataset)
    assert dm.label_names == names
    assert torch.equal(dm.train_set.labels, ref_train.labels)
    assert (dm.train_set.lengths == ref_train.lengths).all()
    assert_same_batches(
        dm.train_dataloader(), batches(ref_train, 8, seed=4, group_size=dm.group_size)
    )
    assert_same_batches(dm.test_dataloader(), batches(ref_test, 8, by_length=True))
    # the dense view pads like the tokenizer (to this split's longest)
    trimmed = [
        (row[mask.bool()])
        for row, mask in zip(ref_test.input_ids, ref_test.attention_mask, strict=True)
    ]
    dense = [
        row[mask.bool()]
        for row, mask in zip(dm.test_set.input_ids, dm.test_set.attention_mask, strict=True)
    ]
    assert all(torch.equal(a, b) for a, b in zip(trimmed, dense, strict=True))
    # the rows left out, and why, are those of the whole-file pipeline
    assert {r["reason"] for r in dropped} >= {"no text (empty 'text')", "data.balance=true"}
    assert dm.dropped_rows == [{"split": "all", **record} for record in dropped]


def test_chunked_readers_give_the_rows_of_the_whole_file(tmp_path, monkeypatch):
    frame = messy_frame(50)
    for fmt in ("csv", "jsonl", "parquet"):
        path = tmp_path / f"d.{fmt}"
        write(frame, path, fmt)
        whole = read_table(str(path))
        pieces = list(read_chunks(str(path), rows=6))
        assert [len(p) for p in pieces] == [6] * 8 + [2]
        pd.testing.assert_frame_equal(pd.concat(pieces, ignore_index=True), whole)


def test_a_jsonl_key_missing_from_the_first_chunk_is_still_found(tmp_path, tokenizer, monkeypatch):
    rows = [{"text": f"good day {i}", "label": i % 2} for i in range(20)]
    for row in rows[10:]:
        row["src"] = "x" if row["label"] else "y"
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    monkeypatch.setattr(readers_module, "CHUNK_ROWS", 4)
    dm = ProbeDataModule(path=str(path), tokenizer=tokenizer, include={"src": ["x", "y"]})
    dm.setup()
    assert len(dm.train_set) + len(dm.test_set) == 10
    bad = ProbeDataModule(path=str(path), tokenizer=tokenizer, include={"source": ["x"]})
    with pytest.raises(LmProbeError, match="has no column 'source'.*text, label, src"):
        bad.setup()


def test_a_decoding_error_in_a_later_chunk_names_its_line(tmp_path, monkeypatch):
    path = tmp_path / "d.csv"
    lines = ["text,label"] + [f"good {i},1" for i in range(30)]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"caf\xe9,0\n")
    with pytest.raises(LmProbeError, match=r"line 32 of .* not valid utf-8"):
        list(read_chunks(str(path), rows=4))


def test_packed_items_and_pickling(tmp_path, tokenizer, monkeypatch):
    """Workers get the dataset pickled (spawn) or forked: both read the same tokens."""
    path = tmp_path / "d.csv"
    texts, labels = make_texts(30)
    pd.DataFrame({"text": texts, "label": labels}).to_csv(path, index=False)
    dm = ProbeDataModule(path=str(path), tokenizer=tokenizer, test_size=0.2)
    dm.setup()
    data = dm.train_set
    copy = pickle.loads(pickle.dumps(data))
    for row in (0, 5, len(data) - 1, -1):
        assert torch.equal(copy[row]["input_ids"], data[row]["input_ids"])
    assert int(data[-1]["index"]) == len(data) - 1
    with pytest.raises(IndexError):
        data[len(data)]
    expected = {tuple(ids) for ids in tokenizer(texts)["input_ids"]}
    assert {tuple(data.tokens(i).tolist()) for i in range(len(data))} <= expected
    assert_same_batches(
        batches(data, 4, num_workers=2, seed=1), batches(copy, 4, num_workers=0, seed=1)
    )
