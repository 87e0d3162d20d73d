"""Test metrics of a probe, accumulated over chunks of rows.

``CLASSIFICATION_METRICS`` (a name and a function of the confusion matrix) and
``REGRESSION_METRICS`` (a name and a torchmetrics factory) are the registries. Adding a
metric is one entry here; it then appears in ``metrics.csv``, the loggers and
``ProbeRunner.metrics``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torchmetrics
from torchmetrics import classification as tc
from torchmetrics import regression as tr
from torchmetrics.functional import classification as tmf

from lmprobe.integrations.torchmetrics import local_only


def _per_class(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 of each class, and which classes count in a macro average
    (those in the targets or the predictions, as scikit-learn's default labels); 0 where a
    ratio is 0/0 (scikit-learn's ``zero_division=0``). ``confusion`` is (..., k, k): rows
    are targets, columns predictions; leading axes are independent matrices (resamples)."""
    tp = np.diagonal(confusion, axis1=-2, axis2=-1)
    support, predicted = confusion.sum(-1), confusion.sum(-2)
    denominator = support + predicted
    zeros = np.zeros_like(tp, dtype=float)
    precision = np.divide(tp, predicted, out=zeros.copy(), where=predicted > 0)
    recall = np.divide(tp, support, out=zeros.copy(), where=support > 0)
    f1 = np.divide(2 * tp, denominator, out=zeros.copy(), where=denominator > 0)
    return precision, recall, f1, denominator > 0


def accuracy(confusion: np.ndarray) -> np.ndarray:
    return np.trace(confusion, axis1=-2, axis2=-1) / confusion.sum((-2, -1))


def matthews(confusion: np.ndarray) -> np.ndarray:
    """Matthews correlation as scikit-learn defines it: 0 when either the targets or the
    predictions are a single class (torchmetrics' own metric returns other values there,
    e.g. for an early probe that predicts one class)."""
    true, pred = confusion.sum(-1), confusion.sum(-2)
    n, correct = confusion.sum((-2, -1)), np.trace(confusion, axis1=-2, axis2=-1)
    cov_tp = correct * n - (true * pred).sum(-1)
    cov_pp = n**2 - (pred * pred).sum(-1)
    cov_tt = n**2 - (true * true).sum(-1)
    denominator = cov_tt * cov_pp
    root = np.sqrt(np.maximum(denominator, 0))
    return np.divide(cov_tp, root, out=np.zeros_like(root), where=denominator > 0)


def _macro(index: int) -> Callable[[np.ndarray], np.ndarray]:
    def average(confusion: np.ndarray) -> np.ndarray:
        *values, present = _per_class(confusion)
        return (values[index] * present).sum(-1) / present.sum(-1)

    return average


class R2Score(torchmetrics.Metric):
    """1 - SSE / SST over every row, with SST summed about the first batch's mean so targets
    far from zero (1e9 +- 5) do not cancel to rounding noise; NaN for a constant target.
    (torchmetrics' ``R2Score`` uses raw sums of squares and calls totals under 1e-4 zero.)"""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("n", "sum_t", "sum_t2", "sse"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("shift", torch.full((), torch.nan, dtype=torch.float64))

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = pred.double(), target.double()
        if torch.isnan(self.shift):
            self.shift = target.mean()
        shifted = target - self.shift
        self.n += len(target)
        self.sum_t += shifted.sum()
        self.sum_t2 += (shifted**2).sum()
        self.sse += ((target - pred) ** 2).sum()

    def compute(self) -> torch.Tensor:
        sst = self.sum_t2 - self.sum_t**2 / self.n
        return 1 - self.sse / sst if sst > 0 else torch.full((), torch.nan)


# name -> function of confusion matrices (..., k, k) (rows: target, columns: prediction),
# vectorised over leading axes (the bootstrap's resamples). Every classification metric
# derives from the one matrix torchmetrics accumulates.
CLASSIFICATION_METRICS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "accuracy": accuracy,
    "precision": _macro(0),
    "recall": _macro(1),
    "f1": _macro(2),
    "matthews": matthews,
}

# Spearman's correlation ranks the whole test set, so it keeps every prediction by design:
# torchmetrics' note that it does (a UserWarning per regression probe) tells a user nothing.
warnings.filterwarnings(
    "ignore",
    message=r"Metric `SpearmanCorrcoef` will save all targets and predictions",
    category=UserWarning,
    module=r"torchmetrics\.",
)

