"""Rows of features waiting to be trained or scored, and their checkpoint form."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn import config_context

from lmprobe.tracing.features import Features, PendingFeatures, gather, settle

log = logging.getLogger("lmprobe")


def checked_rows() -> Any:
    """Rows reach the bank checked finite (``PendingFeatures`` checks every row when it
    reaches the host), so scikit-learn's own check of every call is skipped: about a tenth
    of the probes' update time on the CPU benchmark."""
    return config_context(assume_finite=True)


def to_tensors(rows: Features) -> dict[str, torch.Tensor]:
    """Feature rows as checkpoint tensors (held-out slices, buffered training rows)."""
    return {f: torch.from_numpy(np.asarray(getattr(rows, f))) for f in Features._fields}


def from_tensors(tensors: dict[str, torch.Tensor]) -> Features:
    return Features(*(tensors[f].numpy() for f in Features._fields))


class RowBuffer:
    """Collects feature rows per name until ``chunk_rows`` are there (``None``: every batch).

    scikit-learn's ``partial_fit`` and ``predict_proba`` cost about a millisecond per call
    whatever the size of the call, and SGD updates per sample anyway: handing probes larger
    chunks removes call overhead without changing the maths (beyond SGD's in-call shuffle).
    On a GPU it also means one device-to-host copy, one wait, per chunk instead of per batch.
    """

    def __init__(self) -> None:
        self.parts: dict[Any, list[PendingFeatures]] = {}
        self.rows: dict[Any, int] = {}

    def add(self, name: Any, features: PendingFeatures, chunk_rows: int | None) -> bool:
        """Buffer ``features``; True when ``name`` has a full chunk."""
        self.parts.setdefault(name, []).append(features)
        self.rows[name] = self.rows.get(name, 0) + len(features)
        return chunk_rows is None or self.rows[name] >= chunk_rows

    def take(self, name: Any, drop_failed: bool = False) -> Features | None:
        """The buffered rows of ``name`` on the host (``None`` if there are none);
        ``drop_failed`` leaves out batches with non-finite rows instead of raising."""
        parts = self.parts.pop(name, None)
        self.rows.pop(name, None)
        if not parts:
            return None
        rows = gather(parts, drop_failed=drop_failed)
        return rows if len(rows.y) else None

    def names(self) -> list[Any]:
        return list(self.parts)

    def settle(self, names: Sequence[Any] | None = None) -> None:
        """Bring every buffered part (of ``names``; None: all) still on a device to the host
        (one copy per device; on the CPU one copy of the rows, so what a GPU run does is
        what the tests see)."""
        names = self.parts if names is None else names
        settle([part for name in names for part in self.parts.get(name, [])])

    def failed(self) -> bool:
        """Some settled part has non-finite rows (``take`` would raise for it)."""
        return any(p._error is not None for parts in self.parts.values() for p in parts)

    def clear(self) -> None:
        self.parts.clear()
        self.rows.clear()
