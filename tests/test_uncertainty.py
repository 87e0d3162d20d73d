"""Intervals, paired comparisons, AUROC, the majority baseline and MDL code lengths, each
against a computation by hand on the same features (issue 9, parts 2, 4 and 5)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn import metrics as skm

from lmprobe import ProbeConfig, ProbeDataset, ProbeRunner
from lmprobe.bank.refit import REFIT_ROWS
from lmprobe.data.datamodule import ProbeDataModule
from lmprobe.training.engine import fit_and_test, make_trainer, probe_callbacks

SITES = ["transformer.h.2.output", "transformer.h.9.output"]
RESAMPLES = 200


@pytest.fixture(scope="module")
def fitted(gpt2, docs):
    _, enc, labels = docs
    ds = ProbeDataset(enc["input_ids"], enc["attention_mask"], labels)
    train_set, test_set = ds.tt_split(test_size=0.4, seed=3)
    runner, table = fit_and_score(gpt2, train_set, test_set, group_size=16)
    docs_ = test_set[:]
    X = runner.get_probe_features(docs_["input_ids"], docs_["attention_mask"])
    return runner, table, X, docs_["labels"].numpy(), train_set


def fit_and_score(gpt2, train_set, test_set, group_size=None):
    """One probe per site of ``SITES``, one epoch, test table with ``RESAMPLES``."""
    configs = [ProbeConfig(s, [0, 1], early_stopping=False) for s in SITES]
    runner = ProbeRunner(gpt2, configs, seed=4)
    trainer = make_trainer(
        runner.module,
        max_epochs=1,
        callbacks=probe_callbacks(4, chunk_rows=16, bootstrap=RESAMPLES),
        enable_progress_bar=False,
    )
    datamodule = ProbeDataModule(
        train_set=train_set, test_set=test_set, batch_size=8, seed=4, group_size=group_size
    )
    return runner, fit_and_test(trainer, runner.module, datamodule)


def by_hand(probe, X, y):
    """The bootstrap as lmprobe.scoring.uncertainty documents it, with scikit-learn's metrics."""
    pred, proba = probe.predict(X), probe.predict_proba(X)
    eps = np.finfo(proba.dtype).eps
    loss = -np.log(np.clip(proba[np.arange(len(y)), y], eps, 1 - eps))
    samples = {"accuracy": [], "f1": [], "matthews": [], "loss": []}
    for b in range(RESAMPLES):
        i = np.random.default_rng((4, b)).integers(0, len(y), len(y))
        samples["accuracy"].append(skm.accuracy_score(y[i], pred[i]))
        samples["f1"].append(skm.f1_score(y[i], pred[i], average="macro", zero_division=0))
        samples["matthews"].append(skm.matthews_corrcoef(y[i], pred[i]))
        samples["loss"].append(loss[i].mean())
    return samples


def test_bootstrap_intervals_equal_a_bootstrap_by_hand(fitted):
    runner, table, X, y, _ = fitted
    for site in SITES:
        samples = by_hand(runner[site], X[site], y)
        row = table.loc[site]
        for metric, values in samples.items():
            low, high = np.percentile(values, [2.5, 97.5])
            # (the loss moves with float noise: the reference's features come from other batches)
            assert row[f"{metric}_low"] == pytest.approx(low, rel=1e-6, abs=1e-9), metric
            assert row[f"{metric}_high"] == pytest.approx(high, rel=1e-6, abs=1e-9), metric
            assert row[f"{metric}_low"] <= row[metric] <= row[f"{metric}_high"] or metric == "loss"


