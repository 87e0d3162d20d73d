"""Metrics do not depend on the order in which ``classes`` are given (issue 15).

scikit-learn keeps ``classes_`` sorted and ``predict_proba``'s columns follow it; a probe that
kept the user's order mapped targets through one order and predictions through the other.
The reference here is scikit-learn's own metric, computed from ``predict()`` and
``predict_proba()`` on the same features.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from lmprobe import LinearProbe, ProbeConfig, ProbeDataset, ProbeRunner

METRICS = ["loss", "accuracy", "precision", "recall", "f1", "matthews"]


def reference_metrics(probe: LinearProbe, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """From ``predict()`` (never from our own column bookkeeping) and ``predict_proba()``."""
    pred = probe.predict(X)
    proba = probe.predict_proba(X)
    return {
        # log_loss sorts ``labels`` itself, as predict_proba's columns are sorted
        "loss": skm.log_loss(y, proba, labels=np.unique(list(probe.classes))),
        "accuracy": skm.accuracy_score(y, pred),
        "precision": skm.precision_score(y, pred, average="macro", zero_division=0),
        "recall": skm.recall_score(y, pred, average="macro", zero_division=0),
        "f1": skm.f1_score(y, pred, average="macro", zero_division=0),
        "matthews": skm.matthews_corrcoef(y, pred),
    }


# Orders a user may give: sorted, reversed, what ``set()`` happens to iterate, a list of their own.
ORDERS = {
    "sorted": [130, 1000],
    "reversed": [1000, 130],
    "set": list({130, 1000}),
    "three-own-order": [2000, 7, 130],
}


@pytest.mark.parametrize("order", list(ORDERS))
def test_runner_metrics_follow_predict_whatever_the_class_order(gpt2, docs, order):
    classes = ORDERS[order]
    _, enc, labels = docs
    # a decodable label: the polarity decides between the first two values, every fifth
    # document takes the third value when there is one
    values = torch.tensor(sorted(classes))
    y = values[labels]
    if len(classes) == 3:
        y[::5] = values[2]
    ds = ProbeDataset(enc["input_ids"], enc["attention_mask"], y)
    train_set, test_set = ds.tt_split(test_size=0.4, seed=0)
    # one alpha: 48 training rows are too few to choose one on a held-out slice
    config = ProbeConfig(
        "transformer.h.2.output", classes, early_stopping=False, model_kwargs={"alpha": 1e-2}
    )
    runner = ProbeRunner(gpt2, [config], seed=0)
    runner.fit_probes(train_set, test_set, batch_size=8)
    probe = runner[config.name]
    assert list(probe.classes_) == sorted(classes)  # one canonical order inside the probe
    assert list(probe.classes) == list(classes)  # the user's order, kept for display
    docs_ = test_set[:]
    X = runner.get_probe_features(docs_["input_ids"], docs_["attention_mask"])[config.name]
    expected = reference_metrics(probe, X, docs_["labels"].numpy())
    row = runner.metrics.loc[config.name]
    # the probe learned something (majority: 0.4), so an inversion of classes would show
    assert expected["accuracy"] > 0.5
    for metric in METRICS:
        assert row[metric] == pytest.approx(expected[metric], abs=1e-5), metric


@pytest.mark.parametrize(
    "classes", [["pos", "neg"], ["neg", "pos"], ["zebra", "apple", "mango"], [5, -3, 0]]
)
def test_scores_of_string_and_unsorted_classes_equal_sklearn(classes):
    """Label types scikit-learn accepts (strings, integers in any order): the probe and the accumulated scores agree with
    sklearn whatever order ``classes`` comes in, over several chunks."""
    from lmprobe.scoring.metrics import ClassificationScores

    rng = np.random.default_rng(0)
    n, d = 600, 6
    y_index = rng.integers(0, len(classes), n)
    X = rng.normal(size=(n, d)).astype(np.float32) + y_index[:, None] * 0.8
    y = np.asarray(classes, dtype=object)[y_index]
    if isinstance(classes[0], int):
        y = y.astype(int)
    probe = LinearProbe(classes, random_state=0)
    for start in range(0, 400, 50):
        probe.partial_fit(X[start : start + 50], y[start : start + 50])
    assert list(probe.classes_) == sorted(classes)
    assert list(probe.classifier_.classes_) == list(probe.classes_)
    scores = ClassificationScores(probe.classes_)
    for start in range(400, n, 64):  # several chunks of the test rows
        rows = slice(start, start + 64)
        scores.update(y[rows], probe.predict(X[rows]), probe.predict_proba(X[rows]))
    got = scores.compute()
    expected = reference_metrics(probe, X[400:], y[400:])
    assert expected["accuracy"] > 0.5
    assert got["support"] == n - 400
    for metric in METRICS:
        assert got[metric] == pytest.approx(expected[metric], abs=1e-5), metric
