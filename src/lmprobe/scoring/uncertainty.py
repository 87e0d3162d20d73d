"""Uncertainty of test metrics: seeded percentile bootstrap intervals and paired comparisons.

The procedure, so that it can be reproduced by hand: a probe's scored rows are put in
document order; resample ``b`` (0, 1, ..., ``n_resamples - 1``) draws n rows with
replacement, ``index = numpy.random.default_rng((seed, b)).integers(0, n, n)``, and every
metric is computed on those rows (from their confusion matrix; the loss as their mean log
loss). The
interval is the 2.5th and 97.5th percentile (``numpy.percentile``, linear) of the resampled
values. Probes scored on the same rows (the same documents, e.g. every mean-pooled probe of
one test set) get the same resamples, so they can be compared pairwise: ``p_vs_best`` is the
two-sided paired-bootstrap p-value of the accuracy difference to the best probe.

Rows are resampled one by one; for token-level probes that treats tokens of one document as
independent, which makes intervals somewhat narrower than a resampling of documents would.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import sparse

from lmprobe.scoring.metrics import CLASSIFICATION_METRICS

LEVEL = 0.95
DEFAULT_RESAMPLES = 1000
# Rows x resamples of the draws kept in memory at once (float64 counts: ~400 MB); larger
# bootstraps draw again for every probe.
MAX_KEPT_DRAWS = 50_000_000


def resamples(n: int, n_resamples: int, seed: int, block: int = 100):
    """The row indices of every resample, ``block`` resamples at a time (b, n)."""
    for start in range(0, n_resamples, block):
        stop = min(start + block, n_resamples)
        yield np.stack(
            [np.random.default_rng((seed, b)).integers(0, n, n) for b in range(start, stop)]
        )


def resample_counts(n: int, n_resamples: int, seed: int, block: int = 100):
    """How often each row is drawn by each resample of ``resamples``, ``block`` resamples
    at a time: (n, b) float64, column j for the block's resample j. A resample's totals
    are then one product with these counts, shared by every probe scored on the n rows."""
    for index in resamples(n, n_resamples, seed, block):
        b = len(index)
        cells = (index * b + np.arange(b)[:, None]).ravel()  # draw of row i by j: i * b + j
        yield np.bincount(cells, minlength=n * b).reshape(n, b).astype(float)


def bootstrap(
    rows: dict[str, dict[str, Any]],
    n_classes: dict[str, int],
    n_resamples: int,
    seed: int,
    drawn: dict[int, list[np.ndarray]] | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """``rows``: per probe, the scored rows (``ClassificationScores.rows()``). Returns, per
    probe, ``<metric>_low``/``<metric>_high``, and the resampled accuracies (for pairing).
    ``drawn``: ``list(resample_counts(n, n_resamples, seed))`` by n, where already drawn.

    Every resample's confusion matrix is one sparse product of the draw counts
    (``resample_counts``) with the cell each row falls in, and every metric of every
    resample one vectorised pass over those matrices (sums of whole counts: the same
    matrices as counting the drawn rows one by one)."""
    low, high = 100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2
    intervals: dict[str, dict[str, float]] = {}
    accuracies: dict[str, np.ndarray] = {}
    cached = dict(drawn or {})  # probes scored on n rows share the resamples
    for name, scored in rows.items():
        n, k = len(scored["target"]), n_classes[name]
        if n == 0 or n_resamples <= 0:
            continue
        blocks = cached.get(n)
        if blocks is None and n * n_resamples <= MAX_KEPT_DRAWS:
            blocks = cached[n] = list(resample_counts(n, n_resamples, seed))
        # (k * k, n): a 1 at each row's cell (target, prediction) of the confusion matrix
        cells = sparse.csr_array(
            (np.ones(n), (scored["target"] * k + scored["pred"], np.arange(n))), shape=(k * k, n)
        )
        confusions, losses = [], []
        for counts in blocks if blocks is not None else resample_counts(n, n_resamples, seed):
            confusions.append((cells @ counts).T)
            losses.append(scored["loss"] @ counts / n)
        confusion = np.concatenate(confusions).reshape(-1, k, k)
        samples = {metric: fn(confusion) for metric, fn in CLASSIFICATION_METRICS.items()}
        samples["loss"] = np.concatenate(losses)
        bounds = np.percentile(np.stack(list(samples.values())), [low, high], axis=1)
        intervals[name] = {}
        for metric, lo, hi in zip(samples, *bounds, strict=True):
            intervals[name][f"{metric}_low"] = float(lo)
            intervals[name][f"{metric}_high"] = float(hi)
        accuracies[name] = samples["accuracy"]
    return intervals, accuracies


def paired_p_values(
    rows: dict[str, dict[str, Any]], point: dict[str, float], resampled: dict[str, np.ndarray]
) -> dict[str, float]:
    """Two-sided paired-bootstrap p-value of each probe's accuracy against the best probe's
    (highest ``point`` accuracy): twice the smaller share of resamples on either side of 0,
    capped at 1; 1 for the best itself; NaN for a probe scored on other rows than the best."""
    if not point:
        return {}
    best = max(point, key=lambda name: (point[name], name))
    p_values = {}
    for name in point:
        same_rows = (
            name in resampled
            and best in resampled
            and np.array_equal(rows[name]["doc"], rows[best]["doc"])
        )
        if name == best:
            p_values[name] = 1.0
        elif not same_rows:
            p_values[name] = math.nan
        else:
            difference = resampled[best] - resampled[name]
            share = min((difference <= 0).mean(), (difference >= 0).mean())
            p_values[name] = float(min(1.0, 2 * share))
    return p_values
