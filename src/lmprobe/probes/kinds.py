"""The built-in probe kinds: averaged SGD classifier and regressor on standardised features
(``sgd_classifier``, ``sgd_regressor``), the exact multinomial fit (``logistic``) and the
class-mean difference (``mean_difference``). The interface and registry: ``lmprobe.probes.base``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.linear_model import SGDClassifier, SGDRegressor
from sklearn.metrics import log_loss, mean_squared_error
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from lmprobe.errors import LmProbeError
from lmprobe.integrations.sklearn import AveragedSGDClassifier
from lmprobe.probes.base import (
    Probe,
    estimator_state,
    register_probe_kind,
    restore_estimator,
    state_value,
)
from lmprobe.scoring.metrics import (
    ClassificationScores,
    Metrics,
    RegressionScores,
    column_of,
)

log = logging.getLogger("lmprobe")

# Regularisation strengths tried side by side when model_kwargs gives no ``alpha``: the
# features are standardised, so one decade grid covers small and large training sets.
DEFAULT_ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
# Averaged SGD converges to the regularised optimum far more steadily than the last iterate
# of plain SGD, whose noise at the step where training stops is a noise in the result.
DEFAULT_SGD_KWARGS: dict[str, Any] = {"average": True}


def step_size(row_bound: float, alpha: float, seen: int, curvature: float) -> float:
    """The learning rate of a probe's update on standardised rows, after ``seen`` rows:
    ``1 / (L + alpha * seen)`` with ``L = curvature * row_bound + alpha`` the largest
    curvature of one row's regularised loss, ``row_bound`` the squared norm of a scaled row
    the kind bounds it by (``_ScaledSGD._row_bound``). It is scikit-learn's "optimal"
    schedule ``1 / (alpha * (t0 + t))`` with the offset ``t0 = L / alpha``: steps never above
    ``1 / L`` (stable) while the rows seen are few against ``L / alpha``, then decaying as
    ``1 / (alpha * t)``. scikit-learn's own offset starts the weak alphas of the grid at steps
    far above ``1 / L`` and keeps them there for hundreds of thousands of rows: on nearly
    separable data their averaged SGD was several points under a full-batch fit after 30
    epochs. A constant ``1 / L`` instead converges at weak alphas but not at strong ones on
    noisy data (averaged SGD at a constant step is biased for the log loss)."""
    return 1.0 / (curvature * row_bound + alpha * (1 + seen))


def alpha_grid(
    model_kwargs: dict[str, Any] | None, default: Sequence[float] = DEFAULT_ALPHAS
) -> list[float]:
    """The ``alpha`` values of ``model_kwargs`` (one number or a list; none: ``default``)."""
    value = (model_kwargs or {}).get("alpha", default)
    if isinstance(value, (str, bytes)):
        raise LmProbeError(f"model_kwargs alpha={value!r} is not a number or a list of numbers")
    values = list(value) if np.ndim(value) or hasattr(value, "__iter__") else [value]
    try:
        alphas = [float(a) for a in values]
    except (TypeError, ValueError):
        raise LmProbeError(
            f"model_kwargs alpha={value!r} is not a number or a list of numbers, e.g. [0.01, 0.1]"
        ) from None
    if not alphas or not all(np.isfinite(a) and a > 0 for a in alphas):
        raise LmProbeError(
            f"model_kwargs alpha={value!r} must be positive numbers (a non-empty list for a grid)"
        )
    return alphas


def fitted_state(
    probe: Any, skip: tuple[str, ...], arrays: dict[str, np.ndarray], values: dict[str, Any]
) -> None:
    """Add ``probe``'s fitted attributes (``name_``, except ``skip``) to its state: numeric
    arrays to ``arrays``, the rest to ``values``."""
    for name, value in vars(probe).items():
        if name.endswith("_") and not name.startswith("_") and name not in skip:
            if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
                arrays[name] = value
            else:
                values[name] = state_value(value)


class _ScaledSGD(Probe):
    """Shared by the SGD kinds: a running ``StandardScaler`` in front of the estimator, and
    a grid of regularisation strengths trained side by side.

    Activations of different layers differ in scale by orders of magnitude; a running scaler
    puts every probe on the same footing so one SGD learning-rate schedule works for all.
    No single ``alpha`` suits every layer and data set, so one estimator per ``alpha`` of the
    grid (``model_kwargs["alpha"]`` a list, or ``DEFAULT_ALPHAS`` when it gives none) learns
    from the same scaled rows; ``heldout_loss`` scores each on the held-out rows and the
    probe predicts with the best (``alpha_``). Until held-out rows have been scored the
    middle of the grid is used.
    """

    def __init__(
        self,
        classes: Sequence[Any] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        scale: bool = True,
        random_state: int | None = None,
        null_label: Any = None,
    ) -> None:
        if hasattr(classes, "submodule") and hasattr(classes, "model_kwargs"):
            # lm_probe's LinearProbe(config): take the probe's settings from its ProbeConfig
            config = classes
            classes, model_kwargs = config.classes, dict(config.model_kwargs)
            null_label = config.null_label
        self.classes = classes
        self.model_kwargs = model_kwargs
        self.scale = scale
        self.random_state = random_state
        self.null_label = null_label

    def _new_estimator(self, **kwargs: Any) -> BaseEstimator:
        raise NotImplementedError

    # The curvature bound of the kind's loss for ``step_size`` (None: scikit-learn's schedule).
    step_curvature: ClassVar[float | None] = None
    default_alphas: ClassVar[tuple[float, ...]] = DEFAULT_ALPHAS

    def _row_bound(self, X: np.ndarray) -> float:
        """The squared norm of a scaled row that ``step_size`` bounds the steps by (the
        running maximum over calls is kept in ``row_bound_``): here the number of features,
        a standardised row's mean squared norm. Log loss has a bounded gradient, so rows
        above the mean cannot make its SGD diverge."""
        return float(X.shape[1])

    @property
    def alphas(self) -> list[float]:
        """The ``alpha`` grid this probe trains side by side."""
        return alpha_grid(self.model_kwargs, self.default_alphas)

    @property
    def selects(self) -> bool:
        return len(self.alphas) > 1

    def _new_estimators(self) -> list[BaseEstimator]:
        kwargs = {"random_state": self.random_state, **DEFAULT_SGD_KWARGS}
        kwargs.update(self.model_kwargs or {})
        return [self._new_estimator(**{**kwargs, "alpha": a}) for a in self.alphas]

    @property
    def sets_steps(self) -> bool:
        """Each update sets every estimator's step (``step_size``, as a constant learning
        rate for that call): on scaled rows, unless ``model_kwargs`` names a
        ``learning_rate`` or an ``eta0`` (scikit-learn's schedule then)."""
        user = set(self.model_kwargs or {})
        return (
            self.scale and self.step_curvature is not None and not {"learning_rate", "eta0"} & user
        )

    def _start(self, y: np.ndarray) -> None:
        self.estimators_ = self._new_estimators()
        self.alpha_index_ = (len(self.estimators_) - 1) // 2
        self.scaler_ = StandardScaler() if self.scale else None
        self.n_updates_ = 0
        self.n_samples_seen_ = 0

    @property
    def estimator_(self) -> BaseEstimator:
        """The estimator of the chosen ``alpha``."""
        check_is_fitted(self, "estimators_")
        return self.estimators_[self.alpha_index_]

    @property
    def alpha_(self) -> float:
        return float(self.estimator_.alpha)

    def _transform(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "n_features_in_")
        X, _ = self._rows(X)
        return self.scaler_.transform(X) if self.scaler_ is not None else X

    def _scale_and_fit(self, X: np.ndarray, y: np.ndarray, **fit_kwargs: Any) -> None:
        if self.scaler_ is not None:
            self.scaler_.partial_fit(X)
            X = self.scaler_.transform(X)
        sets_steps = self.sets_steps
        if sets_steps:
            self.row_bound_ = max(getattr(self, "row_bound_", 0.0), self._row_bound(X))
        for estimator in self.estimators_:
            if sets_steps:
                step = step_size(
                    self.row_bound_, estimator.alpha, self.n_samples_seen_, self.step_curvature
                )
                # what set_params does for these two, without its ~40 us of checks per call
                estimator.learning_rate, estimator.eta0 = "constant", step
            estimator.partial_fit(X, y, **fit_kwargs)
        self.n_features_in_ = X.shape[1]
        self.n_updates_ += 1
        self.n_samples_seen_ += len(y)

    def _loss(self, estimator: BaseEstimator, X: np.ndarray, y: np.ndarray) -> float:
        raise NotImplementedError

    def _losses(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The held-out loss of every estimator of the grid on scaled rows ``X``."""
        return np.array([self._loss(e, X, y) for e in self.estimators_])

    def heldout_loss(self, X: np.ndarray, y: np.ndarray) -> float:
        """The held-out loss of each ``alpha`` (kept in ``heldout_losses_``); the probe
        chooses the lowest and returns it."""
        X = self._transform(X)
        self.heldout_losses_ = self._losses(X, y)
        self.alpha_index_ = int(np.nanargmin(self.heldout_losses_))
        return float(self.heldout_losses_[self.alpha_index_])

    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays: dict[str, np.ndarray] = {}
        values: dict[str, Any] = {}
        if not hasattr(self, "estimators_"):
            return arrays, values
        for i, estimator in enumerate(self.estimators_):
            estimator_state(estimator, f"estimator.{i}.", arrays, values)
        if self.scaler_ is not None:
            estimator_state(self.scaler_, "scaler.", arrays, values)
        fitted_state(self, ("estimators_", "scaler_"), arrays, values)
        return arrays, values

    def set_state(self, arrays: dict[str, np.ndarray], values: dict[str, Any]) -> Probe:
        if not arrays and not values:
            return self
        self.estimators_ = [
            restore_estimator(estimator, f"estimator.{i}.", arrays, values)
            for i, estimator in enumerate(self._new_estimators())
        ]
        self.scaler_ = (
            restore_estimator(StandardScaler(), "scaler.", arrays, values) if self.scale else None
        )
        own = {k: v for k, v in arrays.items() if "." not in k}
        own_values = {k: v for k, v in values.items() if "." not in k}
        restore_estimator(self, "", own, own_values)
        self.alpha_index_ = int(self.alpha_index_)
        for alpha, estimator in zip(self.alphas, self.estimators_, strict=True):
            coef = getattr(estimator, "coef_", None)  # every alpha's, not just the chosen one
            if coef is not None and coef.shape[-1] != self.n_features_in_:
                raise ValueError(
                    f"alpha={alpha} has coefficients for {coef.shape[-1]} features, "
                    f"not {self.n_features_in_}"
                )
        return self


@register_probe_kind("sgd_classifier")
class LinearProbe(ClassifierMixin, _ScaledSGD):
    """A logistic ``SGDClassifier`` behind a running ``StandardScaler``, trained online.

    ``classes_`` is sorted (scikit-learn's order, the order of ``predict_proba``'s columns)
    whatever order ``classes`` is given in; ``classes`` keeps the user's order for display.
    """

    step_curvature = 0.25  # log loss

    def _new_estimator(self, **kwargs: Any) -> SGDClassifier:
        kwargs["loss"] = "log_loss"
        return AveragedSGDClassifier(**kwargs)

    @property
    def classifier_(self) -> SGDClassifier:
        return self.estimator_

    def partial_fit(
        self, X: np.ndarray, y: np.ndarray, classes: Sequence[Any] | None = None
    ) -> LinearProbe:
        X, y = np.asarray(X, dtype=np.float32), np.asarray(y)
        first_call = not hasattr(self, "estimators_")
        if first_call:
            chosen = classes if classes is not None else self.classes
            known = np.unique(np.asarray(chosen if chosen is not None else y))
        else:
            known = self.classes_
        try:  # before any state changes, so a refused chunk leaves the probe as it was
            column_of(known, y)
        except ValueError as err:
            raise LmProbeError(
                f"{type(self).__name__}.partial_fit: {err}; a probe learns the classes it "
                f"starts with: pass classes=[...] listing every label when creating it"
            ) from None
        if first_call:
            self.classes_ = known
            self._start(y)
        if len(y) == 0:
            return self
        # scikit-learn needs the classes on an estimator's first call only; on later calls
        # it would check them again (unique_labels: a quarter of each update's own time)
        first = not hasattr(self.estimators_[0], "classes_")
        self._scale_and_fit(X, y, **({"classes": self.classes_} if first else {}))
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        return self.estimator_.decision_function(self._transform(X))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.estimator_.predict_proba(self._transform(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.estimator_.predict(self._transform(X))

    def predict_with_proba(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``predict(X)`` and ``predict_proba(X)``, scaling ``X`` once."""
        X = self._transform(X)
        return self.estimator_.predict(X), self.estimator_.predict_proba(X)

    def _loss(self, estimator: SGDClassifier, X: np.ndarray, y: np.ndarray) -> float:
        return float(log_loss(y, estimator.predict_proba(X), labels=self.classes_))

    def _losses(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        """scikit-learn's ``log_loss`` of each estimator's ``predict_proba``, for the whole
        grid in one product (its per-call input checks cost more than the arithmetic):
        probabilities are the logistic of the decision function, normalised over the classes
        one-vs-rest when there are more than two, and clipped to [eps, 1 - eps]."""
        W = np.stack([e.coef_ for e in self.estimators_])  # (grid, 1 or classes, d)
        b = np.stack([e.intercept_ for e in self.estimators_])
        z = np.einsum("nd,gcd->gnc", X.astype(np.float64), W) + b[:, None, :]
        column = column_of(self.classes_, y)
        p = expit(z)
        if p.shape[-1] == 1:  # binary: column 1 has p, column 0 has 1 - p
            p = np.where(column[None, :] == 1, p[..., 0], 1.0 - p[..., 0])
        else:
            p = p / p.sum(axis=-1, keepdims=True)
            p = np.take_along_axis(p, column[None, :, None], axis=-1)[..., 0]
        eps = np.finfo(np.float64).eps
        return -np.log(np.clip(p, eps, 1 - eps)).mean(axis=1)

    def score(self, X: np.ndarray, y: np.ndarray) -> float:
        """Cross-entropy (log loss), lower is better, as in lm_probe. Note: scikit-learn's
        classifiers return accuracy here; for model selection use ``scoring="neg_log_loss"``."""
        X, y = self._rows(X, y)
        return float(log_loss(y, self.predict_proba(X).astype(np.float64), labels=self.classes_))

    def new_scores(self) -> ClassificationScores:
        return ClassificationScores(self.classes_)

    def compute_metrics(self, X: np.ndarray, y: np.ndarray) -> Metrics:
        """lm_probe's metrics of this probe on (X, y): loss, accuracy and macro precision,
        recall, f1, plus Matthews correlation; also kept as ``self.metrics``."""
        X, y = self._rows(X, y)
        scores = self.new_scores()
        scores.add(self, X, y)
        self.metrics = Metrics.from_row(scores.compute())
        return self.metrics


# Inverse L2 strengths the ``logistic`` kind chooses among (the grid of the tests'
# LogisticRegressionCV reference, two points a decade), by accuracy over this many folds.
DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 2, 13))
CV_FOLDS = 5
# lbfgs's gradient tolerances. The CV fits only rank C: LogisticRegressionCV's default, 1e-4
# (at 1e-6 the C of a 16-tag UD-PUD layer took 5-8x LogisticRegressionCV's time, same C). Where
# two Cs are within a row of each other (a near-tie, common on a control's random labels),
# activations differing in their last bits (two ranks vs one process) may choose either.
# The final fit: at 1e-6, where lbfgs stopped moved coefficients of rows ~4e-8 apart (two
# ranks) by up to 2e-4 at C=10 on random labels; at 1e-8, 3e-6 (lbfgs then mostly stops on
# its function tolerance).
CV_TOL = 1e-4
FINAL_TOL = 1e-8


@register_probe_kind("logistic")
class LogisticProbe(LinearProbe):
    """Exact multinomial logistic regression: scikit-learn's ``LogisticRegression`` (lbfgs)
    on standardised features, fitted when training ends from every kept row (``fit_rows``,
    called by ``ProbeBank.refit``): the training rows and the held-out slice (the training
    rows alone with ``refit=false``). ``C`` is chosen among ``model_kwargs["C"]`` (one
    number or a list; default ``DEFAULT_CS``) by accuracy over ``CV_FOLDS`` stratified
    folds of those rows, as ``LogisticRegressionCV`` chooses (``choose_C``), then fitted on
    all of them. Until then it trains online as an ``sgd_classifier`` (its alpha grid and early
    stopping on the held-out slice), which is also what it stays where the training
    features were not kept (``refit`` false in the table). Its ``alpha_`` is the exact
    fit's L2 strength in SGD units, ``1 / (C * rows)``."""

    fits_rows = True

    @property
    def Cs(self) -> list[float]:
        value = (self.model_kwargs or {}).get("C", DEFAULT_CS)
        values = list(value) if np.ndim(value) else [value]
        try:
            Cs = [float(c) for c in values]
        except (TypeError, ValueError):
            Cs = []
        if not Cs or not all(np.isfinite(c) and c > 0 for c in Cs):
            raise LmProbeError(
                f"model_kwargs C={value!r} must be positive numbers, e.g. [0.01, 1, 100]"
            )
        return Cs

    def _new_estimators(self) -> list[BaseEstimator]:
        kwargs = {k: v for k, v in (self.model_kwargs or {}).items() if k != "C"}
        online = LinearProbe(self.classes, kwargs, self.scale, self.random_state, self.null_label)
        return online._new_estimators()

    @property
    def exact(self) -> bool:
        return hasattr(self, "logistic_")

    def _logistic(self, C: float, tol: float = CV_TOL) -> BaseEstimator:
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=C, max_iter=5000, tol=tol)

    def fit_rows(
        self,
        X: np.ndarray,
        y: np.ndarray,
        heldout_X: np.ndarray | None = None,
        heldout_y: np.ndarray | None = None,
        refit: bool = True,
    ) -> LogisticProbe:
        """Fit from scratch on ``X, y`` and (``refit``) the held-out rows, ``C`` chosen by
        cross-validation on them (``choose_C``)."""
        X, y = self._rows(X, y)
        if refit and heldout_y is not None and len(heldout_y):
            hX, hy = self._rows(heldout_X, heldout_y)
            X, y = np.concatenate([X, hX]), np.concatenate([y, hy])
        for attr in ("estimators_", "alpha_index_"):
            self.__dict__.pop(attr, None)
        self.classes_ = np.unique(np.asarray(self.classes if self.classes is not None else y))
        # in float64: lbfgs in float32 stops where rounding leads it (two ranks' rows, equal
        # to ~4e-9, gave coefficients 6e-5 apart; 1e-7 in float64)
        X = X.astype(np.float64)
        self.scaler_ = StandardScaler().fit(X) if self.scale else None
        Z = self.scaler_.transform(X) if self.scaler_ is not None else X
        C = self.choose_C(Z, y)
        if len(np.unique(y)) > 1:
            self.logistic_ = self._logistic(C, FINAL_TOL).fit(Z, y)
        else:  # one class seen (an online code's first rows): that class, with certainty
            self.logistic_ = self._logistic(C)
            self.logistic_.classes_ = np.unique(y)
            self.logistic_.coef_ = np.zeros((1, Z.shape[1]))
            self.logistic_.intercept_ = np.zeros(1)
        self.C_ = float(C)
        self.n_features_in_ = X.shape[1]
        self.n_samples_seen_ = len(y)
        return self

    def choose_C(self, Z: np.ndarray, y: np.ndarray) -> float:
        """The ``C`` of the grid with the best accuracy, summed over ``CV_FOLDS`` unshuffled
        stratified folds of the (standardised) rows ``Z, y`` in the order given, ties to
        the smallest ``C``: ``LogisticRegressionCV``'s default choice, each fold's path
        warm-started from small ``C`` to large at its tolerance (``CV_TOL``) as there. Log
        loss over shuffled folds chose ``C`` a grid step away, 0.5-1.1 points of test
        accuracy under it at 7 of 30 SmolLM2 layers on sentiment. A single ``C``, or too few
        rows to fold: the grid's middle."""
        from sklearn.model_selection import StratifiedKFold

        Cs = self.Cs
        counts = np.unique(y, return_counts=True)[1]
        folds = min(CV_FOLDS, int(counts.max(initial=0)))
        if len(Cs) == 1 or len(counts) < 2 or folds < 2:
            return Cs[len(Cs) // 2]
        order = np.argsort(Cs, kind="stable")
        scores = np.zeros(len(Cs))
        with warnings.catch_warnings():  # a class with fewer rows than folds: a warning
            warnings.simplefilter("ignore", UserWarning)
            splits = list(StratifiedKFold(folds).split(Z, y))
        for train, test in splits:
            model = self._logistic(Cs[order[0]])
            model.warm_start = len(np.unique(y[train])) > 1
            for i in order:
                if model.warm_start:
                    model.set_params(C=Cs[i]).fit(Z[train], y[train])
                    scores[i] += np.mean(model.predict(Z[test]) == y[test])
                else:  # one class in the fold: it
                    scores[i] += np.mean(y[test] == y[train][0])
        self.cv_accuracy_ = scores / len(splits)
        return Cs[order[int(np.argmax(scores[order]))]]

    @property
    def estimator_(self) -> BaseEstimator:
        return self.logistic_ if self.exact else super().estimator_

    @property
    def alpha_(self) -> float:
        if self.exact:
            return 1.0 / (self.C_ * self.n_samples_seen_)
        return super().alpha_

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        if not self.exact:
            return super().predict_proba(X)
        Z, fitted = self._transform(X), self.logistic_.classes_
        proba = self.logistic_.predict_proba(Z) if len(fitted) > 1 else np.ones((len(Z), 1))
        if len(fitted) == len(self.classes_):
            return proba
        full = np.zeros((len(proba), len(self.classes_)))  # classes the fit never saw: 0
        full[:, column_of(self.classes_, self.logistic_.classes_)] = proba
        return full

    def predict(self, X: np.ndarray) -> np.ndarray:
        if not self.exact:
            return super().predict(X)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def predict_with_proba(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self.exact:
            return super().predict_with_proba(X)
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)], proba

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        if not self.exact:
            return super().decision_function(X)
        return self.logistic_.decision_function(self._transform(X))

    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        if not self.exact:
            return super().get_state()
        arrays: dict[str, np.ndarray] = {}
        values: dict[str, Any] = {}
        estimator_state(self.logistic_, "logistic.", arrays, values)
        if self.scaler_ is not None:
            estimator_state(self.scaler_, "scaler.", arrays, values)
        fitted_state(self, ("logistic_", "scaler_"), arrays, values)
        return arrays, values

    def set_state(self, arrays: dict[str, np.ndarray], values: dict[str, Any]) -> Probe:
        if not any(k.startswith("logistic.") for k in [*arrays, *values]):
            return super().set_state(arrays, values)
        self.logistic_ = restore_estimator(self._logistic(1.0), "logistic.", arrays, values)
        self.scaler_ = (
            restore_estimator(StandardScaler(), "scaler.", arrays, values) if self.scale else None
        )
        own = {k: v for k, v in arrays.items() if "." not in k}
        own_values = {k: v for k, v in values.items() if "." not in k}
        restore_estimator(self, "", own, own_values)
        if self.logistic_.coef_.shape[-1] != self.n_features_in_:
            raise ValueError(
                f"the logistic fit has coefficients for {self.logistic_.coef_.shape[-1]} "
                f"features, not {self.n_features_in_}"
            )
        return self


