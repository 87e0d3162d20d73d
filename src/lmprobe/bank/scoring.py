"""Scoring passes: each probe's metrics, the bootstrap intervals and the tables."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from lmprobe.bank.rows import RowBuffer, checked_rows
from lmprobe.bank.worker import BackgroundJob
from lmprobe.probes.base import (
    resolve_probe_kind,
)
from lmprobe.scoring.metrics import metric_columns
from lmprobe.scoring.uncertainty import MAX_KEPT_DRAWS, bootstrap, paired_p_values, resample_counts
from lmprobe.tracing.features import FeatureKey, Features, PendingFeatures

log = logging.getLogger("lmprobe")


class Scoring:
    """A part of ``ProbeBank`` (``lmprobe.bank.bank``): its methods use the bank's state."""

    def score(
        self, stage: str, features: dict[FeatureKey, PendingFeatures], chunk_rows: int | None
    ) -> None:
        """Add one batch of a scoring pass (``val``, ``test``) to every probe's metrics."""
        buffer = self._score_rows.setdefault(stage, RowBuffer())
        for key, rows in features.items():
            if len(rows) and buffer.add(key, rows, chunk_rows):
                self._score(stage, key, buffer.take(key))

    def _score(self, stage: str, key: FeatureKey, rows: Features | None) -> None:
        self.wait()
        if rows is None:
            return
        with checked_rows():
            for name, record in self._records.items():
                probe = record.probe
                if self.key(name) != key or not probe.is_fitted:
                    continue
                scores = self._scores.get((stage, name))
                if scores is None:
                    scores = self._scores[(stage, name)] = probe.new_scores()
                scores.add(probe, rows.X, rows.y, rows.doc)

    def flush_scoring(self, stage: str, drop_failed: bool = False) -> None:
        """Score the rows of ``stage`` still buffered (the end of a scoring pass)."""
        buffer = self._score_rows.pop(stage, None)
        for key in buffer.names() if buffer else []:
            self._score(stage, key, buffer.take(key, drop_failed))

    def draw_resamples(self, n: int, n_resamples: int) -> None:
        """Draw the test bootstrap's resamples of ``n`` rows (``uncertainty.resample_counts``)
        on a worker thread, after the training running there, if any: a pass that scores
        ``n`` rows per probe (a test set of ``n`` documents, pooled) is traced meanwhile, and
        ``finish_scoring`` takes them for the probes scored on ``n`` rows. The draws are the
        ones ``bootstrap`` would make (same rows, resamples and seed); if the probes score
        another number of rows, they go unused. Not for what would not be kept in memory."""
        if n <= 0 or n_resamples <= 0 or n * n_resamples > MAX_KEPT_DRAWS:
            return
        before, seed, drawn = self._pending, self.seed, []

        def draw() -> None:
            if before is not None:
                before.join()  # one worker's work at a time; its error is raised by wait()
            drawn.extend(resample_counts(n, n_resamples, seed))

        self._drawn = (n, n_resamples, seed, BackgroundJob(draw), drawn)

    def _take_draws(self, n_resamples: int) -> dict[int, list[np.ndarray]]:
        """The resamples drawn ahead (``draw_resamples``) for ``n_resamples`` resamples with
        this bank's seed, by number of rows; none if they were drawn for other ones."""
        if self._drawn is None:
            return {}
        n, resamples, seed, job, drawn = self._drawn
        self._drawn = None
        try:
            job.result()
        except Exception as error:  # e.g. out of memory: draw them in place instead
            log.warning("drawing the bootstrap's resamples ahead failed (%r); drawing now", error)
            return {}
        return {n: drawn} if (resamples, seed) == (n_resamples, self.seed) else {}

    def finish_scoring(
        self, stage: str, drop_failed: bool = False, n_resamples: int = 0
    ) -> pd.DataFrame:
        """The metrics table of a scoring pass (index: probe name); NaN where a probe scored
        nothing (an interrupted pass). With ``n_resamples``, classifier probes also get 95%
        bootstrap intervals (``<metric>_low``/``_high``) and ``p_vs_best`` (see
        ``lmprobe.scoring.uncertainty``). Resets the pass."""
        self.wait()
        self.flush_scoring(stage, drop_failed)
        rows, scored, n_classes, per_class = {}, {}, {}, []
        for name, config in self.configs.items():
            task = resolve_probe_kind(config.kind).task
            row: dict[str, Any] = dict.fromkeys(metric_columns(task), float("nan"))
            row["support"] = 0
            scores = self._scores.pop((stage, name), None)
            if scores is not None:
                row.update(scores.compute())
            record = self._records[name]
            row.update(record.columns())
            if task == "classification":
                row["majority_accuracy"] = float("nan")
                if scores is not None and name not in self.control_of:
                    scored[name], n_classes[name] = scores.rows(), len(scores.classes)
                    per_class.append(scores.per_class(name))
                    row["majority_accuracy"] = self._majority_accuracy(name, scored[name])
                bits, uniform = record.code_bits, record.uniform_bits
                row["codelength_bits"] = bits if uniform else float("nan")
                row["compression"] = uniform / bits if uniform and bits else float("nan")
            rows[name] = row
        if n_resamples and scored:
            drawn = self._take_draws(n_resamples)
            intervals, resampled = bootstrap(scored, n_classes, n_resamples, self.seed, drawn)
            point = {name: rows[name]["accuracy"] for name in scored}
            for name, p_value in paired_p_values(scored, point, resampled).items():
                rows[name]["p_vs_best"] = p_value
                rows[name].update(intervals.get(name, {}))
        for twin, parent in self.control_of.items():
            control = rows.pop(twin)
            rows[parent]["control_accuracy"] = control["accuracy"]
            rows[parent]["selectivity"] = rows[parent]["accuracy"] - control["accuracy"]
            rows[parent]["control_codelength_bits"] = control["codelength_bits"]
            rows[parent]["control_compression"] = control["compression"]
        table = pd.DataFrame.from_dict(rows, orient="index")
        table.index.name = "probe"
        # precision, recall, F1 and support of every class of every classifier probe
        self.class_tables[stage] = (
            pd.concat(per_class).set_index(["probe", "class"]) if per_class else pd.DataFrame()
        )
        return table

    def _majority_accuracy(self, name: str, scored: dict[str, Any]) -> float:
        """Accuracy of always predicting the most frequent training class (a baseline)."""
        counts = self._records[name].class_counts
        if not len(scored["target"]) or not counts.any():
            return float("nan")
        return float((scored["target"] == int(np.argmax(counts))).mean())

    def keep_table(self, stage: str, table: pd.DataFrame) -> None:
        """The table of a finished scoring pass, kept as the pass's result."""
        self.tables[stage] = table

    def scores_of(self, stage: str, names: set[str]) -> dict[tuple[str, str], Any]:
        """The metric accumulators of ``stage`` of the probes ``names``."""
        return {k: v for k, v in self._scores.items() if k[0] == stage and k[1] in names}

    def add_scores(self, scores: dict[tuple[str, str], Any]) -> None:
        """Accumulators another process scored (its probes'), for this one's table."""
        self._scores.update(scores)