def test_p_vs_best_is_the_paired_bootstrap_by_hand(fitted):
    runner, table, X, y, _ = fitted
    accuracy = {s: skm.accuracy_score(y, runner[s].predict(X[s])) for s in SITES}
    best = max(SITES, key=lambda s: (accuracy[s], s))
    other = next(s for s in SITES if s != best)
    difference = np.asarray(by_hand(runner[best], X[best], y)["accuracy"]) - np.asarray(
        by_hand(runner[other], X[other], y)["accuracy"]
    )
    expected = min(1.0, 2 * min((difference <= 0).mean(), (difference >= 0).mean()))
    assert table.loc[best, "p_vs_best"] == 1.0
    assert table.loc[other, "p_vs_best"] == pytest.approx(expected)


def test_auroc_and_majority_baseline_equal_sklearn(fitted):
    runner, table, X, y, train_set = fitted
    for site in SITES:
        proba = runner[site].predict_proba(X[site])
        assert table.loc[site, "auroc"] == pytest.approx(skm.roc_auc_score(y, proba[:, 1]), 1e-6)
    # majority class of the rows each probe trained on (no held-out slice here: all of them)
    majority = np.bincount(train_set.labels.numpy()).argmax()
    assert table["majority_accuracy"].tolist() == pytest.approx([(y == majority).mean()] * 2)


def test_multiclass_auroc_is_macro_one_vs_rest(gpt2, docs):
    _, enc, labels = docs
    y = (torch.arange(len(labels)) % 3 + labels) % 3
    ds = ProbeDataset(enc["input_ids"], enc["attention_mask"], y)
    train_set, test_set = ds.tt_split(test_size=0.4, seed=0)
    config = ProbeConfig(SITES[0], [0, 1, 2], early_stopping=False)
    runner = ProbeRunner(gpt2, [config]).fit_probes(train_set, test_set, num_epoch=2)
    docs_ = test_set[:]
    X = runner.get_probe_features(docs_["input_ids"], docs_["attention_mask"])[config.name]
    expected = skm.roc_auc_score(
        docs_["labels"].numpy(), runner[config.name].predict_proba(X), multi_class="ovr"
    )
    assert runner.metrics.loc[config.name, "auroc"] == pytest.approx(expected, abs=1e-5)


