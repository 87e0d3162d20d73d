"""Probe kinds (``sgd_regressor``, ``mean_difference``, a user's own) against independent
references: least squares for the regressor, class means computed here with numpy for the
mean difference, scikit-learn and scipy for every metric, on the same features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn import metrics as skm
from sklearn.linear_model import LinearRegression

import lmprobe.probes.base
from lmprobe import (
    PROBE_KINDS,
    LinearProbe,
    LmProbeError,
    MeanDifferenceProbe,
    ProbeConfig,
    ProbeDataset,
    ProbeRunner,
    RegressionProbe,
    register_probe_kind,
)
from lmprobe.scoring.metrics import ClassificationScores, RegressionScores

SITE = "transformer.h.2.output"
CLASSIFICATION = ["accuracy", "precision", "recall", "f1", "matthews"]


# ----------------------------------------------------------------------------- data
def regression_data(n=2000, d=20, offset=1e3, yscale=1e2, seed=0):
    """Columns scaled from 1e-3 to 1e3 around large means; y = offset + yscale * (Z @ w +
    noise): a probe without its scalers (of X and of y) does not converge on this."""
    rng = np.random.default_rng(seed)
    col_scale = 10.0 ** rng.uniform(-3, 3, d)
    Z = rng.normal(size=(n, d))
    X = (Z * col_scale + rng.normal(size=d) * col_scale * 5).astype(np.float32)
    y = offset + yscale * (Z @ rng.normal(size=d) + 0.5 * rng.normal(size=n))
    return X, y


def binary_data(n=600, d=10, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    X = (rng.normal(size=(n, d)) + y[:, None] * 0.7) * 10.0 ** rng.uniform(-2, 2, d) + 50
    return X.astype(np.float32), y


def chunks(n, seed=0, sizes=(1, 7, 64, 150)):
    """Row slices of irregular sizes (a one-row chunk among them)."""
    rng = np.random.default_rng(seed)
    start, out = 0, []
    while start < n:
        size = int(rng.choice(sizes))
        out.append(slice(start, start + size))
        start += size
    return out


def train_regressor(X, y, passes=5, chunk=100, **kwargs):
    probe = RegressionProbe(random_state=0, **kwargs)
    for _ in range(passes):
        for start in range(0, len(y), chunk):
            assert probe.partial_fit(X[start : start + chunk], y[start : start + chunk]) is probe
    return probe


def class_mean_difference(X, y, classes):
    """The reference: means of each class (sorted order), in float64, with numpy."""
    X = np.asarray(X, dtype=np.float64)
    m0, m1 = (X[np.asarray(y) == c].mean(0) for c in sorted(classes))
    return m0, m1


# ---------------------------------------------------------------------- 1. regressor
@pytest.mark.parametrize(
    "offset, yscale",
    [(1e3, 1e2), (1e9, 1.0)],  # 1e9 +- 4.6: a variance from raw sums of squares is noise
    ids=["offset-1e3", "offset-1e9"],
)
def test_regression_probe_matches_least_squares(offset, yscale):
    X, y = regression_data(offset=offset, yscale=yscale)
    train, test = slice(0, 1500), slice(1500, None)
    probe = train_regressor(X[train], y[train], passes=5, chunk=100, model_kwargs={"alpha": 1e-5})
    assert probe.n_samples_seen_ == 5 * 1500 and probe.n_updates_ == 5 * 15
    reference = LinearRegression().fit(X[train].astype(np.float64), y[train])
    expected = reference.predict(X[test].astype(np.float64))
    pred = probe.predict(X[test])
    assert skm.r2_score(y[test], expected) > 0.95  # the reference itself fits
    assert skm.r2_score(y[test], pred) == pytest.approx(skm.r2_score(y[test], expected), abs=0.02)
    assert np.corrcoef(pred, expected)[0, 1] > 0.99


def wide_data(n=400, d=600, seed=0):
    """More features than rows, as a layer of a real LM on a few hundred words: 20 latent
    factors behind the features and the target, columns at scales 1e-2..1e2, and row norms
    spread over a decade (standardised rows of real activations reach 10x the mean)."""
    rng = np.random.default_rng(seed)
    F = rng.normal(size=(n, 20))
    X = F @ rng.normal(size=(20, d)) + 0.5 * rng.normal(size=(n, d))
    X *= np.exp(0.7 * rng.normal(size=(n, 1)))
    X = X * 10.0 ** rng.uniform(-2, 2, d) + rng.normal(size=d)
    return X.astype(np.float32), F @ rng.normal(size=20) + 0.5 * rng.normal(size=n)


def ridge_on_standardised(X, y, alphas):
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), RidgeCV(alphas=alphas)).fit(X, y)


def test_regression_probe_converges_with_six_times_more_features_than_rows():
    """Issue 35: with scikit-learn's step (invscaling, eta0=0.01) SGD on 600 standardised
    features diverged; the squared-loss step rule reaches ridge regression's optimum
    (SGDRegressor's alpha is ridge's alpha / rows) on the same standardised features, at
    an alpha (the grid's 10) where the optimum is reached in 30 passes."""
    alpha = 10.0
    X, y = wide_data()
    train, test = slice(0, 100), slice(100, None)
    probe = RegressionProbe(random_state=0, model_kwargs={"alpha": alpha})
    for epoch in range(30):
        order = np.random.default_rng(epoch).permutation(100)
        for start in range(0, 100, 16):
            rows = order[start : start + 16]
            probe.partial_fit(X[rows], y[rows])
    reference = ridge_on_standardised(X[train], y[train], [alpha * 100])
    expected, pred = reference.predict(X[test]), probe.predict(X[test])
    assert skm.r2_score(y[test], expected) > 0.3  # the reference itself fits
    assert skm.r2_score(y[test], pred) == pytest.approx(skm.r2_score(y[test], expected), abs=0.02)
    assert np.corrcoef(pred, expected)[0, 1] > 0.99


def test_default_regression_probe_with_three_times_more_features_than_rows():
    """The defaults through the bank (the alpha grid chosen on held-out MSE, early stopping,
    the refit on every training row): finite and near RidgeCV (whose leave-one-out choice
    sees every row, where the probe's sees its 20 held-out ones)."""
    from lmprobe.bank.bank import ProbeBank
    from lmprobe.tracing.features import Features, PendingFeatures

    X, y = wide_data(seed=2)
    n = 200
    config = ProbeConfig(SITE, None, kind="sgd_regressor")
    bank = ProbeBank([config], seed=0)
    key = bank.key(config.name)
    union = bank.heldout_plan(n)
    bank.set_heldout(union, n, {key: Features(X[union], y[union], union)})
    train = np.setdiff1d(np.arange(n), union)
    for epoch in range(30):
        order = np.random.default_rng(epoch).permutation(train)
        for start in range(0, len(order), 16):
            rows = order[start : start + 16]
            bank.update({key: PendingFeatures(torch.from_numpy(X[rows]), y[rows], rows)}, None)
    assert bank.refit(config.name, Features(X[train], y[train], train), n)
    reference = ridge_on_standardised(X[:n], y[:n], np.logspace(-2, 5, 29))
    r2 = skm.r2_score(y[n:], bank.probes[config.name].predict(X[n:]))
    print(r2, reference.score(X[n:], y[n:]))
    assert r2 >= reference.score(X[n:], y[n:]) - 0.03


def test_regression_probe_fit_is_one_pass_from_scratch_and_refuses_unfitted_use():
    from sklearn.exceptions import NotFittedError

    X, y = regression_data(n=400)
    with pytest.raises(NotFittedError):
        RegressionProbe().predict(X)
    once = RegressionProbe(random_state=0).partial_fit(X, y)
    again = train_regressor(X, y + 1e6, passes=3).fit(X, y)  # earlier state is dropped
    np.testing.assert_array_equal(again.predict(X), once.predict(X))


def regression_reference(y, pred):
    return {
        "mse": skm.mean_squared_error(y, pred),
        "r2": skm.r2_score(y, pred),
        "pearson": stats.pearsonr(pred, y)[0],
        "spearman": stats.spearmanr(pred, y)[0],
    }


# Per metric: mse relative (float32 accumulation is off by ~1e-8); torchmetrics' Spearman
# adds 1e-6 to its denominator, a few 1e-9 on these data.
SCORE_TOL = {"mse": {"rel": 1e-10}, "r2": {"abs": 1e-9}, "pearson": {"abs": 1e-9}}
SCORE_TOL["spearman"] = {"abs": 1e-7}


@pytest.mark.parametrize(
    "offset, yscale, checked",
    [
        (1e3, 1e2, ["mse", "r2", "pearson", "spearman"]),
        # Far from zero: float32 would round the targets to steps of 64 (Spearman ties) and
        # raw sums of squares would cancel (R2): lmprobe.scoring.metrics sums in float64, about a shift.
        (1e9, 1.0, ["mse", "r2", "pearson", "spearman"]),
    ],
    ids=["offset-1e3", "offset-1e9"],
)
def test_regression_scores_equal_sklearn_and_scipy(offset, yscale, checked):
    X, y = regression_data(offset=offset, yscale=yscale)
    train, test = slice(0, 1500), slice(1500, None)
    probe = train_regressor(X[train], y[train], passes=2)
    scores = probe.new_scores()
    assert isinstance(scores, RegressionScores)
    X_test, y_test = X[test], y[test]
    pred = []  # per chunk, as the scores see them (float32 products depend on the chunk)
    for rows in chunks(len(y_test)):
        scores.add(probe, X_test[rows], y_test[rows])
        pred.append(probe.predict(X_test[rows]))
    got = scores.compute()
    expected = regression_reference(y_test, np.concatenate(pred))
    assert expected["pearson"] > 0.9  # a fitted probe: a swap of pred and target would show
    assert got["support"] == len(y_test)
    assert got["loss"] == got["mse"]
    for metric in checked:
        assert got[metric] == pytest.approx(expected[metric], **SCORE_TOL[metric]), metric


@pytest.mark.parametrize("offset, yscale", [(1e9, 5.0), (0.0, 1e-3)], ids=["far", "small"])
def test_regression_scores_r2_of_far_or_small_targets(offset, yscale):
    rng = np.random.default_rng(0)
    y = offset + yscale * rng.normal(size=100)
    pred = y + 0.5 * yscale * rng.normal(size=100)
    scores = RegressionScores()
    scores.update(y, pred)
    assert scores.compute()["r2"] == pytest.approx(skm.r2_score(y, pred), abs=1e-6)


# -------------------------------------------------------------- 2. mean difference
def fit_in_chunks(probe, X, y, chunk_slices):
    for rows in chunk_slices:
        assert probe.partial_fit(X[rows], y[rows]) is probe
    return probe


def test_mean_difference_is_the_class_mean_difference_with_midpoint_threshold():
    X, y = binary_data()
    train, test = slice(0, 400), slice(400, None)
    order = np.argsort(y[train], kind="stable")  # early chunks hold one class only
    X_train, y_train = X[train][order], y[train][order]
    probe = fit_in_chunks(MeanDifferenceProbe(classes=[0, 1]), X_train, y_train, chunks(400))
    m0, m1 = class_mean_difference(X_train, y_train, [0, 1])
    w = m1 - m0
    np.testing.assert_allclose(probe.coef_[0], w, rtol=1e-12)
    assert probe.intercept_[0] == pytest.approx(-w @ (m0 + m1) / 2, rel=1e-12)
    X64 = X[test].astype(np.float64)
    np.testing.assert_allclose(
        probe.decision_function(X[test]), X64 @ w - w @ (m0 + m1) / 2, rtol=1e-9, atol=1e-9
    )
    expected = np.array([0, 1])[(X64 @ w - w @ (m0 + m1) / 2 > 0).astype(int)]
    np.testing.assert_array_equal(probe.predict(X[test]), expected)
    assert (expected == y[test]).mean() > 0.6  # the direction separates: a sign flip shows
    np.testing.assert_array_equal(probe.class_counts_, np.bincount(y_train))
    assert probe.heldout_loss(X[test], y[test]) is None  # it does not stop early


def test_mean_difference_does_not_depend_on_chunks_or_order():
    X, y = binary_data(seed=1)
    whole = MeanDifferenceProbe(classes=[0, 1]).partial_fit(X, y)
    perm = np.random.default_rng(3).permutation(len(y))
    pieces = fit_in_chunks(MeanDifferenceProbe(classes=[0, 1]), X[perm], y[perm], chunks(len(y)))
    np.testing.assert_allclose(pieces.coef_, whole.coef_, rtol=1e-10)
    np.testing.assert_allclose(pieces.intercept_, whole.intercept_, rtol=1e-10)
    np.testing.assert_array_equal(pieces.predict(X), whole.predict(X))
    refit = MeanDifferenceProbe(classes=[0, 1]).partial_fit(X[:50] + 100, y[:50]).fit(X, y)
    np.testing.assert_array_equal(refit.coef_, whole.coef_)  # fit starts from scratch


@pytest.mark.parametrize("given", [["pos", "neg"], ["neg", "pos"], None])
def test_mean_difference_with_string_classes(given):
    X, y_index = binary_data(seed=2)
    y = np.array(["neg", "pos"])[y_index]
    probe = MeanDifferenceProbe(classes=given)
    fit_in_chunks(probe, X, y, [slice(0, 100), slice(100, None)])  # both labels in chunk 1
    assert probe.classes_.tolist() == ["neg", "pos"]  # sorted, whatever order is given
    m_neg, m_pos = class_mean_difference(X, y, ["neg", "pos"])
    w = m_pos - m_neg
    np.testing.assert_allclose(probe.coef_[0], w, rtol=1e-12)
    X64 = X.astype(np.float64)
    expected = np.array(["neg", "pos"])[(X64 @ w - w @ (m_neg + m_pos) / 2 > 0).astype(int)]
    np.testing.assert_array_equal(probe.predict(X), expected)


def test_mean_difference_is_binary_only():
    X, y = binary_data()
    y3 = y + (np.arange(len(y)) % 3 == 0)
    for probe, labels in [
        (MeanDifferenceProbe(classes=[0, 1, 2]), y3),
        (MeanDifferenceProbe(), y3),
    ]:
        with pytest.raises(LmProbeError, match=r"binary.*has 3: use kind=sgd_classifier"):
            probe.partial_fit(X, labels)
        assert not probe.is_fitted and not hasattr(probe, "classes_")  # nothing half-set
    # without classes, a first chunk of one label is not a multi-class problem
    with pytest.raises(LmProbeError, match=r"labels \[0\] only; pass classes="):
        MeanDifferenceProbe().partial_fit(X[y == 0], y[y == 0])
    probe = MeanDifferenceProbe(classes=[0, 1]).partial_fit(X, y)
    with pytest.raises(ValueError, match=r"label .*2\)? is not one of the classes"):
        probe.partial_fit(X[:5], np.full(5, 2))


def test_mean_difference_scores_equal_sklearn():
    X, y = binary_data(seed=4)
    probe = MeanDifferenceProbe(classes=[0, 1]).partial_fit(X[:300], y[:300])
    scores = probe.new_scores()
    assert isinstance(scores, ClassificationScores)
    for rows in chunks(300, seed=1):
        scores.add(probe, X[300:][rows], y[300:][rows])
    got = scores.compute()
    pred = probe.predict(X[300:])
    assert np.isnan(got["loss"])  # no probabilities
    assert got["support"] == 300
    expected = {
        "accuracy": skm.accuracy_score(y[300:], pred),
        "precision": skm.precision_score(y[300:], pred, average="macro", zero_division=0),
        "recall": skm.recall_score(y[300:], pred, average="macro", zero_division=0),
        "f1": skm.f1_score(y[300:], pred, average="macro", zero_division=0),
        "matthews": skm.matthews_corrcoef(y[300:], pred),
    }
    assert 0.6 < expected["accuracy"] < 1.0
    for metric in CLASSIFICATION:
        assert got[metric] == pytest.approx(expected[metric], abs=1e-6), metric


# --------------------------------------------------------------- 3. end to end
def features_of(runner, dataset, name):
    rows = dataset[:]
    X = runner.get_probe_features(rows["input_ids"], rows["attention_mask"])[name]
    return X, rows["labels"].numpy()


@pytest.mark.parametrize("early_stopping", [True, False])
def test_runner_regression_metrics_equal_sklearn(gpt2, docs, early_stopping):
    _, enc, _ = docs
    length = enc["attention_mask"].sum(1).double() + 0.5  # tokens, a continuous target
    ds = ProbeDataset(enc["input_ids"], enc["attention_mask"], length)
    assert ds.labels.dtype == torch.float64
    train_set, test_set = ds.tt_split(test_size=0.3, seed=0, stratify=False)
    config = ProbeConfig(
        SITE,
        None,
        kind="sgd_regressor",
        early_stopping=early_stopping,
        patience=3,
        warmup_steps=2,
        model_kwargs={"alpha": 1e-3},
        refit=False,  # the probe the held-out slice last scored
    )
    runner = ProbeRunner(gpt2, [config], seed=0)
    runner.fit_probes(
        train_set, test_set, batch_size=8, max_epochs=4, chunk_rows=16, enable_progress_bar=False
    )
    probe = runner[SITE]
    assert isinstance(probe, RegressionProbe)
    bank = runner.module.bank
    if early_stopping:  # the criterion is the held-out MSE; the last one scored this probe
        held = train_set.subset(bank.heldout_index[: round(config.test_size * len(train_set))])
        X_held, y_held = features_of(runner, held, SITE)
        mse = skm.mean_squared_error(y_held, probe.predict(X_held))
        assert bank.history[SITE][-1][1] == pytest.approx(mse, rel=1e-6)
        assert len(bank.history[SITE]) > 3
    X, y = features_of(runner, test_set, SITE)
    expected = regression_reference(y, probe.predict(X))
    row = runner.metrics.loc[SITE]
    assert "accuracy" not in runner.metrics.columns
    assert expected["pearson"] > 0.5  # the probe learned the length
    assert row["support"] == len(y)
    # the test pass batches documents longest first: features agree to float32 rounding
    assert row["loss"] == pytest.approx(expected["mse"], rel=1e-6)
    assert row["mse"] == pytest.approx(expected["mse"], rel=1e-6)
    for metric in ("r2", "pearson", "spearman"):
        assert row[metric] == pytest.approx(expected[metric], abs=1e-6), metric


def test_runner_mean_difference_is_the_training_class_means(gpt2, dataset):
    train_set, test_set = dataset.tt_split(test_size=0.3, seed=0)
    config = ProbeConfig(SITE, [0, 1], kind="mean_difference", early_stopping=False)
    runner = ProbeRunner(gpt2, [config], seed=0)
    runner.fit_probes(train_set, test_set, batch_size=8, max_epochs=2, enable_progress_bar=False)
    probe = runner[SITE]
    X_train, y_train = features_of(runner, train_set, SITE)
    m0, m1 = class_mean_difference(X_train, y_train, [0, 1])
    scale = np.abs(m1 - m0).max()
    np.testing.assert_allclose(probe.coef_[0], m1 - m0, rtol=0, atol=1e-5 * scale)
    mid = -(m1 - m0) @ (m0 + m1) / 2
    assert probe.intercept_[0] == pytest.approx(mid, abs=1e-5 * abs(mid) + 1e-6)
    # every training row once per epoch: two epochs double the counts, not the means
    np.testing.assert_array_equal(probe.class_counts_, 2 * np.bincount(y_train))
    X_test, y_test = features_of(runner, test_set, SITE)
    pred = probe.predict(X_test)
    row = runner.metrics.loc[SITE]
    assert np.isnan(row["loss"])
    assert 0.6 < skm.accuracy_score(y_test, pred)
    assert row["accuracy"] == pytest.approx(skm.accuracy_score(y_test, pred), abs=1e-6)
    assert row["matthews"] == pytest.approx(skm.matthews_corrcoef(y_test, pred), abs=1e-6)


def test_mean_difference_config_refuses_three_classes():
    """Refused when the probe is configured, before any model work."""
    with pytest.raises(LmProbeError, match="'mean_difference' takes at most 2 classes, not 3"):
        ProbeConfig(SITE, [0, 1, 2], kind="mean_difference", early_stopping=False)


# --------------------------------------------------------------------- 4. errors
@pytest.mark.parametrize("kind", ["sgd_classifier", "mean_difference"])
@pytest.mark.parametrize("with_test_set", [True, False])
def test_classifier_kind_with_continuous_labels(gpt2, docs, kind, with_test_set):
    _, enc, labels = docs
    ds = ProbeDataset(enc["input_ids"], enc["attention_mask"], labels.double() + 0.5)
    train_set, test_set = ds.tt_split(test_size=0.3, seed=0, stratify=False)
    runner = ProbeRunner(gpt2, [ProbeConfig(SITE, [0, 1], kind=kind)], seed=0)
    split = "test" if with_test_set else "training"
    with pytest.raises(LmProbeError) as err:
        runner.fit_probes(train_set, test_set if with_test_set else None, enable_progress_bar=False)
    message = str(err.value)
    assert message.startswith(f"{split} labels of probe {SITE!r} are continuous"), message
    assert f"kind {kind!r} is a classifier; use kind='sgd_regressor'" in message


def test_regressor_takes_no_classes():
    with pytest.raises(LmProbeError, match="'sgd_regressor' predicts a number and takes no"):
        ProbeConfig(SITE, [0, 1], kind="sgd_regressor")
    assert ProbeConfig(SITE, None, kind="sgd_regressor").classes is None


def test_unknown_kind_lists_the_registered_kinds():
    with pytest.raises(LmProbeError, match="unknown probe kind 'ridge'") as err:
        ProbeConfig(SITE, [0, 1], kind="ridge")
    listed = str(err.value).split("use one of ", 1)[1]
    assert set(PROBE_KINDS) >= {"sgd_classifier", "sgd_regressor", "mean_difference"}
    for kind in PROBE_KINDS:
        assert kind in listed
    with pytest.raises(LmProbeError, match="could not be imported"):
        ProbeConfig(SITE, [0, 1], kind="no_such_module.Probe")
    with pytest.raises(LmProbeError, match="is not a lmprobe.probes.base.Probe"):
        ProbeConfig(SITE, [0, 1], kind="sklearn.linear_model.SGDClassifier")


# --------------------------------------------------------------- 5. save / load
def fitted(kind):
    """A fitted probe of each kind, and rows to continue training it with."""
    if kind == "regressor":
        X, y = regression_data(n=600, offset=1e9, yscale=1.0)
        return train_regressor(X[:400], y[:400], passes=2), X[400:], y[400:]
    X, y = binary_data(seed=5)
    if kind == "strings":
        y = np.array(["neg", "pos"])[y]
    classes = sorted(set(y.tolist()))
    if kind == "classifier":  # seeded: SGD shuffles every chunk
        probe = LinearProbe(classes=classes, random_state=0)
    else:
        probe = MeanDifferenceProbe(classes=classes)
    return fit_in_chunks(probe, X[:400], y[:400], chunks(400)), X[400:], y[400:]


@pytest.mark.parametrize("kind", ["classifier", "regressor", "mean_difference", "strings"])
def test_save_load_round_trip(tmp_path, kind):
    probe, X, y = fitted(kind)
    path = probe.save(tmp_path / "probe.safetensors")
    for loaded in (type(probe).load(path), lmprobe.probes.base.load_probe(path)):
        assert type(loaded) is type(probe)
        assert loaded.get_params() == probe.get_params()
        np.testing.assert_array_equal(loaded.predict(X), probe.predict(X))
        if hasattr(probe, "decision_function"):
            np.testing.assert_array_equal(loaded.decision_function(X), probe.decision_function(X))
    # the whole state was saved: training on goes on identically
    loaded.partial_fit(X[:100], y[:100])
    probe.partial_fit(X[:100], y[:100])
    np.testing.assert_array_equal(loaded.predict(X), probe.predict(X))
    other = RegressionProbe if kind != "regressor" else MeanDifferenceProbe
    with pytest.raises(LmProbeError, match=f"not a {other.__name__}"):
        other.load(path)


# ------------------------------------------------------------- 6. a user's kind
class ContrarianProbe(MeanDifferenceProbe):
    """A user's kind: the mean-difference direction, predicting the other class (so its
    metrics show whether the runner really used it)."""

    def decision_function(self, X):
        return -super().decision_function(X)


def test_user_kind_is_selectable_by_name_and_class_path(gpt2, dataset, tmp_path):
    path = f"{ContrarianProbe.__module__}.ContrarianProbe"
    train_set, test_set = dataset.tt_split(test_size=0.3, seed=0)
    try:
        register_probe_kind("my_kind")(ContrarianProbe)
        assert PROBE_KINDS["my_kind"] is ContrarianProbe
        configs = [
            ProbeConfig(SITE, [0, 1], kind=kind, name=name, early_stopping=False)
            for name, kind in [
                ("by_name", "my_kind"),
                ("by_path", path),
                ("base", "mean_difference"),
            ]
        ]
        runner = ProbeRunner(gpt2, configs, seed=0)
        runner.fit_probes(
            train_set, test_set, batch_size=8, max_epochs=1, enable_progress_bar=False
        )
        X, y = features_of(runner, test_set, "by_name")
        base = runner["base"]
        assert type(base) is MeanDifferenceProbe
        for name in ("by_name", "by_path"):
            probe = runner[name]
            assert type(probe) is ContrarianProbe and probe.kind == "my_kind"
            np.testing.assert_array_equal(probe.coef_, base.coef_)  # same training rows
            pred = probe.predict(X)
            np.testing.assert_array_equal(pred, 1 - base.predict(X))
            accuracy = skm.accuracy_score(y, pred)
            assert accuracy < 0.4  # contrarian: the runner scored the user's predict
            assert runner.metrics.loc[name, "accuracy"] == pytest.approx(accuracy, abs=1e-6)
        saved = runner["by_name"].save(tmp_path / "mine.safetensors")
        assert type(lmprobe.probes.base.load_probe(saved)) is ContrarianProbe
    finally:
        PROBE_KINDS.pop("my_kind", None)
    assert "my_kind" not in PROBE_KINDS
    with pytest.raises(LmProbeError, match="unknown probe kind 'my_kind'"):
        ProbeConfig(SITE, [0, 1], kind="my_kind")
