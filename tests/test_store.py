"""The feature store: what it stores is what the model computes, a hit reproduces the run
without loading the model, a partial hit traces only what is missing, the key follows every
input, and concurrent, interrupted or corrupted writes never give wrong features."""

from __future__ import annotations

import csv
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import build_gpt2, make_texts
from test_app import compose_cfg

import lmprobe.app.job as app
import lmprobe.tracing.store as store_module
from lmprobe import LmProbeError, ProbeDataset
from lmprobe.app.job import build, feature_source, model_for_data, train
from lmprobe.data.dataset import batches
from lmprobe.data.words import encode_words
from lmprobe.tracing.features import FeatureKey, gather, trace_features
from lmprobe.tracing.loop import Tracer
from lmprobe.tracing.models import (
    context_length,
    forward_order,
    load_language_model,
    local_model_dir,
    model_frame,
)
from lmprobe.tracing.store import FeatureSource, FeatureStore
from lmprobe.tracing.storekeys import base_key, entry_key

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def count_traces(monkeypatch) -> list[list[FeatureKey]]:
    """The keys of every trace the store's pass runs (and none elsewhere may run)."""
    calls: list[list[FeatureKey]] = []

    class Counting(Tracer):
        def __call__(self, batch, keys, *args, **kwargs):
            calls.append(list(keys))
            return super().__call__(batch, keys, *args, **kwargs)

    class Forbidden(Tracer):
        def __call__(self, *args, **kwargs):
            raise AssertionError("a step traced the model although the store has its features")

    monkeypatch.setattr(store_module, "Tracer", Counting)
    monkeypatch.setattr("lmprobe.training.module.Tracer", Forbidden)
    return calls


def source_for(gpt2, directory: Path, max_gb: float | None = None) -> FeatureSource:
    return FeatureSource(FeatureStore(directory, max_gb), {"model": "tiny"}, lambda: gpt2)


# ----------------------------------------------------- stored values are right
def test_stored_features_are_the_models_activations(gpt2, dataset, tmp_path):
    """Independent reference: Hugging Face's hidden states of each document alone
    (no padding, no nnsight), pooled by hand; and safetensors' own reader."""
    from safetensors.numpy import load_file

    key = FeatureKey("transformer.h.3.output", "mean", None)
    token_key = FeatureKey("transformer.h.3.output", "none", None, word_pooling="first")
    token_data = ProbeDataset(dataset.input_ids, dataset.attention_mask, dataset.attention_mask * 3)
    source = source_for(gpt2, tmp_path / "store")
    stored = source.prepare({"train": dataset}, [key], batch_size=16)["train"]
    tokens = source.prepare({"train": token_data}, [token_key], batch_size=16)["train"]
    entry, token_entry = stored.entries[key], tokens.entries[token_key]
    hf = gpt2._module
    for doc in (0, 7, 31):
        real = dataset.attention_mask[doc].bool()
        ids = dataset.input_ids[doc][real].unsqueeze(0)
        with torch.no_grad():
            hidden = hf(ids, output_hidden_states=True).hidden_states[4][0]  # block 3 output
        np.testing.assert_allclose(entry.X[doc], hidden.mean(0).numpy(), atol=1e-5)
        rows, _ = token_entry.index.rows(np.array([doc]))
        assert token_entry.pos[rows].tolist() == real.nonzero().squeeze(1).tolist()
        np.testing.assert_allclose(token_entry.X[rows], hidden.numpy(), atol=1e-5)
    on_disk = load_file(entry.path)
    np.testing.assert_array_equal(on_disk["X"], entry.X)
    np.testing.assert_array_equal(on_disk["doc"], np.arange(len(dataset)))


def word_dataset(tokenizer) -> ProbeDataset:
    texts, _ = make_texts(30, seed=5)
    sentences = [text.split() for text in texts]
    # labels 0-2, every fourth word unlabelled (None: not a row at all)
    labels = [
        [None if j % 4 == 3 else (i + j) % 3 for j in range(len(s))]
        for i, s in enumerate(sentences)
    ]
    enc = encode_words(tokenizer, sentences, labels)
    return ProbeDataset(
        enc.input_ids, enc.attention_mask, enc.labels, None, enc.word_ids, enc.word_types
    )


