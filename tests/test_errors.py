"""Every bad input gets a one-line LmProbeError, raised by lmprobe, naming the bad value."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from lmprobe import LmProbeError, NonFiniteActivationError, ProbeConfig, ProbeDataset, ProbeRunner
from lmprobe.data.datamodule import ProbeDataModule


def check(excinfo: pytest.ExceptionInfo, *names: str) -> None:
    """Raised by lmprobe's own code (not deep in torch/sklearn/nnsight), one line, names values."""
    assert isinstance(excinfo.value, LmProbeError)
    assert "/lmprobe/" in str(excinfo.traceback[-1].path).replace("\\", "/")
    message = str(excinfo.value)
    assert "\n" not in message
    for name in names:
        assert name in message, (name, message)


@pytest.fixture(scope="module")
def small_lm(base_tokenizer):
    import copy

    from conftest import build_gpt2
    from nnsight import TransformersModel

    own = copy.deepcopy(base_tokenizer)
    return TransformersModel(build_gpt2(own, n_layer=4), tokenizer=own, task="text-generation")


@pytest.mark.parametrize(
    ("path", "hint"),
    [
        ("transformer.h.9.output", "transformer.h.3.output"),
        ("transformer.h.1.mlpp.output", "transformer.h.1.mlp.output"),
    ],
)
def test_unknown_submodule_lists_closest_paths(small_lm, path, hint):
    with pytest.raises(LmProbeError) as excinfo:
        ProbeRunner(small_lm, [ProbeConfig(path, [0, 1])])
    check(excinfo, path, hint)


def test_shape_mismatches():
    ids = torch.ones(4, 6, dtype=torch.long)
    with pytest.raises(LmProbeError) as excinfo:
        ProbeDataset(ids, torch.ones(4, 5), [0, 1, 0, 1])
    check(excinfo, "(4, 5)", "(4, 6)")
    with pytest.raises(LmProbeError) as excinfo:
        ProbeDataset(ids, torch.ones(4, 6), [0, 1, 0])
    check(excinfo, "3 labels", "4 sequences")
    with pytest.raises(LmProbeError) as excinfo:
        ProbeDataset(ids, torch.ones(4, 6), torch.zeros(4, 5))
    check(excinfo, "(4, 5)", "(4, 6)")


def test_empty_dataset_and_empty_classes():
    with pytest.raises(LmProbeError) as excinfo:
        ProbeDataset(torch.ones(0, 3), torch.ones(0, 3), [])
    check(excinfo, "empty")
    with pytest.raises(LmProbeError) as excinfo:
        ProbeConfig("transformer.h.0.output", [])
    check(excinfo, "classes is empty")


def test_label_outside_classes_before_the_model_runs(small_lm, dataset, monkeypatch):
    runner = ProbeRunner(small_lm, [ProbeConfig("transformer.h.1.output", [0, 2])])
    traced = []
    monkeypatch.setattr("lmprobe.tracing.loop.trace_features", lambda *a, **k: traced.append(1))
    with pytest.raises(LmProbeError) as excinfo:
        runner.fit_probes(dataset, dataset)
    check(excinfo, "label 1", "[0, 2]")
    assert not traced


def test_single_class_split_warns(small_lm, docs, caplog):
    _, enc, _ = docs
    ds = ProbeDataset(enc["input_ids"][:20], enc["attention_mask"][:20], [0] * 10 + [1] * 10)
    test_set = ProbeDataset(enc["input_ids"][:5], enc["attention_mask"][:5], [1] * 5)
    runner = ProbeRunner(small_lm, [ProbeConfig("transformer.h.1.output", [0, 1])])
    runner.fit_probes(ds, test_set, enable_progress_bar=False)
    assert "single class" in caplog.text


def test_null_label_pooling_checks(small_lm, dataset):
    with pytest.raises(LmProbeError) as excinfo:
        ProbeConfig("transformer.h.0.output", [0, 1], null_label=0, pooling="none")
    check(excinfo, "null_label=0")
    with pytest.raises(LmProbeError) as excinfo:
        ProbeConfig("transformer.h.0.output", [0, 1], pooling="avg")
    check(excinfo, "'avg'", "mean, last, first, max, none")
    runner = ProbeRunner(small_lm, [ProbeConfig("transformer.h.0.output", [0, 1], pooling="none")])
    with pytest.raises(LmProbeError) as excinfo:
        runner.fit_probes(dataset, dataset)
    check(excinfo, "pooling='none'", "one label per sequence")


