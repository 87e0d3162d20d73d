"""scikit-learn internals lmprobe relies on: the private module
``sklearn.linear_model._stochastic_gradient`` whose ``fit_binary`` ``AveragedSGDClassifier``
wraps for one call at a time, and the private ``_fit_binary``/``_fit_multiclass`` methods
and ``_standard_intercept``/``_average_intercept`` attributes of ``SGDClassifier``.

``TESTED`` names the scikit-learn releases this was checked against; ``check()`` says
whether the internals are where this module expects them (tests/test_integrations.py
fails loudly when a new release moves them).
"""

from __future__ import annotations

import threading

import numpy as np
from sklearn.linear_model import SGDClassifier

TESTED = ("1.9",)  # major.minor releases checked (tests/test_integrations.py)


def check() -> list[str]:
    """The internals this module uses that the installed scikit-learn lacks (empty: all there)."""
    missing = []
    if _sgd_module is None or not callable(getattr(_sgd_module, "fit_binary", None)):
        missing.append("sklearn.linear_model._stochastic_gradient.fit_binary")
    for name in ("_fit_binary", "_fit_multiclass"):
        if not callable(getattr(SGDClassifier, name, None)):
            missing.append(f"SGDClassifier.{name}")
    return missing


try:  # where scikit-learn keeps the fit_binary that AveragedSGDClassifier wraps
    from sklearn.linear_model import _stochastic_gradient as _sgd_module
except ImportError:  # another scikit-learn: its own _fit_binary as it is
    _sgd_module = None
_CAPTURE = threading.Lock()


class AveragedSGDClassifier(SGDClassifier):
    """scikit-learn's ``SGDClassifier`` whose averaged ``partial_fit`` keeps its running
    intercepts from one call to the next (scikit-learn 1.9.1 does not; ``fit`` runs every
    epoch in one call and is not affected).

    Averaged SGD keeps two sets of parameters: the running ones that SGD updates
    (``_standard_coef``/``_standard_intercept``) and their average (``coef_``/``intercept_``).
    The running weights are updated in place, but the running intercepts come back from
    ``fit_binary`` as numbers, and once averaging has started scikit-learn stores them
    nowhere: with two classes ``_fit_binary`` drops them, so every call restarts them from
    0; with more, ``_fit_multiclass`` writes them into ``intercept_``, which is then
    ``_average_intercept`` (the averages are overwritten, the running ones restart from the
    first call's). Either way the intercepts stay near their start: on 17 UPOS tags near -1
    where the optimum has -3 to -8 (1.7-2.8 points of accuracy under the reference, after
    any number of epochs), and on a two-class set with 5% positives under the majority
    class. Here ``_fit_binary`` keeps what ``fit_binary`` returned, and ``_fit_multiclass``
    is handed ``_standard_intercept`` as ``intercept_`` to write into. The updates
    themselves are scikit-learn's."""

    def _fit_binary(self, X, y, alpha, *args, **kwargs):
        sgd = _sgd_module
        original, running = getattr(sgd, "fit_binary", None), []
        if not self.average or original is None:  # (another scikit-learn: theirs as it is)
            return super()._fit_binary(X, y, alpha, *args, **kwargs)

        def fit_binary(est, *a, **k):
            result = original(est, *a, **k)
            if est is self:
                running.append(result[1])
            return result

        with _CAPTURE:  # the module's function, swapped for this call only
            sgd.fit_binary = fit_binary
            try:
                result = super()._fit_binary(X, y, alpha, *args, **kwargs)
            finally:
                sgd.fit_binary = original
        if running and self._average_intercept is self.intercept_:  # averaging: dropped
            self._standard_intercept = np.array(running[-1:], dtype=self.intercept_.dtype)
        return result

    def _fit_multiclass(self, X, y, alpha, *args, **kwargs):
        if self.average and getattr(self, "_standard_intercept", None) is not None:
            self.intercept_ = self._standard_intercept  # where the new ones are written
        return super()._fit_multiclass(X, y, alpha, *args, **kwargs)