@register_probe_kind("sgd_regressor")
class RegressionProbe(RegressorMixin, _ScaledSGD):
    """A linear ``SGDRegressor`` for continuous targets, behind running scalers of the
    features and of the target (SGD diverges on targets far from unit scale)."""

    task = "regression"
    needs_classes = False

    # Squared loss (``0.5 * r^2``, curvature 1) has no bounded gradient: a row whose update
    # has ``step * |x|^2 > 2`` overshoots and its error grows. Bounding by the largest
    # squared norm seen with curvature 1/2 keeps ``step * |x|^2 <= 2`` for every row (no
    # update expands the error). Standardised rows of real activations are far from
    # ``n_features``: a 576-d SmolLM2 layer on single words had a median of 0.4x, a 99th
    # percentile of 7x and a largest of 10x; the classifier's bound diverged there.
    @property
    def step_curvature(self) -> float:  # type: ignore[override]
        """Half the curvature of the loss ``model_kwargs`` names (see above): 1/2 for
        squared loss and the losses that bend like it at most (huber, epsilon-insensitive),
        1 for ``squared_epsilon_insensitive`` (scikit-learn's has no factor 1/2)."""
        loss = (self.model_kwargs or {}).get("loss", "squared_error")
        return 1.0 if loss == "squared_epsilon_insensitive" else 0.5

    # Two decades more than the classifier's: squared loss sets no scale of its own, and
    # with more features than rows ridge regression wants alpha * n_rows near 1e2-1e3.
    default_alphas = (*DEFAULT_ALPHAS, 10.0, 100.0)

    def _row_bound(self, X: np.ndarray) -> float:
        """The largest squared norm of a scaled row of ``X`` (see ``step_curvature``)."""
        return float(np.einsum("ij,ij->i", X, X, dtype=np.float64).max())

    def _new_estimator(self, **kwargs: Any) -> SGDRegressor:
        return SGDRegressor(**kwargs)

    def partial_fit(self, X: np.ndarray, y: np.ndarray) -> RegressionProbe:
        X, y = np.asarray(X, dtype=np.float32), np.asarray(y, dtype=np.float64)
        if len(y) == 0:
            return self
        if not hasattr(self, "estimators_"):
            self._start(y)
            # Sums are taken about the first chunk's mean: raw sums of squares of targets far
            # from zero (1e9 +- 5) cancel to rounding noise when the variance is taken.
            self.target_shift_ = np.array([y.mean()])
            self.target_sum_ = np.zeros(1)
            self.target_sumsq_ = np.zeros(1)
        shifted = y - self.target_shift_[0]
        self.target_sum_ += shifted.sum()
        self.target_sumsq_ += (shifted**2).sum()
        mean, scale = self._target_scale(len(y))
        self._scale_and_fit(X, (y - mean) / scale)
        return self

    def _target_scale(self, extra: int = 0) -> tuple[float, float]:
        n = self.n_samples_seen_ + extra
        mean = float(self.target_sum_[0] / n)
        var = max(float(self.target_sumsq_[0] / n) - mean**2, 0.0)
        return float(self.target_shift_[0]) + mean, float(np.sqrt(var)) or 1.0

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = self._transform(X)  # NotFittedError before the target statistics are read
        mean, scale = self._target_scale()
        return self.estimator_.predict(X) * scale + mean

    def _loss(self, estimator: SGDRegressor, X: np.ndarray, y: np.ndarray) -> float:
        mean, scale = self._target_scale()
        return float(mean_squared_error(y, estimator.predict(X) * scale + mean))

    def new_scores(self) -> RegressionScores:
        return RegressionScores()


