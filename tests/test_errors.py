"""Every bad input gets a one-line LmProbeError, raised by lmprobe, naming the bad value."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from lmprobe import LmProbeError, NonFiniteActivationError, ProbeConfig, ProbeDataset, ProbeRunner
from lmprobe.datamodule import ProbeDataModule


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
    monkeypatch.setattr("lmprobe.module.trace_features", lambda *a, **k: traced.append(1))
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
    from lmprobe.datamodule import ProbeDataModule
    from lmprobe.engine import fit_and_test, make_trainer, probe_callbacks

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

    from lmprobe.io import atomic_write_bytes

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
