"""The exact multinomial probe (``probes.kind=logistic``, issue 35) against scikit-learn's
LogisticRegressionCV and LogisticRegression on the same features and rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_texts, reference_sgd
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from test_mdl import FRACTIONS

from lmprobe import ProbeConfig, ProbeDataset, ProbeRunner
from lmprobe.bank.bank import ProbeBank
from lmprobe.bank.refit import REFIT_ROWS
from lmprobe.probes.kinds import LogisticProbe
from lmprobe.tracing.features import Features, PendingFeatures, gather


def softmax_data(n=3000, d=10, seed=0):
    """Three classes drawn from a softmax model (one-vs-rest SGD stays 2.7 points under)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * 10.0 ** rng.uniform(-1, 1, d)
    logits = (X / X.std(0)) @ rng.normal(size=(d, 3))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(3, p=row) for row in p])
    return X.astype(np.float32), y


def reference(X_train, y_train, X_test, y_test, scoring="accuracy") -> float:
    """The test accuracy of StandardScaler + multinomial LogisticRegressionCV (5-fold CV
    chooses C by ``scoring``)."""
    model = make_pipeline(
        StandardScaler(),
        LogisticRegressionCV(Cs=np.logspace(-4, 2, 13), max_iter=5000, scoring=scoring),
    )
    model.fit(X_train, y_train)
    return float((model.predict(X_test) == np.asarray(y_test)).mean())


def trained_bank(X, y, n, config, seed=0, passes=2):
    bank = ProbeBank([config], seed=seed)
    key = bank.key(config.name)
    union = bank.heldout_plan(n)
    bank.set_heldout(union, n, {key: Features(X[union], y[union], union)})
    train = np.setdiff1d(np.arange(n), union)
    for _ in range(passes):
        for rows in np.array_split(train, 4):
            bank.update({key: PendingFeatures(torch.from_numpy(X[rows]), y[rows], rows)}, None)
    return bank, key, Features(X[train], y[train], train)


def test_logistic_probe_matches_logistic_regression_cv_on_softmax_data(tmp_path):
    X, y = softmax_data()
    n = 800
    config = ProbeConfig("a.output", [0, 1, 2], kind="logistic")
    bank, _, kept = trained_bank(X, y, n, config)
    assert bank.refit(config.name, kept, n)
    probe = bank.probes[config.name]
    assert isinstance(probe, LogisticProbe) and probe.exact
    accuracy = float((probe.predict(X[n:]) == y[n:]).mean())
    expected = reference(X[:n], y[:n], X[n:], y[n:])
    print("softmax set:", accuracy, expected, probe.C_)
    assert accuracy >= expected - 0.005
    # the fit is scikit-learn's at the chosen C on every training row
    same = make_pipeline(StandardScaler(), LogisticRegression(C=probe.C_, max_iter=5000, tol=1e-6))
    order = np.argsort(np.r_[kept.doc, bank.heldout[config.name].doc], kind="stable")
    rows = np.r_[kept.doc, bank.heldout[config.name].doc][order]
    same.fit(X[rows], y[rows])
    # (float32 features, as the probes get them: equal to lbfgs' tolerance)
    np.testing.assert_allclose(probe.predict_proba(X[n:]), same.predict_proba(X[n:]), atol=1e-3)
    # saved and loaded without pickle
    restored = LogisticProbe.load(probe.save(tmp_path / "logistic.safetensors"))
    np.testing.assert_array_equal(restored.predict_proba(X[n:]), probe.predict_proba(X[n:]))
    assert restored.C_ == probe.C_ and restored.alpha_ == probe.alpha_


def test_logistic_code_length_matches_a_recomputation_by_hand():
    X, y = softmax_data(n=1000, seed=1)
    n = 1000
    config = ProbeConfig("a.output", [0, 1, 2], kind="logistic")
    bank, _, kept = trained_bank(X, y, n, config, seed=3)
    assert bank.refit_all([(config.name, kept)], n) == [config.name]
    C = bank.probes[config.name].C_
    order = np.random.default_rng((3, 2020)).permutation(n)
    Xo, yo = X[order], y[order]
    ends = sorted({max(1, round(f * n)) for f in FRACTIONS})
    bits = ends[0] * math.log2(3)
    for start, end in zip(ends[:-1], ends[1:], strict=True):
        seen = np.unique(yo[:start])
        if len(seen) == 1:  # one class so far: it, with certainty
            p = np.where(yo[start:end] == seen[0], 1.0, 1e-300)
        else:
            model = make_pipeline(
                StandardScaler(), LogisticRegression(C=C, max_iter=5000, tol=1e-6)
            )
            proba = model.fit(Xo[:start], yo[:start]).predict_proba(Xo[start:end])
            full = np.zeros((end - start, 3))
            full[:, seen] = proba
            p = full[np.arange(end - start), yo[start:end]]
        bits -= np.log2(np.clip(p, np.finfo(float).eps, 1)).sum()
    assert bank.code_bits[config.name] == pytest.approx(bits, rel=1e-4)