def nan_hook(module, args, output):
    output = output.clone()
    output[0, -1] = float("nan")  # one real token of the first document of every batch
    return output


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_non_finite_activations(small_lm, dataset, policy, caplog):
    handle = small_lm._module.transformer.h[1].register_forward_hook(nan_hook)
    try:
        runner = ProbeRunner(
            small_lm, [ProbeConfig("transformer.h.2.output", [0, 1])], on_nonfinite=policy
        )
        if policy == "error":
            with pytest.raises(NonFiniteActivationError) as excinfo:
                runner.fit_probes(dataset, None, batch_size=10)
            check(excinfo, "transformer.h.2.output", "batch", "on_nonfinite=skip")
        else:
            runner.fit_probes(dataset, dataset, batch_size=10, enable_progress_bar=False)
            n_batches = -(-len(dataset) // 10)
            assert (
                runner.metrics.loc["transformer.h.2.output", "support"] == len(dataset) - n_batches
            )
            assert "non-finite" in caplog.text
    finally:
        handle.remove()


def test_data_file_errors(tmp_path, tokenizer):
    good = tmp_path / "good.csv"
    pd.DataFrame({"review": ["a b", "c d"], "label": [0, 1]}).to_csv(good, index=False)
    with pytest.raises(LmProbeError) as excinfo:
        ProbeDataModule(path=str(good), tokenizer=tokenizer).setup()
    check(excinfo, "'text'", "review, label")
    bad = tmp_path / "bad.csv"
    bad.write_bytes("text,label\nok,0\ncaf\xe9,1\n".encode("latin-1"))
    with pytest.raises(LmProbeError) as excinfo:
        ProbeDataModule(path=str(bad), tokenizer=tokenizer).setup()
    check(excinfo, "line 3", "utf-8", "latin-1")
    with pytest.raises(LmProbeError) as excinfo:
        ProbeDataModule(path=str(tmp_path / "nope.csv"), tokenizer=tokenizer).setup()
    check(excinfo, "nope.csv")
    with pytest.raises(LmProbeError) as excinfo:
        ProbeDataModule(path=str(tmp_path), tokenizer=tokenizer).setup()
    check(excinfo, str(tmp_path))


def test_tokenizer_without_pad_token_and_long_max_length(tmp_path, tokenizer, caplog):
    from conftest import build_tokenizer

    tok = build_tokenizer()
    tok.pad_token = None
    path = tmp_path / "d.csv"
    pd.DataFrame({"text": ["good day", "bad day"] * 5, "label": [1, 0] * 5}).to_csv(
        path, index=False
    )
    dm = ProbeDataModule(path=str(path), tokenizer=tok, max_length=4096, model_max_length=128)
    dm.setup()
    assert tok.pad_token == tok.eos_token
    assert "no pad token" in caplog.text and "max_length=4096" in caplog.text


def test_empty_after_filtering_and_empty_split(tmp_path, tokenizer):
    path = tmp_path / "d.csv"
    pd.DataFrame({"text": ["a", "b", "c"], "label": ["x", "x", "y"]}).to_csv(path, index=False)
    with pytest.raises(LmProbeError) as excinfo:
        ProbeDataModule(path=str(path), tokenizer=tokenizer, exclude={"label": ["x", "y"]}).setup()
    check(excinfo, "no rows left after filtering", "data.exclude")
    with pytest.raises(LmProbeError) as excinfo:
        ProbeDataModule(path=str(path), tokenizer=tokenizer, test_size=0.1).setup()
    check(excinfo, "test_size=0.1", "3 documents", "empty split")


def test_runs_that_would_train_nothing_stop_before_model_work(small_lm, docs):
    """max_epochs=0 and a held-out slice of every training row are errors, not NaN tables."""
    from lmprobe import ProbeDataset

    _, enc, labels = docs
    ds = ProbeDataset(enc["input_ids"][:10], enc["attention_mask"][:10], labels[:10])
    runner = ProbeRunner(small_lm, [ProbeConfig("transformer.h.0.output", [0, 1])])
    with pytest.raises(LmProbeError) as excinfo:
        runner.fit_probes(ds, ds, max_epochs=0)
    check(excinfo, "num_epoch=0")
    from lmprobe.data.datamodule import ProbeDataModule
    from lmprobe.training.engine import fit_and_test, make_trainer, probe_callbacks

    trainer = make_trainer(runner.module, max_epochs=0, callbacks=probe_callbacks())
    with pytest.raises(LmProbeError) as excinfo:  # the app's trainer.max_epochs=0
        fit_and_test(trainer, runner.module, ProbeDataModule(train_set=ds, test_set=ds))
    check(excinfo, "max_epochs=0")
    greedy = ProbeConfig("transformer.h.0.output", [0, 1], heldout_size=0.96)
    with pytest.raises(LmProbeError) as excinfo:
        ProbeRunner(small_lm, [greedy]).fit_probes(ds, ds, batch_size=4)
    check(excinfo, "heldout_size=0.96")


def test_result_files_get_the_users_umask(tmp_path):
    import os
    import stat

    from lmprobe.probes.files import atomic_write_bytes

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "metrics.csv", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "metrics.csv").stat().st_mode) == 0o644


