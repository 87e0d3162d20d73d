"""The rows traced ahead (``lmprobe.tracing.ahead.TracedAhead``) against a plain selection by hand."""

from __future__ import annotations

import numpy as np
import torch

from lmprobe.tracing.ahead import TracedAhead
from lmprobe.tracing.features import FeatureKey, PendingFeatures


def _parts(docs_per_batch: list[np.ndarray], rows_per_doc: np.ndarray, seed: int):
    """Traced batches of the documents ``docs_per_batch`` (rows of the traced subset), each
    document giving ``rows_per_doc[doc]`` rows of random features."""
    rng = np.random.default_rng(seed)
    parts = []
    for i, docs in enumerate(docs_per_batch):
        doc = np.repeat(docs, rows_per_doc[docs])
        X = torch.from_numpy(rng.standard_normal((len(doc), 3)).astype(np.float32))
        y = rng.integers(0, 3, len(doc))
        parts.append(PendingFeatures(X, y, doc, "site", f"batch {i}"))
    return parts


def test_taking_a_batch_gives_each_keys_rows_of_its_documents_in_the_batchs_order():
    """Keys with one row per document (two of them: the same documents, so they share
    where a batch's rows are) and a key with several rows per document (tokens): a batch
    taken from the rows traced ahead gives, per key, the rows a selection by hand gives,
    document by document in the batch's order, each document's rows in traced order."""
    rng = np.random.default_rng(0)
    n = 40
    subset = rng.permutation(n)  # traced subset row i is training-set row subset[i]
    union = subset[:6]  # the held-out slice
    window = subset[6:]
    batches = np.array_split(rng.permutation(n), 5)  # traced batches (subset rows)
    one = np.ones(n, dtype=np.int64)
    tokens = rng.integers(1, 4, n)
    ahead = TracedAhead(window, last_position=3)
    keys = {
        FeatureKey("a.output", "mean", None): _parts(batches, one, 1),
        FeatureKey("b.output", "mean", None): _parts(batches, one, 2),
        FeatureKey("a.output", "none", None): _parts(batches, tokens, 3),
    }
    kept = {}
    for key, parts in keys.items():
        X = torch.cat([p.X for p in parts]).numpy()
        y = np.concatenate([p.y for p in parts])
        doc = subset[np.concatenate([p.doc for p in parts])]
        kept[key] = (X, y, doc)
        held = ahead.add(key, parts, subset, union)  # the slice's rows, batch by batch
        held_docs = np.concatenate([h.doc for h in held])
        np.testing.assert_array_equal(np.sort(held_docs), np.sort(doc[np.isin(doc, union)]))
    index = rng.permutation(window)[:7]
    assert ahead.holds(index, keys)
    assert not ahead.holds(np.append(index, union[0]), keys)  # a held-out document
    assert not ahead.holds(np.array([n + 5]), keys)  # no such document
    taken = ahead.take(index, keys, "training batch 0")
    for key, (X, y, doc) in kept.items():
        pick = np.concatenate([np.flatnonzero(doc == d) for d in index])
        got = taken[key]
        np.testing.assert_array_equal(got.doc, doc[pick])
        np.testing.assert_array_equal(got.y, y[pick])
        np.testing.assert_array_equal(got.X.numpy(), X[pick])
        assert got.label == "training batch 0"