@pytest.mark.parametrize("kind", ["sequence", "tokens", "words"])
def test_stored_rows_are_the_rows_a_trace_gives(gpt2, dataset, tmp_path, kind):
    """Per batch, the store serves the rows, labels and documents of ``trace_features`` for
    every kind of key (null_label rows dropped, control labels), in the same order."""
    if kind == "sequence":
        data = dataset
        keys = [FeatureKey("transformer.h.2.output", "last", 1)]
    elif kind == "tokens":
        ids = dataset.input_ids
        data = ProbeDataset(ids, dataset.attention_mask, (ids % 3) * dataset.attention_mask)
        keys = [FeatureKey("transformer.h.2.output", "none", 0, word_pooling="first")]
    else:
        data = word_dataset(gpt2.tokenizer)
        keys = [FeatureKey("transformer.h.2.output", "none", 2, word_pooling="mean")]
    keys.append(keys[0]._replace(control=True))
    data.set_control_labels(data.labels.flip(0))  # any labels of the same shape
    stored = source_for(gpt2, tmp_path / "store").prepare({"train": data}, keys, 4)["train"]
    assert len(stored.entries) == 1  # the control twin and null_label share one entry
    order = forward_order(gpt2, ["transformer.h.2.output"])
    for batch in batches(data, 8, group_size=16, seed=3):  # training batches, not the pass's
        traced = trace_features(gpt2, batch, keys, order)
        index = batch["index"].numpy()
        for key in keys:
            want = gather([traced[key]])
            got = gather([stored.features(key, index, index, "b", "error")])
            np.testing.assert_array_equal(got.doc, want.doc)
            np.testing.assert_array_equal(got.y, want.y)
            assert got.y.dtype == want.y.dtype
            np.testing.assert_allclose(got.X, want.X, atol=1e-5)
            assert len(want.y) > 0


# ------------------------------------------------------------- runs of the app
@pytest.fixture()
def reviews_csv(tmp_path):
    texts, labels = make_texts(160, seed=4)
    path = tmp_path / "reviews.csv"
    pd.DataFrame({"text": texts, "label": ["pos" if y else "neg" for y in labels]}).to_csv(
        path, index=False
    )
    return path


@pytest.fixture()
def store_cfg(tmp_path, tiny_model_dir, reviews_csv):
    def cfg(run: str, *overrides: str):
        return compose_cfg(
            tmp_path / run,
            [
                "probes=gpt2_layers",
                f"model.name_or_path={tiny_model_dir}",
                "model.device=cpu",
                "data=csv",
                f"data.path={reviews_csv}",
                "data.batch_size=8",
                "data.val_size=0.2",
                "trainer.max_epochs=2",
                "trainer.enable_progress_bar=false",
                "logger=csv",
                *overrides,
            ],
        )

    return cfg


def no_model(monkeypatch) -> None:
    """Loading the model's weights in any way fails from here on."""
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(app, "_loaded_models", {})
    monkeypatch.setattr(app, "_frames", {})
    monkeypatch.setattr(app, "load_model", refuse)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def test_a_store_hit_reproduces_the_run_without_the_model(
    store_cfg, tmp_path, monkeypatch, feature_store_dir
):
    train(store_cfg("first"))
    entries = sorted(feature_store_dir.glob("*.safetensors"))
    assert len(entries) == 12 * 3  # 12 sites x train, val, test
    no_model(monkeypatch)
    calls = count_traces(monkeypatch)
    train(store_cfg("second"))
    assert calls == []
    first, second = tmp_path / "first", tmp_path / "second"
    assert (first / "metrics.csv").read_bytes() == (second / "metrics.csv").read_bytes()
    files = sorted(p.relative_to(first / "probes") for p in (first / "probes").rglob("*"))
    assert files and files == sorted(
        p.relative_to(second / "probes") for p in (second / "probes").rglob("*")
    )
    for name in files:  # the probes' coefficients, byte for byte
        assert (first / "probes" / name).read_bytes() == (second / "probes" / name).read_bytes()
    assert sorted(feature_store_dir.glob("*.safetensors")) == entries