def test_default_run_directories_are_unique_to_the_microsecond(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from test_app import ROOT

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True)
    import re

    assert re.search(r"runs/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d-\d{6}$", cfg.hydra.run.dir)


# ---------------------------------------------------------------- the table of bad inputs
# Each row: what the user sets, and what the one-line error must name. Composition rows are
# refused by Hydra's typed schemas; config rows by check_config before the model loads;
# file rows by the readers (ProbeDataModule.setup), naming the file, the line and the fix.

GOOD_ROWS = "".join(f"word{i} text,{'pos' if i % 2 else 'neg'}\n" for i in range(20))

COMPOSITION = [
    ("data.batch_size=abc", ["data.batch_size", "abc"]),
    ("data.sample_size=some", ["data.sample_size", "some"]),
    ("callbacks.probe_updater.chunk_rows=abc", ["chunk_rows", "abc"]),
    ("callbacks.probe_metrics.bootstrap=many", ["bootstrap", "many"]),
    ("trainer.max_epochs=1.5", ["trainer.max_epochs", "1.5"]),
    ("overwrite=maybe", ["overwrite", "maybe"]),
    ("model.remote=perhaps", ["model.remote", "perhaps"]),
]

CONFIG = [
    ("data.sample_size=-1", ["data.sample_size=-1", ">= 1"]),
    ("data.sample_size=0", ["data.sample_size=0", ">= 1"]),
    ("data.max_length=-5", ["data.max_length=-5", ">= 1"]),
    ("data.file_format=xml", ["data.file_format='xml'", "csv, jsonl"]),
    ("data.test_size=1.5", ["data.test_size=1.5", "fraction"]),
    ("data.val_size=0.9", ["data.val_size=0.9", "below 1"]),
    ("data.num_workers=-1", ["data.num_workers=-1", ">= 0"]),
    ("data.length_window=0", ["data.length_window=0", ">= 1"]),
    ("data.encoding=bogus", ["data.encoding='bogus'", "latin-1"]),
    ("data.exclude={label: neg}", ["data.exclude=", "'neg'", "[neutral]"]),
    ("data.unknown_labels=keep", ["data.unknown_labels='keep'", "error, drop"]),
    ("data.path=MISSING/none.csv", ["data.path=", "none.csv"]),
    ("data.test_path=MISSING/test.csv", ["data.test_path=", "test.csv"]),
    ("probes.pooling=avg", ["probes.pooling='avg'", "mean"]),
    ("probes.word_pooling=middle", ["probes.word_pooling='middle'", "first"]),
    ("probes.kind=forest", ["'forest'"]),
    ("on_nonfinite=ignore", ["on_nonfinite='ignore'", "skip"]),
    ("baseline=untrained", ["baseline='untrained'"]),
    ("trainer.max_epochs=0", ["max_epochs=0", ">= 1"]),
    (  # issue 33: the error came after the model loaded and said to set name=
        "probes.pooling=[mean,mean]",
        ["probes.pooling=['mean', 'mean']", "'mean' twice", "list each once"],
    ),
    ("probes.submodules=[transformer.h.0.output,transformer.h.0.output]", ["probes.submodules"]),
    (  # issue 33: val_size was ignored beside val_path
        "data.val_size=0.2 & data.val_path=MISSING/val.csv",
        ["data.val_size=0.2", "data.val_path=", "val.csv", "data.val_size=0"],
    ),
    (  # issue 33: was raised after the model loaded
        "probes.kind=sgd_regressor & control=true & data.label_map={neg: 0, pos: 1}",
        ["probes.kind='sgd_regressor'", "control=false", "classifier"],
    ),
    ("callbacks.probe_updater.chunk_rows=0", ["callbacks.probe_updater.chunk_rows=0", ">= 1"]),
    (
        "callbacks.probe_updater.update_threads=0",
        ["callbacks.probe_updater.update_threads=0", ">= 1"],
    ),
]

