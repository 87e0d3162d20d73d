"""MDL probing's online code (Voita & Titov, 2020) against a recomputation by hand with
scikit-learn on the same features and rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import reference_sgd
from sklearn.preprocessing import StandardScaler

from lmprobe import ProbeConfig
from lmprobe.bank.bank import ProbeBank
from lmprobe.bank.refit import REFIT_ROWS
from lmprobe.tracing.features import Features, PendingFeatures

FRACTIONS = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.0625, 0.125, 0.25, 0.5, 1.0)


def by_hand(X, y, classes, alpha, passes, chunk_rows, seed):
    """Every row in the order ``default_rng((seed, 2020))`` draws; blocks cut at Voita &
    Titov's fractions; the first block at log2(classes) bits a row, each later one at
    -log2 p(label) under averaged SGD (the probe's step rule, ``reference_sgd``) behind a
    running StandardScaler, trained on every row before it for ``passes`` seeded passes."""
    order = np.random.default_rng((seed, 2020)).permutation(len(y))
    X, y = X[order], y[order]
    ends = sorted({max(1, round(f * len(y))) for f in FRACTIONS})
    bits = ends[0] * math.log2(len(classes))
    for start, end in zip(ends[:-1], ends[1:], strict=True):
        scaler, sgd = StandardScaler(), reference_sgd(alpha, seed)
        for epoch in range(passes):
            perm = np.random.default_rng((seed, epoch)).permutation(start)
            for lo in range(0, start, chunk_rows):
                rows = perm[lo : lo + chunk_rows]
                scaler.partial_fit(X[rows])
                sgd.partial_fit(scaler.transform(X[rows]), y[rows], classes=classes)
        proba = sgd.predict_proba(scaler.transform(X[start:end]))
        bits -= np.log2(proba[np.arange(end - start), np.searchsorted(classes, y[start:end])]).sum()
    return bits, len(y) * math.log2(len(classes)), ends


@pytest.mark.parametrize("n_classes", [2, 3])
def test_code_length_matches_a_recomputation_by_hand(n_classes):
    rng = np.random.default_rng(1)
    n = 1200
    X = (rng.normal(size=(n, 6)) * [1, 10, 100, 1, 1, 1]).astype(np.float32)
    y = (X[:, 0] + X[:, 1] / 10 + rng.normal(size=n) > 0).astype(np.int64)
    if n_classes == 3:
        y[X[:, 2] > 50] = 2
    classes = np.arange(n_classes)
    config = ProbeConfig("a.output", classes.tolist(), early_stopping=False)  # the alpha grid
    bank = ProbeBank([config], seed=5)
    name, key = config.name, bank.key(config.name)
    union = bank.heldout_plan(n)
    bank.set_heldout(union, n, {key: Features(X[union], y[union], union)})
    train = np.setdiff1d(np.arange(n), union)
    for _ in range(2):  # two passes
        for rows in np.array_split(train, 4):
            bank.update({key: PendingFeatures(torch.from_numpy(X[rows]), y[rows], rows)}, None)
    alpha = bank.probes[name].alpha_
    kept = Features(X[train], y[train], train)
    assert not bank.code_length(name, kept.select_docs(train[1:]), n)
    assert bank.code_length(name, kept, n)
    bits, uniform, ends = by_hand(X, y, classes, alpha, 2, REFIT_ROWS, seed=5)
    assert ends[:3] == [1, 2, 5] and ends[-2:] == [600, 1200]  # 0.1% of 1,200 rows: 1
    assert bank.code_bits[name] == pytest.approx(bits, rel=1e-6)
    assert bank.uniform_bits[name] == pytest.approx(uniform)
    assert uniform / bits > 1.2  # the labels are predictable: the code compresses
    # computed once, before the refit; the table reports it
    assert bank.refit(name, kept, n)
    assert not bank.code_length(name, kept, n)
    bank.score("test", {key: PendingFeatures(torch.from_numpy(X), y, np.arange(n))}, None)
    row = bank.finish_scoring("test").loc[name]
    assert row["codelength_bits"] == pytest.approx(bits, rel=1e-6)
    assert row["compression"] == pytest.approx(uniform / bits, rel=1e-6)
