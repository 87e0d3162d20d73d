"""Probes trained with the defaults converge: each matches a tuned full-batch logistic
regression (StandardScaler + LogisticRegressionCV) on the same features and split, and the
alpha grid trains each alpha exactly as scikit-learn's SGD would and chooses on held-out rows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_texts, reference_sgd
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import log_loss
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from lmprobe import LinearProbe, ProbeConfig, ProbeDataset, ProbeRunner
from lmprobe.bank.bank import ProbeBank
from lmprobe.bank.refit import REFIT_ROWS
from lmprobe.errors import LmProbeError
from lmprobe.probes.kinds import DEFAULT_ALPHAS


def reference_accuracy(X_train, y_train, X_test, y_test) -> float:
    """A tuned full-batch linear model: what a converged probe should reach."""
    model = make_pipeline(
        StandardScaler(),
        LogisticRegressionCV(Cs=np.logspace(-4, 2, 13), max_iter=5000, scoring="accuracy"),
    )
    return float(model.fit(X_train, y_train).score(X_test, y_test))


def check_against_reference(probe_accuracy: dict, reference: dict, tolerance=0.02) -> None:
    """Within 2 points of the reference at every site, and the best site is the reference's
    best or one within 1 point of it in the reference."""
    for name, ref in reference.items():
        assert probe_accuracy[name] >= ref - tolerance, (name, probe_accuracy[name], ref)
    best = max(probe_accuracy, key=probe_accuracy.get)
    assert reference[best] >= max(reference.values()) - 0.01, (best, reference)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_alpha_grid_trains_each_alpha_like_sklearn_and_chooses_on_heldout_rows(tmp_path, n_classes):
    rng = np.random.default_rng(0)
    X = (rng.normal(size=(600, 6)) * [1, 10, 100, 1, 1, 1]).astype(np.float32)
    y = (X[:, 0] + X[:, 1] / 10 + rng.normal(size=600) > 0).astype(np.int64)
    if n_classes == 3:
        y[X[:, 2] > 50] = 2
    classes = list(range(n_classes))
    probe = LinearProbe(classes, random_state=4)
    assert probe.alphas == list(DEFAULT_ALPHAS)
    scaler = StandardScaler()
    references = [reference_sgd(a, 4) for a in DEFAULT_ALPHAS]
    for _ in range(3):
        for rows in np.array_split(np.arange(500), 4):
            probe.partial_fit(X[rows], y[rows])
            scaler.partial_fit(X[rows])
            for sgd in references:
                sgd.partial_fit(scaler.transform(X[rows]), y[rows], classes=classes)
    for sgd, estimator in zip(references, probe.estimators_, strict=True):
        np.testing.assert_allclose(estimator.coef_, sgd.coef_, rtol=1e-5)
    heldout = np.arange(500, 600)
    losses = [
        log_loss(y[heldout], sgd.predict_proba(scaler.transform(X[heldout])), labels=classes)
        for sgd in references
    ]
    assert probe.heldout_loss(X[heldout], y[heldout]) == pytest.approx(min(losses), rel=1e-5)
    assert probe.alpha_ == DEFAULT_ALPHAS[int(np.argmin(losses))]
    chosen = references[int(np.argmin(losses))]
    np.testing.assert_allclose(
        probe.predict_proba(X), chosen.predict_proba(scaler.transform(X)), rtol=1e-5, atol=1e-7
    )
    # the grid and the choice survive a save and a load (no pickle)
    restored = LinearProbe.load(probe.save(tmp_path / "grid.safetensors"))
    assert restored.alpha_ == probe.alpha_
    for a, b in zip(restored.estimators_, probe.estimators_, strict=True):
        np.testing.assert_array_equal(a.coef_, b.coef_)
    np.testing.assert_array_equal(restored.predict_proba(X), probe.predict_proba(X))


def test_a_grid_holds_out_rows_even_without_early_stopping():
    grid = ProbeConfig("a.output", [0, 1], early_stopping=False)
    fixed = ProbeConfig("b.output", [0, 1], early_stopping=False, model_kwargs={"alpha": 0.1})
    bank = ProbeBank([grid, fixed], seed=0)
    assert len(bank.heldout_plan(100)) == 10
    assert ProbeBank([fixed]).heldout_plan(100).size == 0


@pytest.mark.parametrize("alpha", ["big", [], [0.1, -1], [0.1, float("nan")]])
def test_a_bad_alpha_is_a_one_line_error(alpha):
    with pytest.raises(LmProbeError, match="alpha"):
        ProbeConfig("a.output", [0, 1], model_kwargs={"alpha": alpha})


def test_default_probes_match_logistic_regression_cv_on_the_tiny_model(gpt2, base_tokenizer):
    texts, labels = make_texts(1000, seed=3)
    enc = base_tokenizer(texts, padding=True, return_tensors="pt")
    dataset = ProbeDataset(enc["input_ids"], enc["attention_mask"], labels)
    train_set, test_set = dataset.tt_split(test_size=0.4, seed=0)
    sites = [f"transformer.h.{i}.output" for i in (0, 3, 6, 11)]
    runner = ProbeRunner(gpt2, [ProbeConfig(s, [0, 1]) for s in sites])
    runner.fit_probes(train_set, test_set, enable_progress_bar=False)  # the defaults
    train, test = train_set[:], test_set[:]
    X_train = runner.get_probe_features(train["input_ids"], train["attention_mask"])
    X_test = runner.get_probe_features(test["input_ids"], test["attention_mask"])
    reference = {
        s: reference_accuracy(X_train[s], train["labels"], X_test[s], test["labels"]) for s in sites
    }
    accuracy = runner.metrics["accuracy"].to_dict()
    print({s: (round(accuracy[s], 3), round(reference[s], 3)) for s in sites})
    print(runner.metrics[["alpha", "steps", "stopped_early", "refit"]])
    assert runner.metrics["refit"].all()
    check_against_reference(accuracy, reference)


def test_refit_trains_the_chosen_alpha_on_every_row_as_documented():
    """After training, the probe is retrained on all training rows (its held-out slice
    included) with the alpha the slice chose and as many passes as it trained: a replay of
    that rule with scikit-learn gives the same coefficients."""
    from lmprobe.tracing.features import Features, PendingFeatures

    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 5)).astype(np.float32)
    y = (X[:, 0] - X[:, 1] + rng.normal(size=300) > 0).astype(np.int64)
    config = ProbeConfig("a.output", [0, 1], early_stopping=False)  # the default grid
    bank = ProbeBank([config], seed=5)
    key = bank.key(config.name)
    union = bank.heldout_plan(300)
    bank.set_heldout(union, 300, {key: Features(X[union], y[union], union)})
    train = np.setdiff1d(np.arange(300), union)
    for _ in range(3):  # three passes in chunks of 90
        for rows in np.array_split(train, 3):
            bank.update({key: PendingFeatures(torch.from_numpy(X[rows]), y[rows], rows)}, None)
    chosen = bank.probes[config.name].alpha_
    kept = Features(X[train[::-1]], y[train[::-1]], train[::-1])  # any order: sorted by doc
    assert not bank.refit(config.name, kept.select_docs(train[:-1]), 300)
    assert bank.refit(config.name, kept, 300)
    scaler = StandardScaler()
    sgd = reference_sgd(chosen, 5)
    for epoch in range(3):
        perm = np.random.default_rng((5, epoch)).permutation(300)
        for start in range(0, 300, REFIT_ROWS):  # 256 rows an update, then the rest
            rows = perm[start : start + REFIT_ROWS]  # rows in document order = row numbers here
            scaler.partial_fit(X[rows])
            sgd.partial_fit(scaler.transform(X[rows]), y[rows], classes=[0, 1])
    refitted = bank.probes[config.name]
    assert refitted.alpha_ == chosen and refitted.n_samples_seen_ == 900
    np.testing.assert_allclose(refitted.classifier_.coef_, sgd.coef_, rtol=1e-5)
    assert bank.refitted[config.name]