FILES = [  # (file name, content, ProbeDataModule options, fragments of the message)
    ("empty.csv", "", {}, ["empty.csv", "is empty", "header"]),
    ("header.csv", "text,label\n", {}, ["header.csv", "no rows"]),
    ("ragged.csv", "text,label\na,pos\nb,neg,3,4\n", {}, ["ragged.csv", "line 3", "saw 4"]),
    ("cols.csv", "review,label\na,pos\n", {}, ["cols.csv", "'text'", "review, label"]),
    ("empty.jsonl", "", {}, ["empty.jsonl", "is empty"]),
    (
        "bad.jsonl",
        '{"text": "a", "label": 1}\n{"text": "b", label: 0}\n',
        {},
        ["line 2", "bad.jsonl", "not valid JSON"],
    ),
    ("list.jsonl", '{"text": "a", "label": 1}\n[1, 2]\n', {}, ["line 2", "list", "object"]),
    (
        "mixed.jsonl",
        "".join(
            json.dumps({"text": f"t{i}", "label": "1" if i % 3 else i % 2}) + "\n" for i in range(9)
        ),
        {},
        ["mixed.jsonl", "'1' (str)", "1 (int)", "label_map"],
    ),
    (  # issue 33: an object text was read as its repr, an object label a raw TypeError
        "objtext.jsonl",
        "".join(
            json.dumps({"text": {"body": "b"} if i == 3 else f"t{i}", "label": i % 2}) + "\n"
            for i in range(10)
        ),
        {},
        ["objtext.jsonl", "column 'text'", "dict in row 4", "{'body': 'b'}"],
    ),
    (
        "objlabel.jsonl",
        '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n{"text": "c", "label": {"y": 1}}\n',
        {},
        ["objlabel.jsonl", "column 'label'", "dict in row 3"],
    ),
    (
        "listlabel.json",
        '[{"text": "a", "label": 1}, {"text": "b", "label": [0, 1]}]',
        {},
        ["listlabel.json", "column 'label'", "list in row 2"],
    ),
    (
        "notparquet.csv",
        "text,label\na,1\n",
        {"file_format": "parquet"},
        ["notparquet.csv", "parquet"],
    ),
    ("empty.conllu", "", {}, ["empty.conllu", "no sentences"]),
    ("short.conllu", "1\tword\tword\n", {}, ["line 1", "short.conllu", "3 tab-separated"]),
    ("map.csv", "text,label\n" + GOOD_ROWS, {"label_map": {"pos": 1}}, ["['neg']", "label_map"]),
    ("latin.csv", None, {}, ["line 3", "latin.csv", "latin-1"]),
    # issue 33: numpy's scalars printed as [np.int64(1)]
    ("one.csv", "text,label\n" + "a b,1\n" * 6, {}, ["one.csv", "single label [1] "]),
]


def _write(path, content) -> None:
    if content is None:  # a latin-1 file read as utf-8
        path.write_bytes("text,label\nok,pos\ncaf\xe9,neg\n".encode("latin-1"))
    else:
        path.write_text(content, encoding="utf-8")


@pytest.fixture()
def app_cfg(tmp_path, tiny_model_dir, monkeypatch):
    """Compose the app's config with the given overrides; the model must never load."""
    from test_app import compose_cfg

    good = tmp_path / "good.csv"
    good.write_text("text,label\n" + GOOD_ROWS, encoding="utf-8")
    monkeypatch.setattr(
        "lmprobe.app.job.load_model", lambda *a: pytest.fail("the model loaded before the error")
    )
    monkeypatch.setattr(  # (with a feature store, its frame: config, tokenizer, no weights)
        "lmprobe.app.job.model_for_data",
        lambda *a: pytest.fail("the model loaded before the error"),
    )

    def compose(override: str):
        override = override.replace("MISSING", str(tmp_path / "missing"))
        return compose_cfg(
            tmp_path / "run",
            [
                "probes=gpt2_layers",
                f"model.name_or_path={tiny_model_dir}",
                "data=csv",
                f"data.path={good}",
                "logger=none",
                *override.split(" & "),  # several overrides joined by " & "
            ],
        )

    return compose


@pytest.mark.parametrize(("override", "names"), COMPOSITION, ids=[o for o, _ in COMPOSITION])
def test_bad_types_are_refused_while_composing(app_cfg, override, names):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as excinfo:
        app_cfg(override)
    message = str(excinfo.value)
    assert "\n" not in message, message
    full = f"{message} {excinfo.value.__cause__}"
    for name in names:
        assert name in full, (name, full)


