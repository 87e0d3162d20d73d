"""The engine against independent references: sklearn on the same features (defects 5-8)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ONE_ALPHA, reference_sgd
from lightning.pytorch.loggers import Logger
from sklearn import metrics as skm
from sklearn.preprocessing import StandardScaler

from lmprobe import LinearProbe, ProbeConfig, ProbeDataset, ProbeRunner

METRICS = ["loss", "accuracy", "precision", "recall", "f1", "matthews"]


def sklearn_metrics(probe: LinearProbe, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    proba = probe.predict_proba(X)
    pred = probe.predict(X)
    return {
        "loss": skm.log_loss(y, proba, labels=probe.classes_),
        "accuracy": skm.accuracy_score(y, pred),
        "precision": skm.precision_score(y, pred, average="macro", zero_division=0),
        "recall": skm.recall_score(y, pred, average="macro", zero_division=0),
        "f1": skm.f1_score(y, pred, average="macro", zero_division=0),
        "matthews": skm.matthews_corrcoef(y, pred),
    }


@pytest.fixture()
def three_class(docs):
    _, enc, _ = docs
    labels = torch.arange(len(enc["input_ids"])) % 3
    return ProbeDataset(enc["input_ids"], enc["attention_mask"], labels)


def test_metrics_equal_sklearn_on_whole_test_set(gpt2, three_class):
    """Defect 5: the whole test set is scored (test set larger than the training set)."""
    train_set, test_set = three_class.tt_split(test_size=0.6, seed=1)
    configs = [
        ProbeConfig("transformer.h.3.output", [0, 1, 2], early_stopping=False),
        ProbeConfig("transformer.h.8.mlp.output", [0, 1, 2], pooling="last", test_size=0.3),
    ]
    runner = ProbeRunner(gpt2, configs).fit_probes(train_set, test_set, batch_size=8)
    docs = test_set[:]
    features = runner.get_probe_features(docs["input_ids"], docs["attention_mask"])
    for config in configs:
        expected = sklearn_metrics(
            runner[config.name], features[config.name], docs["labels"].numpy()
        )
        row = runner.metrics.loc[config.name]
        assert row["support"] == len(test_set)
        for metric in METRICS:
            assert row[metric] == pytest.approx(expected[metric], abs=1e-5), metric


def test_probe_equals_sklearn_sgd_on_same_features(gpt2, dataset):
    """The bank's training equals StandardScaler + SGDClassifier fed the same batches, in
    the seeded random order of training documents."""
    config = ProbeConfig(
        "transformer.h.4.output", [0, 1], early_stopping=False, model_kwargs={"alpha": 0.01}
    )
    runner = ProbeRunner(gpt2, [config], seed=7)
    runner.fit_probes(dataset, None, num_epoch=1, batch_size=16, chunk_rows=None)
    docs = dataset[:]
    X = runner.get_probe_features(docs["input_ids"], docs["attention_mask"])[config.name]
    y = docs["labels"].numpy()
    scaler = StandardScaler()
    sgd = reference_sgd(0.01, 7)
    order = np.random.default_rng(7).permutation(len(y))  # the seeded training order
    for start in range(0, len(y), 16):
        rows = order[start : start + 16]
        scaler.partial_fit(X[rows])
        sgd.partial_fit(scaler.transform(X[rows]), y[rows], classes=[0, 1])
    probe = runner[config.name]
    assert probe.n_updates_ == -(-len(y) // 16)
    np.testing.assert_allclose(probe.classifier_.coef_, sgd.coef_, atol=1e-4)
    np.testing.assert_array_equal(probe.predict(X), sgd.predict(scaler.transform(X)))


def test_early_stopping_uses_fixed_seeded_heldout_slice(gpt2, dataset):
    """Defect 6: a fixed, seeded slice of the training set, with patience and warmup."""
    configs = [
        # threshold so large that only the first held-out loss counts as an improvement
        ProbeConfig(
            "transformer.h.2.output",
            [0, 1],
            test_size=0.25,
            patience=3,
            threshold=1e9,
            warmup_steps=0,
            refit=False,  # (its online training; refitted, it would train on more rows)
        ),
        ProbeConfig(
            "transformer.h.2.output",
            [0, 1],
            test_size=0.25,
            patience=3,
            threshold=1e9,
            warmup_steps=6,
            name="warm",
            refit=False,
        ),
        ProbeConfig(
            "transformer.h.2.output",
            [0, 1],
            test_size=0.1,
            patience=1000,
            name="small",
            refit=False,
        ),
    ]
    runner = ProbeRunner(gpt2, configs, seed=3)
    runner.fit_probes(dataset, None, num_epoch=1, batch_size=4, chunk_rows=None)
    n = len(dataset)
    union = np.random.default_rng(3).permutation(n)[: round(0.25 * n)]
    assert sorted(runner.module.bank.heldout_index.tolist()) == sorted(union.tolist())
    assert runner.module.bank.steps["transformer.h.2.output"] == 1 + 3
    assert runner.module.bank.steps["warm"] == 6 + 3
    assert runner["warm"].n_updates_ == 6 + 3
    assert runner.module.bank.stopped_early == {
        "transformer.h.2.output": True,
        "warm": True,
        "small": False,
    }
    # 'small' holds out only its own 10%; the rest of the shared slice is training data for it
    assert runner["small"].n_samples_seen_ == n - round(0.1 * n)
    again = ProbeRunner(gpt2, configs, seed=3).fit_probes(dataset, None, batch_size=4)
    # chunked updates (the default) score held-out loss less often, on the same slice
    np.testing.assert_array_equal(again.module.bank.heldout_index, runner.module.bank.heldout_index)


def test_wide_label_values_and_int64(gpt2, docs):
    """Defect 7a: labels are int64, not int8 (values past 127)."""
    _, enc, labels = docs
    wide = torch.where(labels == 1, 1000, 130)
    ds = ProbeDataset(enc["input_ids"], enc["attention_mask"], wide)
    assert ds.labels.dtype == torch.int64
    train_set, test_set = ds.tt_split(test_size=0.25)
    runner = ProbeRunner(gpt2, [ProbeConfig("transformer.h.1.output", [130, 1000])])
    runner.fit_probes(train_set, test_set)
    features = runner.get_probe_features(test_set[:]["input_ids"], test_set[:]["attention_mask"])
    assert set(runner["transformer.h.1.output"].predict(features["transformer.h.1.output"])) <= {
        130,
        1000,
    }
    assert runner.metrics.loc["transformer.h.1.output", "support"] == len(test_set)


def test_token_level_null_label_zero_and_padding_excluded(gpt2, docs):
    """Defect 7b/c: null_label=0 is honoured and padding never reaches the metrics."""
    _, enc, _ = docs
    ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = ids % 2 + 1  # classes 1 and 2, decodable from the token itself
    labels[:, ::3] = 0  # every third position is unlabelled
    labels[mask == 0] = 1  # padding carries a *valid* class: it must still be ignored
    ds = ProbeDataset(ids, mask, labels)
    train_set, test_set = ds.tt_split(test_size=0.3)
    config = ProbeConfig("transformer.h.0.output", [1, 2], pooling="none", null_label=0)
    runner = ProbeRunner(gpt2, [config]).fit_probes(train_set, test_set, batch_size=8)
    docs = test_set[:]
    real = docs["attention_mask"].bool()
    X = runner.get_probe_features(docs["input_ids"], docs["attention_mask"])[config.name]
    X = X[real.numpy()]  # (documents, tokens, d) -> one row per real token
    y_all = docs["labels"][real].numpy()
    keep = y_all != 0
    expected = sklearn_metrics(runner[config.name], X[keep], y_all[keep])
    row = runner.metrics.loc[config.name]
    assert row["support"] == keep.sum()
    for metric in METRICS:
        assert row[metric] == pytest.approx(expected[metric], abs=1e-5), metric
    assert row["accuracy"] > 0.9  # parity of the token id is linearly decodable at layer 0


def test_same_seed_same_metrics(gpt2, dataset):
    """Defect 8: seeded end to end."""
    train_set, test_set = dataset.tt_split(test_size=0.3, seed=5)
    configs = [ProbeConfig("transformer.h.6.output", [0, 1], test_size=0.2, patience=2)]
    first = ProbeRunner(gpt2, configs, seed=11).fit_probes(train_set, test_set).metrics
    second = ProbeRunner(gpt2, configs, seed=11).fit_probes(train_set, test_set).metrics
    pd.testing.assert_frame_equal(first, second)


def test_epochs_after_the_first_reuse_cached_features(gpt2, hf_gpt2, dataset):
    config = ProbeConfig("transformer.h.2.output", [0, 1], early_stopping=False, **ONE_ALPHA)
    runner = ProbeRunner(gpt2, [config])
    calls = {"n": 0}
    handle = hf_gpt2.transformer.h[0].register_forward_pre_hook(
        lambda *_: calls.__setitem__("n", calls["n"] + 1)
    )
    try:
        runner.fit_probes(dataset, None, batch_size=10, max_epochs=3)
    finally:
        handle.remove()
    n_batches = -(-len(dataset) // 10)
    assert calls["n"] == n_batches
    assert runner.module.bank.steps[config.name] == 3 * n_batches
    assert runner[config.name].n_samples_seen_ == 3 * len(dataset)


def test_checkpoint_holds_probes_not_lm_weights(gpt2, dataset, tmp_path):
    config = ProbeConfig("transformer.h.2.output", [0, 1])
    runner = ProbeRunner(gpt2, [config]).fit_probes(dataset, None, batch_size=10)
    path = tmp_path / "probes.ckpt"
    runner.trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["state_dict"] == {}
    restored = ProbeRunner(gpt2, [config])
    restored.module.on_load_checkpoint(checkpoint)
    X = np.random.default_rng(0).normal(size=(5, 64)).astype(np.float32)
    np.testing.assert_array_equal(
        restored[config.name].predict_proba(X), runner[config.name].predict_proba(X)
    )


def test_model_as_hf_model_or_local_path(tokenizer, tiny_model_dir, dataset):
    from conftest import build_gpt2

    config = ProbeConfig("transformer.h.1.output", [0, 1])
    docs = dataset[0:3]
    from_hf = ProbeRunner(build_gpt2(tokenizer), [config], tokenizer=tokenizer)
    from_dir = ProbeRunner(str(tiny_model_dir), [config])
    a = from_hf.get_probe_features(docs["input_ids"], docs["attention_mask"])
    b = from_dir.get_probe_features(docs["input_ids"], docs["attention_mask"])
    np.testing.assert_allclose(a[config.name], b[config.name], atol=1e-6)


@pytest.mark.parametrize("while_tracing", [False, True])
@pytest.mark.parametrize(("chunk_rows", "window"), [(None, None), (32, 1), (32, 2)])
def test_features_leave_the_device_once_per_chunk(
    gpt2, dataset, monkeypatch, chunk_rows, window, while_tracing
):
    """Each device-to-host copy makes the CPU wait for the GPU: one per chunk, not per batch.
    In training, the rows buffered at each group's end leave the device in one copy for all
    sites (at a window's end, before the probes train on them; after other groups, so the
    device holds one group's rows at most). A window trained on the worker thread
    (``while_tracing``) copies its rows once for all sites, so no more often."""
    import lmprobe.tracing.features
    from lmprobe.training.callbacks import ProbeUpdater

    monkeypatch.setattr(ProbeUpdater, "train_while_tracing", while_tracing)
    copied: list[int] = []
    to_host = lmprobe.tracing.features.to_host
    # (numbers copied: parts of several sites travel flattened, end to end)
    monkeypatch.setattr(
        lmprobe.tracing.features, "to_host", lambda X: copied.append(X.numel()) or to_host(X)
    )
    configs = [
        ProbeConfig(f"transformer.h.{i}.output", [0, 1], early_stopping=False, **ONE_ALPHA)
        for i in (1, 3)
    ]
    ProbeRunner(gpt2, configs).fit_probes(
        dataset, dataset, batch_size=4, chunk_rows=chunk_rows, length_window=window
    )
    n = len(dataset)
    per_pass = -(-n // (chunk_rows or 4))  # chunks of chunk_rows rows, else one per batch
    windows = -(-per_pass // (window or 1))
    training = per_pass  # one copy for all sites at every group's end
    # training + the test pass (2 sites x chunks)
    if while_tracing:
        assert windows + 2 * per_pass <= len(copied) <= training + 2 * per_pass
    else:
        assert len(copied) == training + 2 * per_pass
    assert sum(copied) == 2 * 2 * n * 64  # rows 64 wide


def test_batches_stay_on_the_host(gpt2, dataset):
    """Lightning would move batches to its root device; labels and indices are used on the
    host and the LM's inputs go to the LM's own device, so the module keeps them where they are."""
    module = ProbeRunner(gpt2, [ProbeConfig("transformer.h.1.output", [0, 1])]).module
    batch = dataset[0:4]
    moved = module.transfer_batch_to_device(batch, torch.device("cuda", 0), 0)
    assert all(moved[k] is batch[k] for k in batch)


class _Recorder(Logger):
    """A Lightning logger that keeps what it is given."""

    name, version = "recorder", 0

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[dict, int | None]] = []

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((dict(metrics), step))


def _background_configs() -> list[ProbeConfig]:
    return [
        ProbeConfig("transformer.h.1.output", [0, 1], early_stopping=False),
        ProbeConfig("transformer.h.3.output", [0, 1], test_size=0.2, patience=2),
    ]


@pytest.mark.parametrize("epochs", [1, 3])
def test_last_training_runs_while_the_test_set_is_traced(gpt2, dataset, monkeypatch, epochs):
    """The run's last training and the refit run on a worker thread while the test set is
    traced: the worker is still at work when the first test batch has been traced. One
    epoch: the last training is the only one (one window); three: the probe with a
    held-out slice is refitted on every row (features kept in the first epoch). The
    probes, their steps and held-out curves (all logged), and the test table equal those of
    a run that does all of it in place."""
    import threading
    import time

    from lmprobe.bank.bank import ProbeBank
    from lmprobe.training.callbacks import ProbeUpdater
    from lmprobe.training.module import ProbeModule

    fit = {"batch_size": 4, "num_epoch": epochs}
    with monkeypatch.context() as m:  # in place: nothing on the worker thread
        m.setattr(ProbeUpdater, "_in_background", lambda *args: False)
        in_place = ProbeRunner(gpt2, _background_configs(), seed=3).fit_probes(
            dataset, dataset, **fit
        )

    traced, seen = threading.Event(), []

    def held(method):
        # on the worker, hold the work until the test pass has traced a batch, and a while
        # longer: long enough for the test pass to end, so scoring must wait for it
        def run(self, name, *args):
            if threading.current_thread() is not threading.main_thread():
                seen.append((method.__name__, name, traced.wait(timeout=20)))
                time.sleep(0.5)
            return method(self, name, *args)

        return run

    test_step = ProbeModule.test_step

    def marking_test_step(self, *args):
        result = test_step(self, *args)
        traced.set()
        return result

    monkeypatch.setattr(ProbeBank, "_train_on", held(ProbeBank._train_on))
    monkeypatch.setattr(ProbeBank, "_refit", held(ProbeBank._refit))
    monkeypatch.setattr(ProbeModule, "test_step", marking_test_step)
    logger = _Recorder()
    background = ProbeRunner(gpt2, _background_configs(), seed=3).fit_probes(
        dataset, dataset, logger=logger, **fit
    )
    always, stopping = (c.name for c in _background_configs())
    bank, reference = background.module.bank, in_place.module.bank
    # on the worker, during the test pass: the last training of the probes still training
    # (both, in one epoch: its one window) and, after three epochs, the refits (the probe
    # with a held-out slice is refitted)
    assert seen and all(during_test for *_, during_test in seen)
    assert ("_train_on", always, True) in seen
    if epochs == 1:
        assert ("_train_on", stopping, True) in seen
    else:
        assert seen[-2:] == [("_refit", always, True), ("_refit", stopping, True)]
        assert bank.refitted[stopping] and reference.refitted[stopping]
    assert not bank.training_pending
    for name in (always, stopping):
        for ours, theirs in zip(
            background[name].estimators_, in_place[name].estimators_, strict=True
        ):
            np.testing.assert_array_equal(ours.coef_, theirs.coef_)
            np.testing.assert_array_equal(ours.intercept_, theirs.intercept_)
        assert bank.steps[name] == reference.steps[name] > 0
        assert bank.history[name] == reference.history[name]
        logged = [
            (step, row[f"train/{name}/heldout_loss"])
            for row, step in logger.rows
            if f"train/{name}/heldout_loss" in row
        ]
        assert logged == list(bank.history[name])
    assert bank.history[stopping]  # a curve was logged
    pd.testing.assert_frame_equal(background.metrics, in_place.metrics)


def test_an_error_of_the_background_training_reaches_the_caller(gpt2, dataset, monkeypatch):
    """A failure of the training on the worker thread is raised by ``fit_probes``."""
    import threading

    from lmprobe.bank.bank import ProbeBank

    where = []

    def failing(self, *args):
        where.append(threading.current_thread() is threading.main_thread())
        raise RuntimeError("the probe update failed")

    monkeypatch.setattr(ProbeBank, "_train_on", failing)
    runner = ProbeRunner(gpt2, _background_configs(), seed=3)
    with pytest.raises(RuntimeError, match="the probe update failed"):
        runner.fit_probes(dataset, dataset, batch_size=4, num_epoch=1)
    # every probe's update ran (on worker threads), then the first error is reported by the caller
    assert where and not any(where)
    assert not runner.module.bank.training_pending
