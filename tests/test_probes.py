"""LinearProbe follows scikit-learn's estimator rules and round-trips through save/load."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import reference_sgd
from sklearn.base import clone
from sklearn.metrics import log_loss
from sklearn.preprocessing import StandardScaler

from lmprobe import LinearProbe


def blobs(seed: int = 0, n: int = 200):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    X = rng.normal(size=(n, 8)) * 50 + y[:, None] * 40  # badly scaled on purpose
    return X.astype(np.float32), y


def test_partial_fit_returns_self_and_matches_scaler_plus_sgd():
    X, y = blobs()
    probe = LinearProbe(classes=[0, 1, 2], random_state=0, model_kwargs={"alpha": 1e-3})
    scaler, sgd = (
        StandardScaler(),
        reference_sgd(1e-3, 0),
    )
    for rows in np.array_split(np.arange(len(y)), 5):
        assert probe.partial_fit(X[rows], y[rows]) is probe
        scaler.partial_fit(X[rows])
        sgd.partial_fit(scaler.transform(X[rows]), y[rows], classes=[0, 1, 2])
    np.testing.assert_allclose(probe.predict_proba(X), sgd.predict_proba(scaler.transform(X)))
    assert probe.n_updates_ == 5 and probe.n_samples_seen_ == len(y)
    assert (probe.predict(X) == y).mean() > 0.6  # chance is 1/3
    # lm_probe's score: the log loss (cross-entropy), not scikit-learn's accuracy
    proba = sgd.predict_proba(scaler.transform(X)).astype(np.float64)  # as lm_probe does
    expected = log_loss(y, proba, labels=[0, 1, 2])
    assert probe.score(X, y) == pytest.approx(expected)


def test_init_stores_arguments_only_and_clones():
    probe = LinearProbe(classes=[0, 1], model_kwargs={"alpha": 0.01}, random_state=3)
    assert not [k for k in vars(probe) if k.endswith("_")]
    twin = clone(probe)
    assert twin.get_params() == probe.get_params()


def test_save_load_identical_predictions(tmp_path):
    X, y = blobs(1)
    probe = LinearProbe(classes=[0, 1, 2], random_state=0).partial_fit(X, y)
    path = probe.save(tmp_path / "probe.safetensors")
    loaded = LinearProbe.load(path)
    np.testing.assert_array_equal(loaded.predict(X), probe.predict(X))
    np.testing.assert_array_equal(loaded.predict_proba(X), probe.predict_proba(X))
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed away


def many_classes(seed: int = 0, n: int = 2400, d: int = 16, k: int = 8, rarest: float = 0.025):
    """Imbalanced classes (priors falling geometrically to ``rarest`` times the first's),
    badly scaled features."""
    rng = np.random.default_rng(seed)
    prior = np.geomspace(1.0, rarest, k)
    y = rng.choice(k, size=n, p=prior / prior.sum())
    centres = rng.normal(size=(k, d)) * 1.5
    X = (centres[y] + rng.normal(size=(n, d))) * rng.uniform(0.5, 20, d)  # badly scaled
    return X.astype(np.float32), y


@pytest.mark.parametrize("k", [2, 8])
def test_averaged_sgd_runs_plain_sgd_and_keeps_its_intercepts(k):
    """Averaged SGD averages the iterates of plain SGD: the running (not yet averaged)
    weights and intercepts of a probe are what plain SGD learns from the same rows in the
    same order, one "this class or not" problem per class beyond two. scikit-learn's own
    averaged partial_fit (1.9.1) restarted the running intercepts at every call
    (lmprobe.integrations.sklearn.AveragedSGDClassifier)."""
    X, y = many_classes(n=900, k=k)
    classes = list(range(k))
    kwargs = {"alpha": 1e-2, "shuffle": False}  # same row order in both
    probe = LinearProbe(classes, model_kwargs=kwargs, random_state=0)
    scaler = StandardScaler()
    problems = [1] if k == 2 else classes
    plain = [reference_sgd(1e-2, 0).set_params(shuffle=False, average=False) for _ in problems]
    for _ in range(3):
        for rows in np.array_split(np.arange(len(y)), 6):
            probe.partial_fit(X[rows], y[rows])
            Z = scaler.partial_fit(X[rows]).transform(X[rows])
            for c, sgd in zip(problems, plain, strict=True):
                sgd.partial_fit(Z, (y[rows] == c).astype(int), classes=[0, 1])
    estimator = probe.estimator_
    for i, sgd in enumerate(plain):
        running = np.atleast_2d(estimator._standard_coef)[i]
        np.testing.assert_allclose(running, sgd.coef_[0], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(estimator._standard_intercept[i], sgd.intercept_[0], rtol=1e-5)
    assert not np.allclose(estimator.intercept_, estimator._standard_intercept)  # averaged


@pytest.mark.parametrize("k", [2, 8])
def test_probe_reaches_the_optimum_of_its_objective_on_imbalanced_classes(k):
    """Thirty passes in chunks of 256 rows at alpha 1e-2 land on the exact minimiser of
    the probe's objective (mean log loss + alpha/2 |w|^2 on standardised rows, one-vs-rest
    beyond two classes: LogisticRegression with C = 1 / (alpha n) per class): within 5%
    of its minimum, the same predictions, and intercepts of rare classes far from their
    start at 0 (-3 to -6) within 15%."""
    from sklearn.linear_model import LogisticRegression

    X, y = many_classes(k=k, rarest=0.06 if k == 2 else 0.025)  # 6% or 1% of rows
    alpha, classes = 1e-2, list(range(k))
    probe = LinearProbe(classes, model_kwargs={"alpha": alpha}, random_state=0)
    for epoch in range(30):
        perm = np.random.default_rng(epoch).permutation(len(y))
        for start in range(0, len(y), 256):
            rows = perm[start : start + 256]
            probe.partial_fit(X[rows], y[rows])
    Z = StandardScaler().fit_transform(X)
    problems = [1] if k == 2 else classes
    exact = [
        LogisticRegression(C=1 / (alpha * len(y)), tol=1e-10, max_iter=10_000).fit(Z, y == c)
        for c in problems
    ]
    intercepts = np.array([m.intercept_[0] for m in exact])
    assert intercepts.min() < -3
    np.testing.assert_allclose(probe.estimator_.intercept_, intercepts, rtol=0.15)
    W, b = np.atleast_2d(probe.estimator_.coef_), probe.estimator_.intercept_
    for i, (c, m) in enumerate(zip(problems, exact, strict=True)):
        sign = np.where(y == c, 1, -1)

        def objective(w, b0, sign=sign):
            return np.logaddexp(0, -sign * (Z @ w + b0)).mean() + alpha / 2 * w @ w

        optimum = objective(m.coef_[0], m.intercept_[0])
        assert objective(W[i], b[i]) < optimum * 1.05, (c, objective(W[i], b[i]), optimum)
    scores = np.column_stack([m.decision_function(Z) for m in exact])
    predicted = (scores[:, 0] > 0).astype(int) if k == 2 else np.argmax(scores, axis=1)
    assert (probe.predict(X) == predicted).mean() > 0.99


@pytest.mark.parametrize("k", [2, 6])
def test_training_resumed_from_a_saved_state_learns_what_uninterrupted_training_learns(k):
    """A probe's state (get_state/set_state, what checkpoints and probe files hold) keeps
    the running intercepts too: training on from a restored state gives every alpha the
    coefficients and intercepts of training that never stopped, bit for bit."""
    X, y = many_classes(n=1200, k=k)
    chunks = np.array_split(np.arange(len(y)), 10)
    whole = LinearProbe(list(range(k)), random_state=0)
    for rows in chunks:
        whole.partial_fit(X[rows], y[rows])
    first = LinearProbe(list(range(k)), random_state=0)
    for rows in chunks[:5]:
        first.partial_fit(X[rows], y[rows])
    arrays, values = first.get_state()
    resumed = LinearProbe(list(range(k)), random_state=0).set_state(
        {name: np.array(a) for name, a in arrays.items()}, values
    )
    for rows in chunks[5:]:
        resumed.partial_fit(X[rows], y[rows])
    for a, b in zip(whole.estimators_, resumed.estimators_, strict=True):
        np.testing.assert_array_equal(a.coef_, b.coef_)
        np.testing.assert_array_equal(a.intercept_, b.intercept_)
        np.testing.assert_array_equal(a._standard_intercept, b._standard_intercept)