@register_probe_kind("mean_difference")
class MeanDifferenceProbe(ClassifierMixin, Probe):
    """The difference of the two class means as the direction, threshold at the midpoint.

    Fitted in closed form from streaming per-class sums (order and chunking do not matter);
    a standard baseline in the probing literature. Binary only; it has no probabilities, so
    its loss is NaN and it does not stop early (it has nothing left to learn after one pass),
    so it holds out no rows either.
    """

    max_classes = 2
    stops_early = False

    def __init__(self, classes: Sequence[Any] | None = None, null_label: Any = None) -> None:
        self.classes = classes
        self.null_label = null_label

    def partial_fit(self, X: np.ndarray, y: np.ndarray) -> MeanDifferenceProbe:
        X, y = np.asarray(X, dtype=np.float64), np.asarray(y)
        if not hasattr(self, "classes_"):
            chosen = self.classes if self.classes is not None else y
            classes = np.unique(np.asarray(chosen))
            # checked before any state is set, so a refused probe is left unfitted
            if self.classes is None and len(classes) < 2:
                raise LmProbeError(
                    f"mean_difference probe: the first chunk has labels {classes.tolist()} "
                    f"only; pass classes=[...] with both labels"
                )
            if len(classes) != 2:
                raise LmProbeError(
                    f"mean_difference probes are binary; classes {classes.tolist()} has "
                    f"{len(classes)}: use kind=sgd_classifier"
                )
            self.classes_ = classes
            self.class_sums_ = np.zeros((2, X.shape[1]))
            self.class_counts_ = np.zeros(2)
        if len(y) == 0:
            return self
        column = column_of(self.classes_, y)
        np.add.at(self.class_sums_, column, X)
        self.class_counts_ += np.bincount(column, minlength=2)
        means = self.class_sums_ / np.maximum(self.class_counts_, 1)[:, None]
        self.coef_ = (means[1] - means[0])[None, :]
        self.intercept_ = np.array([-self.coef_[0] @ (means[0] + means[1]) / 2])
        self.n_features_in_ = X.shape[1]
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "coef_")
        X, _ = self._rows(X)
        return X.astype(np.float64) @ self.coef_[0] + self.intercept_[0]

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[(self.decision_function(X) > 0).astype(int)]

    def predict_with_proba(self, X: np.ndarray) -> tuple[np.ndarray, None]:
        return self.predict(X), None

    def new_scores(self) -> ClassificationScores:
        return ClassificationScores(self.classes_)

    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays: dict[str, np.ndarray] = {}
        values: dict[str, Any] = {}
        estimator_state(self, "", arrays, values)
        return arrays, values

    def set_state(self, arrays: dict[str, np.ndarray], values: dict[str, Any]) -> Probe:
        return restore_estimator(self, "", arrays, values)