def test_logistic_probe_matches_logistic_regression_cv_on_the_tiny_model(gpt2, base_tokenizer):
    texts, labels = make_texts(1500, seed=3)
    # three classes: the sentiment of short texts, and long texts
    labels = [2 if len(t.split()) > 9 else lab for t, lab in zip(texts, labels, strict=True)]
    enc = base_tokenizer(texts, padding=True, return_tensors="pt")
    dataset = ProbeDataset(enc["input_ids"], enc["attention_mask"], labels)
    train_set, test_set = dataset.tt_split(test_size=0.4, seed=0)
    sites = [f"transformer.h.{i}.output" for i in (0, 6, 11)]
    configs = [ProbeConfig(s, [0, 1, 2], kind="logistic", control=True) for s in sites]
    runner = ProbeRunner(gpt2, configs)
    runner.fit_probes(train_set, test_set, num_epoch=2, enable_progress_bar=False)
    train, test = train_set[:], test_set[:]
    X_train = runner.get_probe_features(train["input_ids"], train["attention_mask"])
    X_test = runner.get_probe_features(test["input_ids"], test["attention_mask"])
    expected = {s: reference(X_train[s], train["labels"], X_test[s], test["labels"]) for s in sites}
    table = runner.metrics
    by_log_loss = {
        s: reference(X_train[s], train["labels"], X_test[s], test["labels"], "neg_log_loss")
        for s in sites
    }
    print({s: (table.loc[s, "accuracy"], expected[s], by_log_loss[s]) for s in sites})
    print(table[["alpha", "refit", "compression", "control_compression", "accuracy_low"]])
    assert table["refit"].all()
    # C chosen by 5-fold CV on every training row, as the reference chooses: within 0.5
    # points (a single 90-row held-out slice chose C one step low at layer 11: -0.67)
    for s in sites:
        assert table.loc[s, "accuracy"] >= expected[s] - 0.005
    assert np.isfinite(table[["compression", "control_compression", "accuracy_low"]]).all(None)


def test_a_one_epoch_run_fits_refits_and_codes_from_its_kept_features(gpt2, base_tokenizer):
    """max_epochs=1: the first epoch's features are kept for what learns from them when
    training ends (they used to be kept only for a second epoch): a logistic probe is the
    exact fit (``fit_rows`` on the same rows), an sgd probe is refitted on every row, and
    both have a code length."""
    texts, labels = make_texts(400, seed=5)
    enc = base_tokenizer(texts, padding=True, return_tensors="pt")
    dataset = ProbeDataset(enc["input_ids"], enc["attention_mask"], labels)
    train_set, test_set = dataset.tt_split(test_size=0.25, seed=0)
    site = "transformer.h.6.output"
    configs = [
        ProbeConfig(site, [0, 1], kind="logistic", name="logistic"),
        ProbeConfig(site, [0, 1], name="sgd"),
    ]
    runner = ProbeRunner(gpt2, configs, seed=2)
    runner.fit_probes(train_set, test_set, max_epochs=1, enable_progress_bar=False)
    table = runner.metrics
    assert table["refit"].all() and np.isfinite(table["compression"]).all()
    # the rows the run kept (the features it trained on), and the held-out slice
    bank = runner.module.bank
    key = bank.key("sgd")
    kept = gather([features[key] for _, features in runner.module._train_cache.values()])
    kept = Features(*(a[np.argsort(kept.doc, kind="stable")] for a in kept))
    held = bank.heldout["logistic"]
    # logistic: the exact fit on them and the held-out slice, every row in document order
    rows = Features.concat([kept, held])
    order = np.argsort(rows.doc, kind="stable")
    exact = LogisticProbe([0, 1], {}, True, 2).fit_rows(rows.X[order], rows.y[order])
    probe = runner["logistic"]
    assert probe.exact and probe.C_ == exact.C_
    np.testing.assert_allclose(probe.predict_proba(kept.X), exact.predict_proba(kept.X), rtol=1e-6)
    # sgd: retrained from scratch on every row at the alpha the slice chose, as many passes
    # as it made (one), in one seeded permutation of the rows in document order,
    # REFIT_ROWS rows an update
    every = Features.concat([kept, bank.heldout["sgd"]])
    X, y = (a[np.argsort(every.doc, kind="stable")] for a in (every.X, every.y))
    assert len(y) == len(train_set)
    sgd = runner["sgd"]
    scaler, by_hand = StandardScaler(), reference_sgd(sgd.alpha_, 2)
    perm = np.random.default_rng((2, 0)).permutation(len(y))
    for start in range(0, len(y), REFIT_ROWS):
        rows = perm[start : start + REFIT_ROWS]
        scaler.partial_fit(X[rows])
        by_hand.partial_fit(scaler.transform(X[rows]), y[rows], classes=[0, 1])
    assert sgd.n_samples_seen_ == len(y)
    np.testing.assert_allclose(sgd.classifier_.coef_, by_hand.coef_, rtol=1e-5)


def test_a_bad_C_is_a_one_line_error_before_any_work():
    from lmprobe import LmProbeError

    with pytest.raises(LmProbeError, match="model_kwargs C=\\[1, -1\\] must be positive"):
        ProbeConfig("a.output", [0, 1], kind="logistic", model_kwargs={"C": [1, -1]})


def test_logistic_probe_chooses_c_as_logistic_regression_cv_does():
    """C by accuracy over LogisticRegressionCV's own folds (5 unshuffled stratified), ties
    to the smallest C: the same cross-validated accuracies and the same C. Log loss over
    shuffled folds (the old rule) chose C=1 on these rows, LogisticRegressionCV 10**-0.5
    (two rows of 150 better than the next C)."""
    X, y = softmax_data(n=150, seed=5)
    probe = LogisticProbe([0, 1, 2], {}, True, 0).fit_rows(X, y)
    Z = StandardScaler().fit_transform(X)
    cv = LogisticRegressionCV(
        Cs=np.logspace(-4, 2, 13),
        max_iter=5000,
        scoring="accuracy",
        use_legacy_attributes=False,
    ).fit(Z, y)
    np.testing.assert_allclose(probe.cv_accuracy_, cv.scores_.reshape(5, -1).mean(0))
    assert probe.C_ == pytest.approx(float(np.ravel(cv.C_)[0]))