def test_online_code_length_equals_a_sum_by_hand(gpt2, dataset):
    """MDL (Voita & Titov), issue 35: when training ends, from the kept features, every
    training row in a seeded order cut at 0.1%, ..., 50%, 100%; each block coded by a probe
    trained on every row before it (``test_mdl.by_hand``); the control twin's the same way."""
    from test_mdl import by_hand

    # (alpha 0.05: a less overconfident probe, whose code length float noise barely moves)
    config = ProbeConfig(
        SITES[1], [0, 1], early_stopping=False, model_kwargs={"alpha": 0.05}, control=True
    )
    runner = ProbeRunner(gpt2, [config], seed=6)
    runner.fit_probes(dataset, dataset, num_epoch=3, batch_size=8, chunk_rows=24)
    docs_ = dataset[:]
    X = runner.get_probe_features(docs_["input_ids"], docs_["attention_mask"])[config.name]
    y = docs_["labels"].numpy()
    bits, uniform, _ = by_hand(
        X, y, np.array([0, 1]), 0.05, passes=3, chunk_rows=REFIT_ROWS, seed=6
    )
    row = runner.metrics.loc[config.name]
    assert row["codelength_bits"] == pytest.approx(bits, rel=1e-5)
    assert row["compression"] == pytest.approx(uniform / bits, rel=1e-5)
    assert row["compression"] > 1.1  # 120 rows of an easy task (1.23 when written)
    # the control twin's labels are a permutation: less to compress
    assert row["control_compression"] < row["compression"]
    assert row["control_codelength_bits"] == pytest.approx(uniform / row["control_compression"])


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_control_twins_learn_the_control_task_by_hand(gpt2, docs, level):
    """A control twin is trained, from the same features, on the control labels computed
    here by hand; its accuracy and the selectivity land in the probe's row."""
    _, enc, labels = docs
    ids, mask = enc["input_ids"], enc["attention_mask"]
    token = level == "token"
    y = (ids % 2) if token else labels
    ds = ProbeDataset(ids, mask, y)
    train_set, test_set = ds.tt_split(test_size=0.4, seed=0)
    pooling = "none" if token else "mean"
    config = ProbeConfig(SITES[0], [0, 1], pooling=pooling, early_stopping=False, control=True)
    runner = ProbeRunner(gpt2, [config], seed=9)
    runner.fit_probes(train_set, test_set, num_epoch=2, batch_size=8, chunk_rows=None)
    assert [c.name for c in runner.configs] == [config.name]  # the twin stays inside
    if token:  # each token type -> a seeded label drawn from the training labels
        real = train_set.attention_mask.bool()
        _, counts = np.unique(train_set.labels[real].numpy(), return_counts=True)
        size = int(max(train_set.input_ids.max(), test_set.input_ids.max())) + 1
        table = np.random.default_rng(9).choice(2, size=size, p=counts / counts.sum())
        control_test = table[test_set.input_ids.numpy()][test_set.attention_mask.bool().numpy()]
    else:  # a seeded permutation of the split's labels
        order = np.random.default_rng((9, 2)).permutation(len(test_set))
        control_test = test_set.labels.numpy()[order]
    twin = runner.module.bank.probes[f"{config.name}/control"]
    docs_ = test_set[:]
    X = runner.get_probe_features(docs_["input_ids"], docs_["attention_mask"])[config.name]
    if token:
        X = X[docs_["attention_mask"].bool().numpy()]
    expected = skm.accuracy_score(control_test, twin.predict(X))
    row = runner.metrics.loc[config.name]
    assert row["control_accuracy"] == pytest.approx(expected)
    assert row["selectivity"] == pytest.approx(row["accuracy"] - expected)
    assert f"{config.name}/control" not in runner.metrics.index
    # the twin learned from other labels than the probe: other weights
    assert not np.allclose(twin.classifier_.coef_, runner[config.name].classifier_.coef_)
    if token:  # token types are memorisable: far above chance on the training tokens
        assert row["accuracy"] > 0.9


def test_random_init_copy_reinitialises_every_weight_seeded(gpt2):
    from lmprobe.results.baselines import random_init_copy

    a, b, c = (random_init_copy(gpt2, seed) for seed in (3, 3, 4))
    for name, original in gpt2._module.named_parameters():
        pa = dict(a._module.named_parameters())[name]
        assert torch.equal(pa, dict(b._module.named_parameters())[name]), name  # seeded
        if original.dim() == 2:  # weight matrices: redrawn, at the config's init scale
            assert not torch.equal(pa, original), name
            assert not torch.equal(pa, dict(c._module.named_parameters())[name]), name
            # GPT-2 draws at initializer_range, residual projections at it / sqrt(2 n_layer)
            scale = gpt2._module.config.initializer_range
            expected = scale / math.sqrt(2 * 12) if "c_proj" in name else scale
            assert pa.std().item() == pytest.approx(expected, rel=0.15), name


def test_random_init_baseline_stands_beside_each_probe(gpt2, docs):
    """baseline="random_init": the same probes fitted the same way on the re-initialised
    model; their accuracy is the one a plain run on that model gets."""
    from lmprobe.results.baselines import random_init_copy

    _, enc, labels = docs
    ds = ProbeDataset(enc["input_ids"], enc["attention_mask"], labels)
    train_set, test_set = ds.tt_split(test_size=0.4, seed=1)
    configs = [ProbeConfig(s, [0, 1], early_stopping=False) for s in SITES]
    runner = ProbeRunner(gpt2, configs, seed=2)
    runner.fit_probes(train_set, test_set, num_epoch=2, batch_size=8, baseline="random_init")
    plain = ProbeRunner(random_init_copy(gpt2, 2), configs, seed=2)
    plain.fit_probes(train_set, test_set, num_epoch=2, batch_size=8)
    for site in SITES:
        row = runner.metrics.loc[site]
        assert row["random_init_accuracy"] == pytest.approx(plain.metrics.loc[site, "accuracy"])
        low, high = row["random_init_accuracy_low"], row["random_init_accuracy_high"]
        assert low <= row["random_init_accuracy"] <= high


