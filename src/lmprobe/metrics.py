"""Test metrics of a probe, accumulated over chunks of rows.

``CLASSIFICATION_METRICS`` is the registry: a name and a torchmetrics factory taking the
number of classes. Adding a metric is one entry here; it then appears in ``metrics.csv``,
the loggers and ``ProbeRunner.metrics``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torchmetrics
from sklearn.metrics import log_loss
from torchmetrics import classification as tc

CLASSIFICATION_METRICS: dict[str, Callable[[int], torchmetrics.Metric]] = {
    "accuracy": lambda n: tc.MulticlassAccuracy(n, average="micro"),
    "precision": lambda n: tc.MulticlassPrecision(n, average="macro"),
    "recall": lambda n: tc.MulticlassRecall(n, average="macro"),
    "f1": lambda n: tc.MulticlassF1Score(n, average="macro"),
    "matthews": lambda n: tc.MulticlassMatthewsCorrCoef(n),
}


def metric_columns() -> tuple[str, ...]:
    return ("loss", *CLASSIFICATION_METRICS)


def column_of(classes: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The ``predict_proba`` column of each label. ``classes`` is sorted, as scikit-learn
    keeps ``classes_`` and orders ``predict_proba``'s columns: the one order used anywhere a
    label meets a column."""
    y = np.asarray(y)
    index = np.searchsorted(classes, y)
    found = (index < len(classes)) & (classes[np.minimum(index, len(classes) - 1)] == y)
    if not found.all():
        raise ValueError(f"label {y[~found][0]!r} is not one of the classes {classes.tolist()}")
    return index


class ProbeScores:
    """Metrics of one probe over every row it is shown, chunk by chunk.

    Predictions are what ``predict`` returns (the argmax of the decision function: the
    argmax of ``predict_proba`` can differ where probabilities saturate and tie); the loss is
    the mean log loss over all rows (summed per chunk, divided once at the end).
    """

    def __init__(self, classes: np.ndarray) -> None:
        self.classes = np.asarray(classes)
        if (np.sort(self.classes) != self.classes).any():
            raise ValueError(f"classes must be sorted as in predict_proba: {classes}")
        self.metrics = torchmetrics.MetricCollection(
            {name: make(len(self.classes)) for name, make in CLASSIFICATION_METRICS.items()}
        )
        self.loss_sum = 0.0
        self.count = 0

    def update(self, y: np.ndarray, pred: np.ndarray, proba: np.ndarray) -> None:
        """``pred``: predicted labels (``predict``); ``proba``: ``predict_proba``."""
        target = column_of(self.classes, y)
        predicted = column_of(self.classes, pred)
        self.metrics.update(torch.from_numpy(predicted), torch.from_numpy(target))
        self.loss_sum += float(log_loss(y, proba, labels=self.classes, normalize=False))
        self.count += len(target)

    def compute(self) -> dict[str, float]:
        row = {name: float(value) for name, value in self.metrics.compute().items()}
        row["loss"] = self.loss_sum / self.count
        row["support"] = self.count
        return row
