"""The end of training: the refit on every kept row (the held-out slice included) and the
online code length (MDL)."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from lmprobe.bank.rows import checked_rows
from lmprobe.bank.worker import BackgroundJob
from lmprobe.probes.base import (
    Probe,
    make_probe,
)
from lmprobe.scoring.metrics import column_of, row_log_loss
from lmprobe.tracing.features import Features

log = logging.getLogger("lmprobe")


# The online code's block boundaries, as fractions of the training rows (Voita & Titov,
# 2020), and the seed stream of the rows' order for it.
MDL_FRACTIONS = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.0625, 0.125, 0.25, 0.5, 1.0)
MDL_STREAM = 2020
# Rows per update of a refit (``ProbeBank.refit``): part of what a refit is, like its step
# schedule (each update of a classifier probe sets its step), not a setting, so no knob
# described as call overhead (``chunk_rows``) changes a refitted probe.
REFIT_ROWS = 256


class Refitting:
    """A part of ``ProbeBank`` (``lmprobe.bank.bank``): its methods use the bank's state."""

    def refit_all(
        self,
        rows: Sequence[tuple[str, Features]],
        n_docs: int,
        background: bool = False,
    ) -> list[str]:
        """``refit`` each ``(name, rows)``; returns the probes refitted. ``background``: on
        the worker thread, after the training running there (returns none)."""
        if not background:
            self.wait()
            done = self._each(self._finish, [(name, r, n_docs) for name, r in rows])
            return [name for (name, _), refitted in zip(rows, done, strict=True) if refitted]
        before = self._pending
        # a refit replaces a fitted probe's state (never leaves one unfitted), but not in
        # one step: ``trained_any`` must not read it meanwhile
        fitted = any(self._records[name].probe.is_fitted for name, _ in rows)
        self._pending_rows = self._pending_rows or fitted

        def refits() -> None:
            if before is not None:
                before.result()
            self._each(self._finish, [(name, r, n_docs) for name, r in rows])

        self._pending = BackgroundJob(refits)
        return []

    def uses_kept_rows(self) -> bool:
        """Whether some probe learns from the kept training rows when training ends (a
        one-epoch run keeps them only then): a kind fitted from every row, a refit (a
        held-out slice to refit with), or a code length. From the configs: every rank
        decides alike."""
        return any(
            getattr(self._records[name].probe, "fits_rows", False)
            or (config.refit and config.heldout_size > 0 and self._needs_heldout(name))
            or self._codes(name)
            for name, config in self.configs.items()
        )

    def _codes(self, name: str) -> bool:
        """The probe gets an online code length: asked for (``code_length``), and its kind
        is a classifier with probabilities."""
        probe = self._records[name].probe
        return (
            self.configs[name].code_length
            and probe.task == "classification"
            and hasattr(probe, "predict_proba")
        )

    def drop_rows(self, names: Iterable[str]) -> None:
        """A first-epoch training batch was traced without the probes ``names`` (they had
        stopped): their kept rows lack it, so they are not refitted; a resumed run refits the
        others (``ProbeModule.refit_probes``)."""
        if self.online_pass:
            for name in names:
                self._records[name].rows_dropped = True

    def refit(self, name: str, rows: Features, n_docs: int) -> bool:
        """Retrain ``name`` from scratch on every training row, its held-out slice included,
        with what the slice chose: the ``alpha`` and the number of passes (scikit-learn's
        ``refit=True``, as ``LogisticRegressionCV`` does). Held-out rows pay for choosing;
        on a few hundred rows, leaving them out of the final probe costs points.

        ``rows`` are the probe's training rows (kept features); the refit needs them for all
        ``n_docs`` training documents, else (a probe that stopped during the first epoch, or
        features too large to keep) the probe stays as trained. Each pass feeds the rows, in
        document order, in one seeded permutation per pass, ``REFIT_ROWS`` at a time
        (whatever ``chunk_rows`` the run's updates had). Returns whether the probe was
        refitted."""
        self.wait()
        return self._refit(name, rows, n_docs)

    def _finish(self, name: str, rows: Features, n_docs: int) -> bool:
        """The code length and the refit of one probe (returns whether it was refitted): the
        code length first, with what training chose, except for a kind fitted from every
        row (``fits_rows``), whose blocks are coded with what its final fit chose."""
        if getattr(self._records[name].probe, "fits_rows", False):
            refitted = self._refit(name, rows, n_docs)
            self._code_length(name, rows, n_docs)
            return refitted
        self._code_length(name, rows, n_docs)
        return self._refit(name, rows, n_docs)

    def _all_rows(self, name: str, rows: Features, n_docs: int) -> Features | None:
        """The probe's kept training rows and its held-out slice, in document order; None
        unless they hold every one of the ``n_docs`` training documents."""
        heldout = self._records[name].heldout
        if heldout is not None and len(heldout.y):
            rows = Features.concat([rows, heldout])
        if len(np.unique(rows.doc)) != n_docs:
            return None
        order = np.argsort(rows.doc, kind="stable")
        return Features(rows.X[order], rows.y[order], rows.doc[order])

    def _passes(self, name: str, n_rows: int) -> int:
        """The passes over its training rows the probe made (its ``n_samples_seen_``)."""
        heldout = self._records[name].heldout
        trained_rows = n_rows - (len(heldout.y) if heldout is not None else 0)
        seen = getattr(self._records[name].probe, "n_samples_seen_", 0) or 0
        return max(1, round(seen / max(trained_rows, 1)))

    def _fresh_fit(
        self,
        name: str,
        X: np.ndarray,
        y: np.ndarray,
        passes: int,
        classes: np.ndarray | None = None,
    ) -> Probe:
        """A new probe of ``name``'s config with what its held-out slice chose (its
        ``alpha``; ``classes``: every class, whatever ``y`` holds), trained on ``X, y``
        ``passes`` times, each pass in one seeded permutation, ``REFIT_ROWS`` at a time."""
        config, probe = self.configs[name], self._records[name].probe
        kwargs = dict(config.model_kwargs)
        if getattr(probe, "fits_rows", False):
            kwargs["C"] = probe.C_
        elif hasattr(probe, "alpha_"):
            kwargs["alpha"] = probe.alpha_
        changes: dict[str, Any] = {"model_kwargs": kwargs}
        if classes is not None:
            changes["classes"] = np.asarray(classes).tolist()
        fresh = make_probe(dataclasses.replace(config, **changes), self.seed)
        if getattr(fresh, "fits_rows", False):
            with checked_rows():
                return fresh.fit_rows(X, y)
        with checked_rows():
            for epoch in range(passes):
                perm = np.random.default_rng((self.seed, epoch)).permutation(len(y))
                for start in range(0, len(y), REFIT_ROWS):
                    chunk = perm[start : start + REFIT_ROWS]
                    fresh.partial_fit(X[chunk], y[chunk])
        return fresh

    def _refit(self, name: str, rows: Features, n_docs: int) -> bool:
        record = self._records[name]
        heldout, probe = record.heldout, record.probe
        seen = getattr(probe, "n_samples_seen_", None)
        if getattr(probe, "fits_rows", False):
            return self._fit_rows(name, rows, n_docs)
        if (
            not self.configs[name].refit
            or record.refitted  # once (a run resumed after its refit ends again)
            or heldout is None
            or not len(heldout.y)
            or not probe.is_fitted
            or not seen
        ):
            return False
        every = self._all_rows(name, rows, n_docs)
        if every is None:
            log.info("probe %r keeps its training-rows-only fit: not every row was kept", name)
            return False
        passes = self._passes(name, len(every.y))
        refitted = self._fresh_fit(name, every.X, every.y, passes)
        # in place: a probe object taken before the fit (lm_probe's runner.probes) is the
        # final one afterwards; it now holds the chosen alpha alone
        probe.__dict__.clear()
        probe.__dict__.update(refitted.__dict__)
        record.refitted = True
        return True

    def _fit_rows(self, name: str, rows: Features, n_docs: int) -> bool:
        """A kind fitted from every row (``fits_rows``): its final fit (which chooses among
        its settings itself), from every training row with ``refit`` (the held-out slice
        included), else from the kept training rows; in document order either way, so its
        cross-validation folds are the same on any number of processes."""
        record, config = self._records[name], self.configs[name]
        probe = record.probe
        if record.refitted or not probe.is_fitted:
            return False
        every = self._all_rows(name, rows, n_docs)
        if every is None:
            log.info("probe %r keeps its online fit: not every training row was kept", name)
            return False
        if not config.refit:
            order = np.argsort(rows.doc, kind="stable")
            every = Features(rows.X[order], rows.y[order], rows.doc[order])
        final = make_probe(config, self.seed)
        with checked_rows():
            final.fit_rows(every.X, every.y)
        probe.__dict__.clear()
        probe.__dict__.update(final.__dict__)
        record.refitted = True
        return True

    def code_length(self, name: str, rows: Features, n_docs: int) -> bool:
        """The online code length of ``name``'s training labels (MDL probing, Voita & Titov
        2020), in ``code_bits`` (and the uniform code's in ``uniform_bits``).

        Every training row (the held-out slice included; ``rows`` are the kept ones, as for
        ``refit``) in one seeded random order, cut at ``MDL_FRACTIONS`` of the rows: the
        first block costs the uniform code, ``log2(classes)`` bits a row; each later block
        costs ``-log2 p(label)`` under a fresh probe trained on every row before it exactly
        as ``refit`` trains (the chosen ``alpha``, as many passes as the probe made,
        ``REFIT_ROWS`` at a time; a kind fitted from every row: its final fit's rule with the
        setting it chose). Computed once, before the refit (after the final fit for a kind
        fitted from every row); not for a kind without probabilities or rows not all kept.
        Returns whether it was computed."""
        self.wait()
        return self._code_length(name, rows, n_docs)

    def _code_length(self, name: str, rows: Features, n_docs: int) -> bool:
        record = self._records[name]
        probe = record.probe
        if (
            record.uniform_bits  # once (a resumed run)
            or (record.refitted and not getattr(probe, "fits_rows", False))
            or not self._codes(name)
            or not probe.is_fitted
        ):
            return False
        every = self._all_rows(name, rows, n_docs)
        if every is None:
            log.info("probe %r has no code length: not every training row was kept", name)
            return False
        passes, classes = self._passes(name, len(every.y)), np.asarray(probe.classes_)
        order = np.random.default_rng((self.seed, MDL_STREAM)).permutation(len(every.y))
        X, y = every.X[order], every.y[order]
        ends = sorted({max(1, round(f * len(y))) for f in MDL_FRACTIONS})
        bits = ends[0] * math.log2(len(classes))
        for start, end in zip(ends[:-1], ends[1:], strict=True):
            coder = self._fresh_fit(name, X[:start], y[:start], passes, classes)
            proba = coder.predict_proba(X[start:end])
            column = column_of(np.asarray(coder.classes_), y[start:end])
            bits += float(row_log_loss(proba, column).sum()) / math.log(2)
        record.code_bits = bits
        record.uniform_bits = len(y) * math.log2(len(classes))
        return True