def test_a_partial_hit_traces_only_the_missing_site(store_cfg, tmp_path, monkeypatch):
    two = "probes.submodules=[transformer.h.0.output,transformer.h.1.output]"
    three = (
        "probes.submodules=[transformer.h.0.output,transformer.h.1.output,transformer.h.2.output]"
    )
    first = train(store_cfg("first", two))
    calls = count_traces(monkeypatch)
    second = train(store_cfg("second", three))
    new = FeatureKey("transformer.h.2.output", "mean", None)
    assert calls and all(keys == [new] for keys in calls)
    # one trace per batch of each split: 160 rows, 20% test, 20% val, batches of 8
    assert len(calls) == sum(-(-n // 8) for n in (96, 32, 32))
    same = [c for c in first.columns if c != "p_vs_best"]  # p_vs_best: against all probes
    pd.testing.assert_frame_equal(first[same], second.loc[first.index, same])


def test_feature_store_false_traces_and_writes_nothing(store_cfg, feature_store_dir):
    cfg = store_cfg("run", "feature_store=false", "trainer.max_epochs=1")
    assert feature_source(cfg) is None
    train(cfg)
    assert not feature_store_dir.exists()


def test_feature_store_dir_and_size_cap_are_config_keys(store_cfg, tmp_path):
    cfg = store_cfg("run", f"feature_store.dir={tmp_path / 'elsewhere'}", "feature_store.max_gb=1")
    source = feature_source(cfg)
    assert source.store.directory == tmp_path / "elsewhere" and source.store.max_gb == 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("feature_store.max_gb=0", "feature_store.max_gb=0: use a size in GB > 0"),
        ("+feature_store.size=3", "feature_store.size is not an option"),
        ("feature_store=yes", "feature_store='yes': use false"),
    ],
)
def test_bad_feature_store_options_are_one_line_errors(store_cfg, override, message):
    with pytest.raises(LmProbeError, match=message):
        train(store_cfg("run", override))


def test_the_frame_tokenizes_as_the_loaded_model(tiny_model_dir):
    frame = model_frame(local_model_dir(str(tiny_model_dir)))
    lm = load_language_model(str(tiny_model_dir))
    assert all(p.device.type == "meta" for p in frame._module.parameters())
    texts = ["the movie", "a really quite lovely day and it was so good"]
    a = frame.tokenizer(texts, padding=True, return_tensors="pt")
    b = lm.tokenizer(texts, padding=True, return_tensors="pt")
    assert frame.tokenizer.padding_side == lm.tokenizer.padding_side == "left"
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.equal(a["attention_mask"], b["attention_mask"])
    assert context_length(frame) == context_length(lm) == 128


# ---------------------------------------------------------------- the key
@pytest.fixture()
def rich_csv(tmp_path):
    """Three unbalanced labels, a source column and a second text column."""
    texts, labels = make_texts(150, seed=8)
    path = tmp_path / "rich.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "other", "label", "source"])
        for i, (text, label) in enumerate(zip(texts, labels, strict=True)):
            name = ["neg", "pos", "mixed"][2 if i % 5 == 0 else label]
            writer.writerow([text, text.upper(), name, "a" if i % 3 else "b"])
    return path


