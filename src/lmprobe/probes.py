"""``LinearProbe``: a logistic ``SGDClassifier`` behind a running ``StandardScaler``."""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import SGDClassifier
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from lmprobe.metrics import column_of


class LinearProbe(ClassifierMixin, BaseEstimator):
    """A linear probe trained online with ``partial_fit``.

    Activations of different layers differ in scale by orders of magnitude; a running
    ``StandardScaler`` puts every probe on the same footing so one SGD learning-rate schedule
    works for all of them.
    """

    def __init__(
        self,
        classes: Sequence[Any] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        scale: bool = True,
        random_state: int | None = None,
    ) -> None:
        self.classes = classes
        self.model_kwargs = model_kwargs
        self.scale = scale
        self.random_state = random_state

    def _init_fitted_state(self, y: np.ndarray, classes: Sequence[Any] | None) -> None:
        chosen = classes if classes is not None else self.classes
        # scikit-learn keeps classes_ sorted and orders predict_proba's columns that way: the
        # probe uses that one order everywhere; ``classes`` keeps the user's, for display.
        self.classes_ = np.unique(np.asarray(chosen if chosen is not None else y))
        kwargs = {"random_state": self.random_state, **(self.model_kwargs or {})}
        kwargs["loss"] = "log_loss"
        self.classifier_ = SGDClassifier(**kwargs)
        self.scaler_ = StandardScaler() if self.scale else None
        self.n_updates_ = 0
        self.n_samples_seen_ = 0

    def partial_fit(
        self, X: np.ndarray, y: np.ndarray, classes: Sequence[Any] | None = None
    ) -> LinearProbe:
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y)
        if not hasattr(self, "classifier_"):
            self._init_fitted_state(y, classes)
        if len(y) == 0:
            return self
        if self.scaler_ is not None:
            self.scaler_.partial_fit(X)
            X = self.scaler_.transform(X)
        self.classifier_.partial_fit(X, y, classes=self.classes_)
        self.n_features_in_ = X.shape[1]
        self.n_updates_ += 1
        self.n_samples_seen_ += len(y)
        return self

    def fit(self, X: np.ndarray, y: np.ndarray) -> LinearProbe:
        """One pass of ``partial_fit`` from scratch (scikit-learn's ``fit`` contract)."""
        for attr in ("classifier_", "scaler_", "classes_"):
            self.__dict__.pop(attr, None)
        return self.partial_fit(X, y)

    def _transform(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "n_features_in_")
        X = np.asarray(X, dtype=np.float32)
        return self.scaler_.transform(X) if self.scaler_ is not None else X

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        return self.classifier_.decision_function(self._transform(X))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.classifier_.predict_proba(self._transform(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classifier_.predict(self._transform(X))

    def predict_with_proba(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``predict(X)`` and ``predict_proba(X)``, scaling ``X`` once."""
        X = self._transform(X)
        return self.classifier_.predict(X), self.classifier_.predict_proba(X)

    def class_index(self, y: np.ndarray) -> np.ndarray:
        """Column of each label in ``predict_proba`` (labels must be in ``classes_``)."""
        check_is_fitted(self, "classes_")
        return column_of(self.classes_, y)

    def save(self, path: str | os.PathLike) -> Path:
        """Pickle the probe; written to a temporary file and renamed, so never half-written."""
        path = Path(path)
        atomic_write_bytes(path, pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> LinearProbe:
        with open(path, "rb") as handle:
            probe = pickle.load(handle)
        if not isinstance(probe, cls):
            raise TypeError(f"{path} holds a {type(probe).__name__}, not a {cls.__name__}")
        return probe


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