def test_bootstrap_of_several_classes_equals_resampling_by_hand():
    """Every metric of every resample (one product of the draw counts per probe) equals
    scikit-learn on the resampled rows themselves, with four classes, one of them rare (so
    some resamples miss it)."""
    from lmprobe.scoring.uncertainty import bootstrap

    rng = np.random.default_rng(0)
    n, k, resamples, seed = 60, 4, 300, 5
    target = rng.choice(k, n, p=[0.4, 0.3, 0.27, 0.03])
    pred = np.where(rng.random(n) < 0.6, target, rng.integers(0, k, n))
    loss = rng.random(n)
    rows = {"probe": {"target": target, "pred": pred, "loss": loss, "doc": np.arange(n)}}
    intervals, accuracies = bootstrap(rows, {"probe": k}, resamples, seed)
    macro = dict(average="macro", zero_division=0)
    by_hand = {m: [] for m in ("accuracy", "precision", "recall", "f1", "matthews", "loss")}
    for b in range(resamples):
        i = np.random.default_rng((seed, b)).integers(0, n, n)
        t, p = target[i], pred[i]
        by_hand["accuracy"].append(skm.accuracy_score(t, p))
        by_hand["precision"].append(skm.precision_score(t, p, **macro))
        by_hand["recall"].append(skm.recall_score(t, p, **macro))
        by_hand["f1"].append(skm.f1_score(t, p, **macro))
        by_hand["matthews"].append(skm.matthews_corrcoef(t, p))
        by_hand["loss"].append(loss[i].mean())
    assert accuracies["probe"] == pytest.approx(by_hand["accuracy"], abs=1e-12)
    for metric, values in by_hand.items():
        low, high = np.percentile(values, [2.5, 97.5])
        assert intervals["probe"][f"{metric}_low"] == pytest.approx(low, abs=1e-12), metric
        assert intervals["probe"][f"{metric}_high"] == pytest.approx(high, abs=1e-12), metric


def test_the_test_bootstrap_is_drawn_once_while_the_test_set_is_traced(gpt2, docs, monkeypatch):
    """The resamples are drawn on the worker thread during the test pass, once for every
    probe scored on the test documents, and give the intervals drawing them at the end
    gives."""
    import threading

    import lmprobe.bank.bank
    import lmprobe.bank.scoring
    import lmprobe.scoring.uncertainty

    _, enc, labels = docs
    ds = ProbeDataset(enc["input_ids"], enc["attention_mask"], labels)
    train_set, test_set = ds.tt_split(test_size=0.4, seed=3)
    calls = []

    def spying(module):
        draw = module.resample_counts

        def spy(*args):
            calls.append((module.__name__, threading.current_thread().name))
            return draw(*args)

        monkeypatch.setattr(module, "resample_counts", spy)

    spying(lmprobe.bank.scoring)
    spying(lmprobe.scoring.uncertainty)
    _, ahead = fit_and_score(gpt2, train_set, test_set)
    assert calls == [
        ("lmprobe.bank.scoring", "lmprobe-bank")
    ]  # once, for both probes, on the worker
    calls.clear()
    monkeypatch.setattr(lmprobe.bank.bank.ProbeBank, "draw_resamples", lambda *args: None)
    _, at_the_end = fit_and_score(gpt2, train_set, test_set)
    assert calls == [("lmprobe.scoring.uncertainty", "MainThread")]
    bounds = [c for c in ahead.columns if c.endswith(("_low", "_high"))] + ["p_vs_best"]
    assert len(bounds) == 13  # six metrics, and the paired p-value
    pd.testing.assert_frame_equal(ahead[bounds], at_the_end[bounds])


