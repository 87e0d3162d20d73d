"""Rows traced ahead: the first length window's training documents, traced together with
the held-out slice before training.

Early stopping scores the held-out slice after every update, so the slice is traced
before the first one. Traced on its own, the slice (a tenth of the training set, of every
length) makes a few batches that each span a wide range of lengths: padding that sorting
the training documents by length had removed (on the ``cpu`` benchmark, 2.4% more tokens
than a sort of all documents; bench/README.md). Traced sorted by length together with the
first length window's documents, which are traced before any training too, the two pad as
one sort of both does.

The window's rows wait here, on the host, until their training batches come: a batch whose
documents are all here takes its rows from here (in the batch's document order, each
document's rows in their own order, as a trace gives them) instead of tracing. The probes
get the same rows of the same documents in the same order and count the same steps; only
the batches the model saw them in differ, which can change the last bits of float32
activations. A resumed run traces the same batches again, so it gets the very same rows.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from lmprobe.tracing.features import FeatureKey, PendingFeatures, to_host


class TracedAhead:
    """The rows of the documents ``docs`` (training-set rows), per key, kept until the
    training batch at ``last_position`` (the first window's last batch) has passed."""

    def __init__(self, docs: np.ndarray, last_position: int) -> None:
        self.docs = np.unique(docs)
        self.last_position = last_position
        # per key: X, y, doc sorted by doc (stable: a document's rows keep their order),
        # and where the rows came from (for the finiteness check's message)
        self._rows: dict[FeatureKey, tuple[np.ndarray, np.ndarray, np.ndarray, str, str]] = {}

    def add(
        self, key: FeatureKey, parts: Iterable[PendingFeatures], docs: np.ndarray, union: np.ndarray
    ) -> list[PendingFeatures]:
        """Keep the rows of ``parts`` (not yet brought to the host; their ``doc`` are rows
        of the traced subset, ``docs[doc]`` those of the training set) whose documents are
        in ``self.docs``; return those of the held-out slice ``union``, one part per traced
        batch with its label (not yet checked for finite values)."""
        parts = list(parts)
        X = to_host(torch.cat([p.X for p in parts]))
        y = np.concatenate([p.y for p in parts])
        doc = docs[np.concatenate([p.doc for p in parts])]
        keep = np.isin(doc, self.docs)
        order = np.flatnonzero(keep)[np.argsort(doc[keep], kind="stable")]
        site, policy = parts[0].site, parts[0].on_nonfinite
        doc_sorted = doc[order]
        for _, _, other, _, _ in self._rows.values():
            if np.array_equal(other, doc_sorted):  # rows of the very same documents: share
                doc_sorted = other  # the array, so ``take`` finds a batch's rows once for both
                break
        self._rows[key] = (X[order], y[order], doc_sorted, site, policy)
        held = np.flatnonzero(np.isin(doc, union))
        batch_of = np.repeat(np.arange(len(parts)), [len(p) for p in parts])[held]
        slices = []
        for i in np.unique(batch_of):
            rows = held[batch_of == i]
            X_i = torch.from_numpy(X[rows])
            slices.append(PendingFeatures(X_i, y[rows], doc[rows], site, parts[i].label, policy))
        return slices

    def holds(self, index: np.ndarray, keys: Iterable[FeatureKey]) -> bool:
        """Whether this batch's rows (documents ``index``) are all here for every key."""
        if not all(k in self._rows for k in keys) or not len(self.docs):
            return False
        at = np.minimum(np.searchsorted(self.docs, index), len(self.docs) - 1)
        return bool((self.docs[at] == index).all())  # (docs: sorted, unique)

    def take(
        self, index: np.ndarray, keys: Iterable[FeatureKey], label: str
    ) -> dict[FeatureKey, PendingFeatures]:
        """The batch's rows per key, as its own trace would give them (checked for finite
        values when they reach the bank, labelled ``label`` in that error)."""
        taken = {}
        picks: dict[int, np.ndarray] = {}  # keys with the same documents' rows share one
        for key in keys:
            X, y, doc, site, policy = self._rows[key]
            pick = picks.get(id(doc))
            if pick is None:
                pick = picks[id(doc)] = _rows_of(doc, index)
            rows = torch.from_numpy(np.ascontiguousarray(X[pick]))
            taken[key] = PendingFeatures(rows, y[pick], doc[pick], site, label, policy)
        return taken


def _rows_of(doc: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Where the rows of documents ``index`` are in ``doc`` (sorted): each document's rows
    in their own order, the documents in the order of ``index``."""
    lo = np.searchsorted(doc, index, "left")
    counts = np.searchsorted(doc, index, "right") - lo
    # the rows lo[i] .. lo[i] + counts[i] of each document i, in the batch's order
    starts = np.repeat(lo - np.cumsum(counts) + counts, counts)
    return starts + np.arange(int(counts.sum()))