# factory() -> metric over (prediction, target), both float
REGRESSION_METRICS: dict[str, Callable[[], torchmetrics.Metric]] = {
    "mse": tr.MeanSquaredError,
    "r2": R2Score,
    "pearson": tr.PearsonCorrCoef,
    "spearman": tr.SpearmanCorrCoef,
}


def column_of(classes: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The ``predict_proba`` column of each label. ``classes`` is sorted, as scikit-learn
    keeps ``classes_`` and orders ``predict_proba``'s columns: the one order used anywhere a
    label meets a column."""
    y = np.asarray(y)
    index = np.searchsorted(classes, y)
    found = (index < len(classes)) & (classes[np.minimum(index, len(classes) - 1)] == y)
    if not found.all():
        raise ValueError(
            f"label {y[~found][0].item()!r} is not one of the classes {classes.tolist()}"
        )
    return index


def row_log_loss(proba: np.ndarray, column: np.ndarray) -> np.ndarray:
    """Each row's log loss (nats): scikit-learn's ``log_loss`` per row, clipped as it clips,
    without its per-call input checks (which cost more than the arithmetic on every chunk)."""
    eps = np.finfo(proba.dtype).eps
    return -np.log(np.clip(proba[np.arange(len(column)), column], eps, 1 - eps))


class ClassificationScores:
    """Metrics of one classifier probe over every row it is shown, chunk by chunk.

    Predictions are what ``predict`` returns (the argmax of the decision function: the
    argmax of ``predict_proba`` can differ where probabilities saturate and tie); the loss is
    the mean log loss over all rows (summed per chunk, divided once at the end), NaN for a
    kind without probabilities. The rows themselves (document, target and predicted column,
    log loss, probabilities) are kept for AUROC and the bootstrap (``lmprobe.scoring.uncertainty``).

    The metric state is made and changed under inference mode wherever that happens: a
    pass begun in Lightning's test loop (inference mode) may be finished outside it (an
    interrupted run's partial results), where a tensor made inside it cannot change in place.
    """

    @torch.inference_mode()
    def __init__(self, classes: np.ndarray) -> None:
        self.classes = np.asarray(classes)
        if (np.sort(self.classes) != self.classes).any():
            raise ValueError(f"classes must be sorted as in predict_proba: {classes}")
        # sync_on_compute=False: a scores object holds every row it counts; under DDP
        # lmprobe routes rows to each probe's owner itself (torchmetrics would add the
        # other ranks' matrices again). validate_args=False: ``column_of`` has checked every
        # label, so torchmetrics' own check (a torch.unique per update) finds nothing more
        self.confusion = tc.MulticlassConfusionMatrix(
            len(self.classes), sync_on_compute=False, validate_args=False
        )
        self.loss_sum = 0.0
        self.count = 0
        self.parts: list[tuple[np.ndarray, ...]] = []
        self._merged = False  # parts hold one merged, document-ordered part

    def add(self, probe: Any, X: np.ndarray, y: np.ndarray, doc: np.ndarray | None = None) -> None:
        self.update(y, *probe.predict_with_proba(X), doc=doc)

    @torch.inference_mode()
    def update(
        self,
        y: np.ndarray,
        pred: np.ndarray,
        proba: np.ndarray | None,
        doc: np.ndarray | None = None,
    ) -> None:
        """``pred``: predicted labels (``predict``); ``proba``: ``predict_proba`` or None;
        ``doc``: the dataset row of each row (for pairing probes in the bootstrap)."""
        target = column_of(self.classes, y)
        predicted = column_of(self.classes, pred)
        self.confusion.update(torch.from_numpy(predicted), torch.from_numpy(target))
        if proba is None:
            self.loss_sum = math.nan
            row_loss = np.full(len(target), np.nan)
        else:
            row_loss = row_log_loss(proba, target)
            self.loss_sum += float(row_loss.sum())
        doc = np.arange(self.count, self.count + len(target)) if doc is None else np.asarray(doc)
        self.parts.append((doc, target, predicted, row_loss, proba))
        self._merged = False
        self.count += len(target)

    def rows(self) -> dict[str, np.ndarray | None]:
        """Every scored row, ordered by document (stable: a document's tokens keep their
        order), so the order does not depend on how the pass was batched. The parts are
        merged once (AUROC and the bootstrap both read them) and kept as one part."""
        if len(self.parts) != 1 or not self._merged:
            doc, target, pred, loss, proba = ([part[i] for part in self.parts] for i in range(5))
            doc = np.concatenate(doc)
            order = np.argsort(doc, kind="stable")
            has_proba = all(p is not None for p in proba)
            merged = (
                doc[order],
                np.concatenate(target)[order],
                np.concatenate(pred)[order],
                np.concatenate(loss)[order],
                np.concatenate(proba)[order] if has_proba else None,
            )
            self.parts, self._merged = [merged], True
        return dict(zip(("doc", "target", "pred", "loss", "proba"), self.parts[0], strict=True))

    @torch.inference_mode()
    def compute(self) -> dict[str, float]:
        confusion = self.confusion.compute().double().numpy()
        row = {"loss": self.loss_sum / self.count}
        row.update(
            {name: float(metric(confusion)) for name, metric in CLASSIFICATION_METRICS.items()}
        )
        row["auroc"] = self.auroc()
        row["support"] = self.count
        return row

    @torch.inference_mode()
    def per_class(self, probe: str | None = None) -> pd.DataFrame:
        """Precision, recall, F1 and support (target rows) of each class, one row per class
        (scikit-learn's ``precision_recall_fscore_support`` with ``zero_division=0``); with
        a ``probe`` name, a first column ``probe`` holding it."""
        confusion = self.confusion.compute().double().numpy()
        precision, recall, f1, _ = _per_class(confusion)
        # the name as a list: pandas fills a column from a scalar string ~7x slower
        named = {} if probe is None else {"probe": [probe] * len(self.classes)}
        return pd.DataFrame(
            {
                **named,
                "class": self.classes,
                "precision": precision,
                "recall": recall,
                "f1": f1,
                "support": confusion.sum(1).astype(np.int64),
            }
        )

    def auroc(self) -> float:
        """Area under the ROC curve from the probabilities (binary; for more classes the
        macro one-vs-rest average over the classes present in the targets, as precision,
        recall and F1 average over the classes present: a class seen in training only has
        no positives to rank); NaN without probabilities or with one class in the targets."""
        rows = self.rows()
        present = np.unique(rows["target"])
        if rows["proba"] is None or len(present) < 2:
            return math.nan
        proba = torch.from_numpy(rows["proba"])  # no rounding: saturated values would tie
        if len(self.classes) == 2:
            return float(tmf.binary_auroc(proba[:, 1], torch.from_numpy(rows["target"])))
        # each class's one-vs-rest curve ranks its own column only: keep the present columns
        target = torch.from_numpy(np.searchsorted(present, rows["target"]))
        return float(tmf.multiclass_auroc(proba[:, present], target, len(present), average="macro"))


class RegressionScores:
    """Metrics of one regression probe over every row it is shown, chunk by chunk (states
    under inference mode, as ``ClassificationScores``)."""

    @torch.inference_mode()
    def __init__(self) -> None:
        self.metrics = torchmetrics.MetricCollection(
            {name: make() for name, make in REGRESSION_METRICS.items()}
        )
        for metric in self.metrics.values():  # no cross-rank sums (see ClassificationScores)
            local_only(metric)
        # torchmetrics keeps its states in float32 unless told otherwise: sums of squared
        # errors lose digits and Spearman ranks targets rounded to float32 (ties at 1e9).
        self.metrics.set_dtype(torch.float64)
        self.count = 0

    def add(self, probe: Any, X: np.ndarray, y: np.ndarray, doc: np.ndarray | None = None) -> None:
        self.update(y, probe.predict(X))

    @torch.inference_mode()
    def update(self, y: np.ndarray, pred: np.ndarray) -> None:
        self.metrics.update(
            torch.as_tensor(pred, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
        )
        self.count += len(y)

    @torch.inference_mode()
    def compute(self) -> dict[str, float]:
        row = {name: float(value) for name, value in self.metrics.compute().items()}
        row["loss"] = row["mse"]
        row["support"] = self.count
        return row


def metric_columns(task: str = "classification") -> tuple[str, ...]:
    if task == "classification":
        return ("loss", *CLASSIFICATION_METRICS, "auroc")
    return ("loss", *REGRESSION_METRICS)


@dataclass
class Metrics:
    """lm_probe's ``Metrics``: what ``LinearProbe.compute_metrics`` returns."""

    loss: float
    accuracy: float
    precision: float
    recall: float
    f1: float
    matthews: float

    @classmethod
    def from_row(cls, row: dict[str, float]) -> Metrics:
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})

    def to_dict(self) -> dict[str, float]:
        return asdict(self)