def test_a_failed_draw_ahead_falls_back_to_drawing_at_the_end(gpt2, docs, monkeypatch, caplog):
    """If drawing the resamples on the worker fails (out of memory, say), the test table
    still gets its intervals, drawn at the end: the same ones."""
    import lmprobe.bank.scoring

    _, enc, labels = docs
    ds = ProbeDataset(enc["input_ids"], enc["attention_mask"], labels)
    train_set, test_set = ds.tt_split(test_size=0.4, seed=3)
    _, drawn_ahead = fit_and_score(gpt2, train_set, test_set)

    def failing(*args):
        raise MemoryError("no room for the draws")

    monkeypatch.setattr(lmprobe.bank.scoring, "resample_counts", failing)
    _, drawn_at_the_end = fit_and_score(gpt2, train_set, test_set)
    assert "drawing the bootstrap's resamples ahead failed" in caplog.text
    bounds = [c for c in drawn_ahead.columns if c.endswith(("_low", "_high"))]
    pd.testing.assert_frame_equal(drawn_ahead[bounds], drawn_at_the_end[bounds])


def scored(classes, y, proba):
    """A ``ClassificationScores`` of ``classes`` fed rows of labels ``y`` and ``proba``."""
    from lmprobe.scoring.metrics import ClassificationScores

    scores = ClassificationScores(np.asarray(classes))
    pred = np.asarray(classes)[proba.argmax(1)]
    scores.update(y[:40], pred[:40], proba[:40])  # two chunks, as a test pass adds them
    scores.update(y[40:], pred[40:], proba[40:])
    return scores.auroc()


def test_multiclass_auroc_averages_over_the_classes_present_in_the_targets():
    """Issue 33, item 3: a class seen in training only (3 here) has no positives in the test
    rows; AUROC is the macro one-vs-rest average over the classes present (0, 1, 2), as
    precision, recall and F1 average over the classes present, not a 0 for class 3."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 90)
    logits = rng.normal(size=(90, 4)) + 1.5 * np.eye(4)[y]
    # class 3's column is 0 in every row, so the present columns are probabilities and
    # scikit-learn's multi-class call with labels=present takes the same scores
    proba = np.exp(logits[:, :3]) / np.exp(logits[:, :3]).sum(1, keepdims=True)
    proba = np.concatenate([proba, np.zeros((90, 1))], axis=1)
    expected = skm.roc_auc_score(
        y, proba[:, :3], multi_class="ovr", average="macro", labels=[0, 1, 2]
    )
    assert scored([0, 1, 2, 3], y, proba) == pytest.approx(expected, abs=1e-6)
    # class 3 with its own share of probability: the same average of one-vs-rest curves
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    indicator = (y[:, None] == np.arange(3)).astype(int)
    expected = skm.roc_auc_score(indicator, proba[:, :3], average="macro")
    by_class = [skm.roc_auc_score(y == c, proba[:, c]) for c in range(3)]
    assert expected == pytest.approx(np.mean(by_class))
    assert scored([0, 1, 2, 3], y, proba) == pytest.approx(expected, abs=1e-6)
    assert expected > 0.7  # (informative scores: the old average over 4 was under 0.75)


def test_a_chance_level_many_class_auroc_is_one_half():
    """500 classes, 300 test rows (most classes absent), random probabilities: about 0.5,
    and scikit-learn's one-vs-rest average over the classes present."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 500, 300)
    proba = rng.dirichlet(np.ones(500), size=300)
    present = np.unique(y)
    indicator = (y[:, None] == present).astype(int)
    expected = skm.roc_auc_score(indicator, proba[:, present], average="macro")
    auroc = scored(np.arange(500), y, proba)
    assert auroc == pytest.approx(expected, abs=1e-6)
    assert abs(auroc - 0.5) < 0.03
