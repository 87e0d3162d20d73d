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

from lmprobe.metrics import CLASSIFICATION_METRICS

LEVEL = 0.95
DEFAULT_RESAMPLES = 1000


def resamples(n: int, n_resamples: int, seed: int, block: int = 100):
    """The row indices of every resample, ``block`` resamples at a time (b, n)."""
    for start in range(0, n_resamples, block):
        stop = min(start + block, n_resamples)
        yield np.stack(
            [np.random.default_rng((seed, b)).integers(0, n, n) for b in range(start, stop)]
        )


def bootstrap(
    rows: dict[str, dict[str, Any]], n_classes: dict[str, int], n_resamples: int, seed: int
) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """``rows``: per probe, the scored rows (``ClassificationScores.rows()``). Returns, per
    probe, ``<metric>_low``/``<metric>_high``, and the resampled accuracies (for pairing).
    Every metric of every resample comes from one vectorised pass over confusion matrices."""
    low, high = 100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2
    intervals: dict[str, dict[str, float]] = {}
    accuracies: dict[str, np.ndarray] = {}
    cached: dict[int, list[np.ndarray]] = {}  # probes scored on n rows share the resamples
    for name, scored in rows.items():
        n, k = len(scored["target"]), n_classes[name]
        if n == 0 or n_resamples <= 0:
            continue
        blocks = cached.get(n)
        if blocks is None and n * n_resamples <= 50_000_000:  # keep what fits in ~400 MB
            blocks = cached[n] = list(resamples(n, n_resamples, seed))
        codes = scored["target"] * k + scored["pred"]
        samples: dict[str, list[np.ndarray]] = {}
        for index in blocks if blocks is not None else resamples(n, n_resamples, seed):
            offsets = (np.arange(len(index)) * k * k)[:, None]
            counts = np.bincount((codes[index] + offsets).ravel(), minlength=len(index) * k * k)
            confusion = counts.reshape(len(index), k, k).astype(float)
            for metric, fn in CLASSIFICATION_METRICS.items():
                samples.setdefault(metric, []).append(fn(confusion))
            samples.setdefault("loss", []).append(scored["loss"][index].mean(1))
        intervals[name] = {}
        for metric, parts in samples.items():
            lo, hi = np.percentile(np.concatenate(parts), [low, high])
            intervals[name][f"{metric}_low"] = float(lo)
            intervals[name][f"{metric}_high"] = float(hi)
        accuracies[name] = np.concatenate(samples["accuracy"])
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
