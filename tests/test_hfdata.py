"""Hugging Face datasets (``data=hf``, ``lmprobe.data.hf``), offline: a dataset saved to disk
in the test gives exactly what the same rows give as CSV files, through the data module and
through the whole app."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_texts
from test_app import compose_cfg
from test_streaming import assert_same_batches

from lmprobe import ProbeDataModule
from lmprobe.app.job import build, train
from lmprobe.app.schema import check_config
from lmprobe.data import readers as readers_module
from lmprobe.data.hf import HFDataModule
from lmprobe.errors import LmProbeError

datasets = pytest.importorskip("datasets")

NAMES = ["negative", "positive"]


def split_rows(n: int, seed: int) -> dict[str, list]:
    texts, labels = make_texts(n, seed=seed)
    labels = list(labels)
    labels[4] = -1  # ClassLabel's "no label"
    return {"text": texts, "label": labels, "src": ["a", "b", "c"] * (n // 3) + ["a"] * (n % 3)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The same two splits as a DatasetDict saved to disk and as two CSV files."""
    root = tmp_path_factory.mktemp("hf")
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=NAMES),
            "src": datasets.Value("string"),
        }
    )
    rows = {"train": split_rows(150, seed=1), "test": split_rows(60, seed=2)}
    dataset = datasets.DatasetDict(
        {split: datasets.Dataset.from_dict(r, features=features) for split, r in rows.items()}
    )
    dataset.save_to_disk(str(root / "saved"))
    files = {}
    for split, r in rows.items():
        frame = pd.DataFrame(r).assign(label=[NAMES[v] if v >= 0 else None for v in r["label"]])
        files[split] = root / f"{split}.csv"
        frame.to_csv(files[split], index=False)
    return root / "saved", files


def test_a_saved_dataset_gives_the_rows_of_the_same_csv_files(saved, tokenizer, monkeypatch):
    directory, files = saved
    monkeypatch.setattr(readers_module, "CHUNK_ROWS", 16)  # ClassLabel names chunk by chunk
    options = dict(tokenizer=tokenizer, exclude={"src": ["c"]}, sample_size=80, seed=3)
    ours = HFDataModule(name=str(directory), split="train", test_split="test", **options)
    theirs = ProbeDataModule(path=str(files["train"]), test_path=str(files["test"]), **options)
    ours.setup(), theirs.setup()
    assert ours.label_names == theirs.label_names == {0: "negative", 1: "positive"}
    for split in ("train_set", "test_set"):
        a, b = getattr(ours, split), getattr(theirs, split)
        assert torch.equal(a.labels, b.labels)
        assert_same_batches(
            torch.utils.data.DataLoader(a, batch_size=8, collate_fn=a.collate),
            torch.utils.data.DataLoader(b, batch_size=8, collate_fn=b.collate),
        )
    # the -1 label is a row with no label, left out and recorded as in the CSV
    reasons = [(r["split"], r["reason"], r["rows"]) for r in ours.dropped_rows]
    assert ("train", "no label (empty 'label')", 1) in reasons
    assert [r[1:] for r in reasons] == [(r["reason"], r["rows"]) for r in theirs.dropped_rows]


def test_data_hf_in_the_app_writes_the_metrics_of_the_csv_run(saved, tmp_path, tiny_model_dir):
    directory, files = saved
    common = [
        "probes=gpt2_layers",
        f"model.name_or_path={tiny_model_dir}",
        "model.device=cpu",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "logger=none",
        "data.batch_size=8",
    ]
    tables = {}
    for name, data in {
        "hf": ["data=hf", f"data.name={directory}", "data.test_split=test"],
        "csv": ["data=csv", f"data.path={files['train']}", f"data.test_path={files['test']}"],
    }.items():
        run = tmp_path / name
        train(compose_cfg(run, [*common, *data]))
        tables[name] = pd.read_csv(run / "metrics.csv", index_col="probe")
    assert len(tables["hf"]) == 12
    pd.testing.assert_frame_equal(tables["hf"], tables["csv"], check_exact=True)


def test_data_imdb_is_the_hub_dataset_and_offline_says_what_to_do(tmp_path, tokenizer):
    cfg = compose_cfg(tmp_path / "run", ["data=imdb"])
    check_config(cfg)  # composes and passes the config checks
    assert cfg.data.name == "scikit-learn/imdb"
    assert cfg.data.text_column == "review" and cfg.data.label_column == "sentiment"
    datamodule = build(cfg.data, tokenizer=tokenizer, _convert_="all")  # HF_HUB_OFFLINE=1
    with pytest.raises(LmProbeError) as err:
        datamodule.setup()
    message = str(err.value)
    assert "\n" not in message and "'scikit-learn/imdb'" in message
    assert "save_to_disk" in message and "data.name=DIR" in message


def test_bad_hf_options_name_the_value_and_the_fix(saved, tmp_path, tokenizer):
    directory, _ = saved
    with pytest.raises(LmProbeError, match=r"split 'validation' .* its splits are train, test"):
        HFDataModule(name=str(directory), test_split="validation", tokenizer=tokenizer).setup()
    with pytest.raises(LmProbeError, match=r"no column 'review'; its columns are text, label, src"):
        HFDataModule(name=str(directory), text_column="review", tokenizer=tokenizer).setup()
    missing = str(tmp_path / "nothing-here")
    with pytest.raises(
        LmProbeError, match=r"config key data.name=.*nothing-here.* names no directory"
    ):
        check_config(compose_cfg(tmp_path / "run", ["data=hf", f"data.name={missing}"]))
    words = tmp_path / "words"
    datasets.Dataset.from_dict({"tokens": [["a", "b"]], "label": [0]}).save_to_disk(str(words))
    with pytest.raises(LmProbeError, match=r"data.text_column='tokens' .* not one text per row"):
        HFDataModule(name=str(words), text_column="tokens", tokenizer=tokenizer).setup()


def test_a_dataset_saved_alone_is_the_training_split(tmp_path, tokenizer):
    texts, labels = make_texts(40)
    path = tmp_path / "alone"
    datasets.Dataset.from_dict({"text": texts, "label": labels}).save_to_disk(str(path))
    dm = HFDataModule(name=str(path), tokenizer=tokenizer, test_size=0.25)
    dm.setup()
    assert (len(dm.train_set), len(dm.test_set)) == (30, 10)
    assert dm.label_names == {0: 0, 1: 1}
    got = sorted(np.concatenate([dm.train_set.labels.numpy(), dm.test_set.labels.numpy()]))
    assert got == sorted(labels)
