"""The held-out plan and early stopping: which training rows are held out, and when a
probe stops."""

from __future__ import annotations

import logging

import numpy as np

from lmprobe.bank.rows import checked_rows
from lmprobe.errors import LmProbeError
from lmprobe.probes.base import (
    resolve_probe_kind,
)
from lmprobe.tracing.features import FeatureKey, Features

log = logging.getLogger("lmprobe")


class EarlyStopping:
    """A part of ``ProbeBank`` (``lmprobe.bank.bank``): its methods use the bank's state."""

    def heldout_plan(self, n_rows: int, seed: int | None = None) -> np.ndarray:
        """The training rows to hold out: the first ``round(test_size * n)`` rows of one
        seeded permutation per probe, so probes with equal ``test_size`` share a slice."""
        seed = self.seed if seed is None else seed
        sizes = self._heldout_sizes(n_rows)
        for name, size in sizes.items():  # checked before the slice is traced
            if size and size >= n_rows:
                raise LmProbeError(
                    f"probe {name!r}: heldout_size={self.configs[name].heldout_size} holds out "
                    f"all {n_rows} training rows, leaving none to train on; lower heldout_size "
                    f"or use more training data"
                )
        return np.random.default_rng(seed).permutation(n_rows)[: max(sizes.values(), default=0)]

    def _heldout_sizes(self, n_rows: int) -> dict[str, int]:
        return {
            name: int(round(c.heldout_size * n_rows)) if self._needs_heldout(name) else 0
            for name, c in self.configs.items()
        }

    def _needs_heldout(self, name: str) -> bool:
        """Held-out rows serve early stopping and the choice among a probe's settings (its
        ``alpha`` grid): a probe with either holds them out."""
        return self._stops_early(name) or self._records[name].probe.selects

    def _stops_early(self, name: str) -> bool:
        """Early stopping is on and the kind has a held-out criterion (else no rows are held
        out for it: a mean-difference probe trains on all of them)."""
        config = self.configs[name]
        return config.early_stopping and resolve_probe_kind(config.kind).stops_early

    def set_heldout(
        self, union: np.ndarray, n_rows: int, features: dict[FeatureKey, Features]
    ) -> None:
        """Take the held-out slices from the traced ``union`` rows (``Features.doc`` are
        training-set rows); rows held out only for other probes are training data for this one."""
        self.wait()
        for name, size in self._heldout_sizes(n_rows).items():
            rows = features.get(self.key(name))
            if rows is None:
                continue
            self._records[name].heldout = rows.select_docs(union[:size])
            extra = rows.select_docs(union[size:])
            if len(extra.y):
                with checked_rows():
                    self._fit(name, extra.X, extra.y)
        self.heldout_index = np.asarray(union, dtype=np.int64)
        self.prepared = True

    def _check_stopping(self, name: str) -> None:
        """Right after an update: score the held-out slice; retire the probe when it is out
        of patience (training batches without an improvement of ``threshold``, counted after
        ``warmup_steps``) or at ``max_steps``."""
        config, record = self.configs[name], self._records[name]
        steps, heldout = record.steps, record.heldout
        if heldout is not None and len(heldout.y):
            loss = record.probe.heldout_loss(heldout.X, heldout.y)  # also chooses alpha
            if loss is not None and self._stops_early(name):
                record.history.append((steps, loss))
                if loss < record.best_loss - config.threshold:
                    record.best_loss, record.best_step = loss, steps
                waited = steps - max(record.best_step, config.warmup_steps)
                if steps > config.warmup_steps and waited >= config.patience:
                    log.info("Early stopping after %d steps for %s", steps, name)
                    record.live = False
                    record.stopped_early = True
                    return
        if config.max_steps is not None and steps >= config.max_steps:
            log.info("Reached max_steps=%d for %s", config.max_steps, name)
            record.live = False