def run_keys(cfg) -> dict[tuple[str, str], str]:
    """(split, site) -> entry key of the run ``cfg`` describes (what ``train`` would use)."""
    source = feature_source(cfg)
    lm = model_for_data(cfg.model, source)
    datamodule = build(
        cfg.data, tokenizer=lm.tokenizer, model_max_length=context_length(lm), _convert_="all"
    )
    datamodule.setup("fit")
    configs = build(cfg.probes, model=lm, classes=sorted(datamodule.label_names), _convert_="all")
    keys = [FeatureKey.of(c) for c in configs]
    found = {}
    for split in ("train", "val", "test"):
        dataset = getattr(datamodule, f"{split}_set")
        if dataset is not None:
            for key, name in source.keys(dataset, keys).items():
                found[(split, f"{key.submodule}/{key.pooling}")] = name
    return found


def saved_model(path: Path, tokenizer, seed: int = 0) -> Path:
    build_gpt2(tokenizer, seed=seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def key_cfg(tmp_path, rich_csv, base_tokenizer):
    model = saved_model(tmp_path / "model", base_tokenizer)

    def cfg(*overrides: str):
        return compose_cfg(
            tmp_path / "run",
            [
                "probes=gpt2_layers",
                "probes.submodules=[transformer.h.0.output,transformer.h.1.output]",
                f"model.name_or_path={model}",
                "model.device=cpu",
                "data=csv",
                f"data.path={rich_csv}",
                "data.max_length=64",
                *overrides,
            ],
        )

    return cfg, model


# Each changes what the model reads (or how): the key of the training split must change.
KEY_INPUTS = {
    "data.sample_size": ["data.sample_size=100"],
    "data.exclude": ["data.exclude={source: [b]}"],
    "data.include": ["data.include={label: [neg, pos]}"],
    "data.balance": ["data.balance=true"],
    "data.test_size": ["data.test_size=0.3"],
    "data.val_size": ["data.val_size=0.2"],
    "data.text_column": ["data.text_column=other"],
    "data.seed (split seed)": ["data.seed=1"],
    "data.max_length": ["data.max_length=5"],
    "model.dtype": ["model.dtype=float64"],
    "probes.pooling": ["probes.pooling=last"],
}


@pytest.mark.parametrize("name", list(KEY_INPUTS))
def test_the_key_changes_with_each_input(key_cfg, name):
    cfg, _ = key_cfg
    base, changed = run_keys(cfg()), run_keys(cfg(*KEY_INPUTS[name]))
    site = "transformer.h.0.output"
    before = base[("train", f"{site}/mean")]
    after = [v for (split, s), v in changed.items() if split == "train" and s.startswith(site)]
    assert after and before not in after


def test_the_key_changes_with_the_submodule(key_cfg):
    cfg, _ = key_cfg
    base = run_keys(cfg())
    assert (
        base[("train", "transformer.h.0.output/mean")]
        != base[("train", "transformer.h.1.output/mean")]
    )
    other = run_keys(cfg("probes.submodules=[transformer.h.0.input]"))
    assert not set(other.values()) & set(base.values())


def test_the_key_changes_with_the_data_file_content(key_cfg, rich_csv):
    cfg, _ = key_cfg
    base = run_keys(cfg())
    lines = rich_csv.read_text(encoding="utf-8").splitlines()
    lines[1] = lines[1].replace("the", "a", 1) if "the" in lines[1] else "lovely " + lines[1]
    rich_csv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    changed = run_keys(cfg())
    assert any(changed[k] != base[k] for k in base if k[0] != "val")


def test_the_key_changes_with_the_model_and_its_weights(key_cfg, tmp_path, base_tokenizer):
    cfg, model = key_cfg
    base = run_keys(cfg())
    other = saved_model(tmp_path / "other", base_tokenizer, seed=1)
    assert not set(run_keys(cfg(f"model.name_or_path={other}")).values()) & set(base.values())
    # the same directory, new weights of the same size
    weights = model / "model.safetensors"
    stat = weights.stat()
    shutil.copy(other / "model.safetensors", weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert not set(run_keys(cfg()).values()) & set(base.values())


def test_the_key_changes_with_the_tokenizer(key_cfg, tmp_path):
    from conftest import build_tokenizer

    cfg, model = key_cfg
    base = run_keys(cfg())
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["movie"])  # a word the data uses: other ids, same model
    tokenizer.save_pretrained(model)
    changed = run_keys(cfg())
    assert not set(changed.values()) & set(base.values())


def test_the_key_ignores_what_does_not_change_features(key_cfg):
    """What a sweep varies over probes and training reuses the stored features."""
    cfg, _ = key_cfg
    base = run_keys(cfg())
    for overrides in (
        ["+probes.model_kwargs={alpha: 0.1}"],
        ["probes.heldout_size=0.3", "probes.early_stopping=false"],
        ["trainer.max_epochs=5", "data.batch_size=4", "control=true"],
        ["data.label_map={mixed: a, neg: b, pos: c}"],  # new names, same numbering
    ):
        assert run_keys(cfg(*overrides)) == base, overrides


# ------------------------------------------------------- writers and corruption
CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from lmprobe.tracing.store import FeatureStore

    store = FeatureStore(sys.argv[1], None)
    doc, pos = np.repeat(np.arange(50), 3), np.tile(np.arange(3), 50)
    X = np.arange(150 * 64, dtype=np.float32).reshape(150, 64)
    for _ in range(int(sys.argv[2])):
        writer = store.writer("a" * 64, {"test": 1}, doc, pos, 50)
        for first in (40, 0, 20, 10, 30):  # batches in any order
            docs = np.arange(first, first + 10)
            rows = np.flatnonzero(np.isin(doc, docs))
            writer.fill(docs, X[rows], doc[rows], pos[rows])
        writer.commit()
    """
)


def test_concurrent_writers_leave_one_valid_entry(tmp_path, caplog):
    directory = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    writers = [
        subprocess.Popen([sys.executable, "-c", CHILD, str(directory), "40"], env=env)
        for _ in range(2)
    ]
    store = FeatureStore(directory, None)
    doc, pos = np.repeat(np.arange(50), 3), np.tile(np.arange(3), 50)
    expected = np.arange(150 * 64, dtype=np.float32).reshape(150, 64)
    seen = 0
    with caplog.at_level(logging.WARNING, logger="lmprobe"):
        while any(w.poll() is None for w in writers):  # read while they write
            entry = store.open("a" * 64, doc, pos, 50)
            if entry is not None:
                np.testing.assert_array_equal(entry.X, expected)
                seen += 1
    assert [w.returncode for w in writers] == [0, 0]
    assert "unusable" not in caplog.text  # no reader ever met a half-written entry
    entry = store.open("a" * 64, doc, pos, 50)
    np.testing.assert_array_equal(entry.X, expected)
    assert [p.name for p in directory.iterdir()] == ["a" * 64 + ".safetensors"]  # no temp
    assert seen > 0


def test_an_unfinished_entry_is_never_read(tmp_path):
    store = FeatureStore(tmp_path / "store", None)
    doc, pos = np.arange(4), np.full(4, -1)
    writer = store.writer("b" * 64, {}, doc, pos, 4)
    writer.fill(np.arange(2), np.ones((2, 3), np.float32), np.arange(2), None)
    assert store.open("b" * 64, doc, pos, 4) is None  # half written: not there
    with pytest.raises(LmProbeError, match="missing 2 rows"):
        writer.commit()
    writer.abort()
    assert list((tmp_path / "store").iterdir()) == []


def corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[:-100]))
    elif how == "flipped byte":
        data[len(data) // 2] ^= 0x40  # inside X
        path.write_bytes(bytes(data))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "other key":  # a valid entry under another entry's name
        other = next(p for p in path.parent.glob("*.safetensors") if p != path)
        shutil.copy(other, path)


@pytest.mark.parametrize("how", ["truncated", "flipped byte", "empty", "other key"])
def test_a_corrupt_entry_is_computed_again(gpt2, dataset, tmp_path, monkeypatch, caplog, how):
    keys = [
        FeatureKey("transformer.h.1.output", "mean", None),
        FeatureKey("transformer.h.5.output", "mean", None),
    ]
    source = source_for(gpt2, tmp_path / "store")
    first = source.prepare({"train": dataset}, keys)["train"]
    reference = {k: np.array(e.X) for k, e in first.entries.items()}
    path = first.entries[keys[0]].path
    corrupt(path, how)
    calls = count_traces(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="lmprobe"):
        again = source.prepare({"train": dataset}, keys)["train"]
    assert f"{path} is unusable" in caplog.text
    assert calls and all(k == [keys[0]] for k in calls)  # that entry only
    for key in keys:
        np.testing.assert_array_equal(again.entries[key].X, reference[key])


def test_eviction_keeps_the_store_under_its_cap(tmp_path):
    store = FeatureStore(tmp_path / "store", max_gb=None)
    doc, pos = np.arange(10), np.full(10, -1)
    paths = []
    for i, name in enumerate("cdef"):
        writer = store.writer(name * 64, {}, doc, pos, 10)
        writer.fill(doc, np.full((10, 40), i, np.float32), doc, None)
        paths.append(writer.commit())
        os.utime(paths[-1], (1000 + i, 1000 + i))  # c oldest ... f newest
    os.utime(paths[0], (5000, 5000))  # c used last
    store.max_gb = 2.5 * paths[0].stat().st_size / 2**30  # room for 2.5 entries
    stale = store.directory / ".dead.tmp"
    stale.write_bytes(b"x")
    os.utime(stale, (0, 0))
    store.evict(keep=[paths[1]])  # d is in use by this run: kept though old
    assert sorted(p.name[0] for p in store.directory.iterdir()) == ["c", "d"]


def test_base_keys_share_entries_and_name_their_inputs():
    key = FeatureKey("transformer.h.0.output", "none", 0, True, "mean")
    assert base_key(key) == FeatureKey("transformer.h.0.output", "none", None, False, "mean")
    name, fields = entry_key({"m": 1}, "data", key)
    assert name == entry_key({"m": 1}, "data", base_key(key))[0]
    assert fields["submodule"] == "transformer.h.0.output" and fields["data"] == "data"
    seq = FeatureKey("transformer.h.0.output", "mean", None, word_pooling="mean")
    assert entry_key({}, "d", seq)[0] == entry_key({}, "d", seq._replace(word_pooling="first"))[0]


def test_a_streamed_split_is_keyed_and_stored_without_padding_it_in_memory(
    gpt2, tmp_path, monkeypatch
):
    """Files read a chunk at a time give a ``PackedDataset``: its key comes from the token
    file, never from ``input_ids`` (every document padded in memory), and still follows the
    documents: the same file gives the same key, another text or split another one. Filling
    the store does not pad it in memory either, and stores what the padded dataset gives."""
    from conftest import build_tokenizer

    from lmprobe import ProbeDataModule
    from lmprobe.data.packed import PackedDataset
    from lmprobe.tracing.storekeys import dataset_digest

    texts, labels = make_texts(40)
    digests = {}
    for name, rows in [("a", texts), ("b", texts), ("c", [texts[0] + " great", *texts[1:]])]:
        path = tmp_path / f"{name}.csv"
        pd.DataFrame({"text": rows, "label": labels}).to_csv(path, index=False)
        dm = ProbeDataModule(path=str(path), tokenizer=build_tokenizer(), test_size=0.25)
        dm.setup()
        assert isinstance(dm.train_set, PackedDataset)
        with monkeypatch.context() as patch:
            for attribute in ("input_ids", "attention_mask"):
                patch.setattr(PackedDataset, attribute, property(lambda self: 1 / 0))
            digests[name] = [dataset_digest(dm.train_set), dataset_digest(dm.test_set)]
            if name == "a":
                key = FeatureKey("transformer.h.3.output", "mean", None)
                source = source_for(gpt2, tmp_path / "streamed")
                streamed = source.prepare({"train": dm.train_set}, [key], batch_size=8)
        if name == "a":
            train = dm.train_set
            padded = ProbeDataset(train.input_ids, train.attention_mask, train.labels)
            reference = source_for(gpt2, tmp_path / "padded").prepare({"train": padded}, [key])
            np.testing.assert_allclose(
                streamed["train"].entries[key].X, reference["train"].entries[key].X, atol=1e-5
            )
    assert digests["a"] == digests["b"]
    assert digests["a"][0] != digests["a"][1]  # another split, other documents
    assert digests["a"] != digests["c"]  # one text changed


def test_the_key_follows_the_weights_contents_with_the_modification_time_kept(
    key_cfg, tmp_path, base_tokenizer, monkeypatch
):
    """Issue 33, item 6: weights replaced by others of the same size, the modification
    time kept (cp -p, rsync -a, tar), were served the old features; the key now hashes the
    files' contents, read once per version of a file (then from the cache)."""
    from lmprobe.tracing import storekeys as store

    cfg, model = key_cfg
    base = run_keys(cfg())
    assert run_keys(cfg()) == base  # unchanged files: the same key
    getattr(store, "_file_digests", {}).clear()  # a new process: digests from the cache file
    monkeypatch.setattr(store, "open", lambda *a: pytest.fail("weights read again"), raising=False)
    assert run_keys(cfg()) == base
    monkeypatch.undo()
    other = saved_model(tmp_path / "other", base_tokenizer, seed=1)
    weights = model / "model.safetensors"
    stat = weights.stat()
    shutil.copy2(other / "model.safetensors", weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the old time, kept
    assert weights.stat().st_size == stat.st_size
    assert weights.stat().st_mtime_ns == stat.st_mtime_ns
    assert not set(run_keys(cfg()).values()) & set(base.values())


# ------------------------------------------------- a full or unwritable store
def test_a_full_store_stops_with_one_line_and_keeps_what_it_wrote(
    store_cfg, tmp_path, monkeypatch, feature_store_dir
):
    """The writer reserves an entry's space before mapping it: a full disk is an error of
    the reservation (here: from the second entry on), not a SIGBUS in the map's pages."""
    import errno

    calls = []

    def full(*args):
        calls.append(args)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    assert hasattr(os, "posix_fallocate")
    monkeypatch.setattr(os, "posix_fallocate", full)
    cfg = store_cfg("run", "probes.submodules=[transformer.h.0.output]", "trainer.max_epochs=1")
    with pytest.raises(LmProbeError) as err:
        train(cfg)
    message = str(err.value)
    assert message.startswith("feature store: cannot write ") and "\n" not in message
    assert f"in {feature_store_dir} (No space left on device); free space there, " in message
    assert "set feature_store.dir to a directory with room, or feature_store=false" in message
    assert len(calls) == 2
    assert [p.name for p in feature_store_dir.glob(".*.tmp")] == []  # no temporary file
    assert len(list(feature_store_dir.glob("*.safetensors"))) == 1  # the train split's entry
    assert not (tmp_path / "run" / ".lmprobe.lock").exists()  # the run's lock released
    monkeypatch.undo()  # with room again, the run reads the kept entry and goes on
    monkeypatch.setenv("LMPROBE_FEATURE_STORE", str(feature_store_dir))
    train(store_cfg("run", "probes.submodules=[transformer.h.0.output]", "trainer.max_epochs=1"))
    assert len(list(feature_store_dir.glob("*.safetensors"))) == 3


def test_without_fallocate_the_reservation_writes_zeros(tmp_path, monkeypatch):
    import errno

    store = FeatureStore(tmp_path / "store", None)
    doc, pos = np.arange(300), np.full(300, -1)
    X = np.arange(300 * 7, dtype=np.float32).reshape(300, 7)
    monkeypatch.delattr(os, "posix_fallocate")
    writer = store.writer("d" * 64, {}, doc, pos, 300)
    writer.fill(doc, X, doc, None)
    writer.commit()
    np.testing.assert_array_equal(store.open("d" * 64, doc, pos, 300).X, X)

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    writer = store.writer("e" * 64, {}, doc, pos, 300)
    with pytest.raises(
        LmProbeError, match=r"cannot write 1[0-9]\.[0-9] KB for entry eeeeeeeeeeee in "
    ):
        writer.fill(doc, X, doc, None)
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["d" * 64 + ".safetensors"]


FSIZE_CHILD = textwrap.dedent(
    """
    import resource, signal, sys
    import numpy as np
    from lmprobe import LmProbeError
    from lmprobe.tracing.store import FeatureStore

    store = FeatureStore(sys.argv[1], None)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit, writes fail (EFBIG)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
    doc = np.arange(1000)
    writer = store.writer("f" * 64, {}, doc, np.full(1000, -1), 1000)
    try:
        writer.fill(doc, np.ones((1000, 64), np.float32), doc, None)
    except LmProbeError as err:
        print(err)
    """
)


def test_a_file_size_limit_is_an_error_not_a_crash(tmp_path):
    """A store that cannot grow (here RLIMIT_FSIZE, as a full disk) ends the writer with
    lmprobe's message and no temporary file."""
    directory = tmp_path / "store"
    src = Path(store_module.__file__).parents[2]  # the lmprobe under test
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    child = subprocess.run(
        [sys.executable, "-c", FSIZE_CHILD, str(directory)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.startswith("feature store: cannot write 266.0 KB for entry ffffffffffff")
    assert "(File too large); free space there" in child.stdout
    assert list(directory.iterdir()) == []


def probe_arrays(run: Path) -> dict[str, dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    return {
        str(p.relative_to(run / "probes")): load_file(p)
        for p in sorted((run / "probes").rglob("*.safetensors"))
    }


def test_an_unwritable_store_reads_what_it_has_and_traces_the_rest(
    store_cfg, tmp_path, monkeypatch, feature_store_dir, caplog
):
    """Tests run as root, where a read-only mode does not stop writes: the store's
    temporary files are refused instead (PermissionError, as a read-only directory)."""
    import tempfile

    two = "probes.submodules=[transformer.h.0.output,transformer.h.1.output]"
    three = (
        "probes.submodules=[transformer.h.0.output,transformer.h.1.output,transformer.h.2.output]"
    )
    train(store_cfg("first", two, "trainer.max_epochs=1"))
    entries = sorted(feature_store_dir.iterdir())
    train(store_cfg("plain", three, "trainer.max_epochs=1", "feature_store=false"))
    original = tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == feature_store_dir:
            raise PermissionError(13, "Permission denied", str(dir))
        return original(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(app, "_loaded_models", {})  # the run starts from the model's frame
    monkeypatch.setattr(app, "_frames", {})
    with caplog.at_level(logging.INFO, logger="lmprobe"):
        train(store_cfg("second", three, "trainer.max_epochs=1"))
    said = [r.getMessage() for r in caplog.records if "cannot write to" in r.getMessage()]
    assert said == [
        f"feature store: cannot write to {feature_store_dir} (Permission denied); the "
        f"features it lacks are traced by every pass, not stored"
    ]
    assert sorted(feature_store_dir.iterdir()) == entries  # nothing written
    first, plain, second = (probe_arrays(tmp_path / r) for r in ("first", "plain", "second"))
    assert len(second) == 3 and set(first) < set(second)
    assert all(any(a.endswith(".coef_") for a in arrays) for arrays in second.values())
    for name, arrays in second.items():  # stored sites as the store's run, the rest traced
        expected = first.get(name, plain[name])
        assert arrays.keys() == expected.keys()
        for array, value in arrays.items():
            if name in first:  # read from the store: as the run that stored it
                np.testing.assert_array_equal(value, expected[array], err_msg=f"{name} {array}")
            else:  # traced, as without a store (which traces its first rows in other
                # batches, ahead with the held-out slice: float rounding apart)
                np.testing.assert_allclose(value, expected[array], rtol=1e-4, atol=1e-5)
