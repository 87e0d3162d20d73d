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