@pytest.mark.parametrize(("override", "names"), CONFIG, ids=[o for o, _ in CONFIG])
def test_bad_values_stop_before_the_model_loads(app_cfg, override, names):
    from lmprobe.app.job import train

    cfg = app_cfg(override)
    with pytest.raises(LmProbeError) as excinfo:
        train(cfg)
    check(excinfo, *names)


@pytest.mark.parametrize(
    ("name", "content", "options", "names"), FILES, ids=[row[0] for row in FILES]
)
def test_bad_files_name_the_file_the_line_and_the_fix(
    tmp_path, tokenizer, name, content, options, names
):
    path = tmp_path / name
    _write(path, content)
    with pytest.raises(LmProbeError) as excinfo:
        ProbeDataModule(path=str(path), tokenizer=tokenizer, **options).setup()
    check(excinfo, *names)


def test_a_submodule_whose_output_is_not_a_tensor(small_lm, dataset):
    runner = ProbeRunner(small_lm, [ProbeConfig("transformer.output", [0, 1])])
    with pytest.raises(LmProbeError) as excinfo:
        runner.fit_probes(dataset, dataset, max_epochs=1, enable_progress_bar=False)
    check(excinfo, "'transformer.output'", "not a tensor", ".h.0.output")


@pytest.mark.parametrize(
    ("override", "name"),
    [
        ("logger.tensorboard.default_hp_metric=maybe", "default_hp_metric"),
        ("logger.csv.flush_logs_every_n_steps=often", "flush_logs_every_n_steps"),
    ],
)
def test_logger_keys_are_typed_too(tmp_path, tiny_model_dir, override, name):
    from hydra.errors import ConfigCompositionException
    from test_app import compose_cfg

    with pytest.raises(ConfigCompositionException) as excinfo:
        compose_cfg(tmp_path / "run", ["logger=many_loggers", override])
    assert "\n" not in str(excinfo.value)
    assert name in f"{excinfo.value} {excinfo.value.__cause__}"


def test_numpy_classes_in_messages_print_as_written():
    """Issue 33: classes from numpy (``list(np.unique(y))``) are named as ``[1]``, not
    numpy's ``[np.int64(1)]``."""
    import numpy as np

    for classes, names in (([1, 1], ("[1, 1]", "duplicates")), ([1], ("[1]", "one class"))):
        with pytest.raises(LmProbeError) as excinfo:
            ProbeConfig("transformer.h.0.output", list(np.array(classes)))
        check(excinfo, *names)
        assert "np." not in str(excinfo.value)


def test_fractional_float_input_ids_are_refused():
    """Issue 33: float ids were cast to int64 silently (1.5 read as the id 1); whole floats
    (a float tensor of ids) still read as their ids."""
    mask = torch.ones(2, 3, dtype=torch.long)
    for ids in (torch.tensor([[1.0, 2.0, 3.0], [4.0, 1.5, 6.0]]), [[1, 2, 3], [4, 1.5, 6]]):
        with pytest.raises(LmProbeError) as excinfo:
            ProbeDataset(ids, mask, [0, 1])
        check(excinfo, "input_ids", "1.5", "(1, 1)", "whole number")
    whole = ProbeDataset(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), mask, [0, 1])
    assert whole.input_ids.dtype == torch.long and whole.input_ids[1, 1] == 5
    with pytest.raises(LmProbeError) as excinfo:
        ProbeDataset([[1, 2, 3], [4, 5, 6]], mask.float() / 2, [0, 1])
    check(excinfo, "attention_mask", "0.5")


def test_partial_fit_with_a_label_outside_the_classes_is_refused_and_changes_nothing():
    """Issue 33: scikit-learn's raw ValueError (after the scaler had taken the chunk); now
    one line naming the label and the classes, and the probe is as it was."""
    import numpy as np

    from lmprobe import LinearProbe

    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 4)).astype(np.float32)
    probe = LinearProbe(classes=[0, 1]).partial_fit(X, np.arange(20) % 2)
    coef, mean = probe.estimator_.coef_.copy(), probe.scaler_.mean_.copy()
    with pytest.raises(LmProbeError) as excinfo:
        probe.partial_fit(X[:3], np.array([2, 0, 1]))
    check(excinfo, "label 2", "[0, 1]", "classes=")
    assert np.array_equal(probe.estimator_.coef_, coef)
    assert np.array_equal(probe.scaler_.mean_, mean)
    with pytest.raises(LmProbeError) as excinfo:  # the first call, with classes given
        LinearProbe(classes=[0, 1]).partial_fit(X[:3], np.array([0, 1, 3]))
    check(excinfo, "label 3", "[0, 1]")
