"""Callbacks that train, stop and score the probe bank from the features a step returns."""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from sklearn.metrics import log_loss

from lmprobe.features import Features, PendingFeatures, gather
from lmprobe.metrics import ProbeScores, metric_columns
from lmprobe.module import ProbeModule

log = logging.getLogger("lmprobe")

METRIC_COLUMNS = metric_columns()


DEFAULT_CHUNK_ROWS = 256


class RowBuffer:
    """Collects feature rows per name until ``chunk_rows`` are there (``None``: every batch).

    scikit-learn's ``partial_fit`` and ``predict_proba`` cost about a millisecond per call
    whatever the size of the call, and SGD updates per sample anyway: handing probes larger
    chunks removes call overhead without changing the maths (beyond SGD's in-call shuffle).
    On a GPU it also means one device-to-host copy, one wait, per chunk instead of per batch.
    """

    def __init__(self, chunk_rows: int | None) -> None:
        self.chunk_rows = chunk_rows
        self.parts: dict[Any, list[PendingFeatures]] = {}
        self.rows: dict[Any, int] = {}

    def add(self, name: Any, features: PendingFeatures) -> bool:
        """Buffer ``features``; True when ``name`` has a full chunk."""
        self.parts.setdefault(name, []).append(features)
        self.rows[name] = self.rows.get(name, 0) + len(features)
        return self.chunk_rows is None or self.rows[name] >= self.chunk_rows

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

    def clear(self) -> None:
        self.parts.clear()
        self.rows.clear()


class ProbeUpdater(Callback):
    """``partial_fit`` every live probe on the features of the training batches.

    Rows are handed over in chunks of at least ``chunk_rows`` (``None``: after every batch);
    whatever is left is handed over at the end of each epoch. A probe's *steps* count the
    training batches it has consumed, chunked or not.
    """

    def __init__(self, chunk_rows: int | None = DEFAULT_CHUNK_ROWS) -> None:
        self.chunk_rows = chunk_rows
        self.buffer = RowBuffer(chunk_rows)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: ProbeModule) -> None:
        self.buffer.clear()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: ProbeModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        pl_module.updated_names = []
        if not outputs or "features" not in outputs:
            return
        features = outputs["features"]
        for name in sorted(pl_module.live):
            rows = features.get(pl_module.key(name))
            if rows is None or len(rows) == 0:
                continue
            pl_module.steps[name] += 1
            full = self.buffer.add(name, rows)
            max_steps = pl_module.configs[name].max_steps
            if full or (max_steps is not None and pl_module.steps[name] >= max_steps):
                self._update(pl_module, name)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: ProbeModule) -> None:
        self._flush(pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: ProbeModule) -> None:
        # Lightning validates at the end of a training epoch *before* on_train_epoch_end:
        # train on the rows still buffered first, so "val" scores the probes as they are.
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._flush(pl_module)

    def on_exception(
        self, trainer: L.Trainer, pl_module: ProbeModule, exception: BaseException
    ) -> None:
        # Interrupted mid-chunk: the buffered rows were paid for, so train on them (all
        # but a batch with non-finite rows, if that is what stopped the run).
        self._flush(pl_module, drop_failed=True)

    def _flush(self, pl_module: ProbeModule, drop_failed: bool = False) -> None:
        for name in self.buffer.names():
            if name in pl_module.live:
                self._update(pl_module, name, drop_failed)
        self.buffer.clear()

    def _update(self, pl_module: ProbeModule, name: str, drop_failed: bool = False) -> None:
        rows = self.buffer.take(name, drop_failed)
        if rows is not None:
            pl_module.probes[name].partial_fit(rows.X, rows.y)
            if name not in pl_module.updated_names:  # checked (and cleared) by early stopping
                pl_module.updated_names.append(name)


class ProbeEarlyStopping(Callback):
    """Per-probe early stopping on a fixed, seeded held-out slice of the training set.

    Probe ``p`` holds out the first ``round(test_size_p * n)`` rows of one seeded permutation
    of the training set, so probes with equal ``test_size`` share a slice. Those rows are
    traced once, before training, and never trained on by ``p``. A probe stops when its
    held-out log loss has not improved by ``threshold`` for ``patience`` steps (training
    batches; counted after ``warmup_steps``), or at ``max_steps``; it is scored whenever the
    updater hands it new rows. The run stops when every probe has stopped.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self.heldout: dict[str, Features] = {}
        self.best: dict[str, float] = {}
        self.best_step: dict[str, int] = {}
        self.prepared = False

    def on_train_start(self, trainer: L.Trainer, pl_module: ProbeModule) -> None:
        dataset = trainer.train_dataloader.dataset
        pl_module.validate_dataset(dataset, "training")
        if self.prepared:  # resumed from a checkpoint
            return
        seed = pl_module.seed if self.seed is None else self.seed
        n = len(dataset)
        sizes = {
            name: int(round(c.test_size * n)) if c.early_stopping else 0
            for name, c in pl_module.configs.items()
        }
        union = np.random.default_rng(seed).permutation(n)[: max(sizes.values())]
        if len(union):
            batch_size = getattr(trainer.train_dataloader, "batch_size", None) or 8
            sub = pl_module.extract_dataset(
                dataset.subset(union), list(pl_module.configs), batch_size
            )
            for key, rows in sub.items():  # subset rows back to training-set rows
                sub[key] = Features(rows.X, rows.y, union[rows.doc])
            for name, size in sizes.items():
                rows = sub[pl_module.key(name)]
                self.heldout[name] = rows.select_docs(union[:size])
                extra = rows.select_docs(union[size:])
                if len(extra.y):  # held out for other probes only: training data for this one
                    pl_module.probes[name].partial_fit(extra.X, extra.y)
        pl_module.heldout_index = torch.as_tensor(union, dtype=torch.long)
        self.best = dict.fromkeys(pl_module.configs, math.inf)
        self.best_step = dict.fromkeys(pl_module.configs, 0)
        self.prepared = True

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: ProbeModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._check(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: ProbeModule) -> None:
        self._check(trainer, pl_module, on_step=False)

    def _check(self, trainer: L.Trainer, pl_module: ProbeModule, on_step: bool = True) -> None:
        """Score the probes updated just now; retire those out of patience or steps."""
        for name in pl_module.updated_names:
            if name not in pl_module.live:
                continue
            config = pl_module.configs[name]
            probe = pl_module.probes[name]
            steps = pl_module.steps[name]
            heldout = self.heldout.get(name)
            if config.early_stopping and heldout is not None and len(heldout.y):
                loss = log_loss(heldout.y, probe.predict_proba(heldout.X), labels=probe.classes_)
                if trainer.loggers:
                    pl_module.log(
                        f"train/{name}/heldout_loss", loss, on_step=on_step, on_epoch=not on_step
                    )
                if loss < self.best[name] - config.threshold:
                    self.best[name], self.best_step[name] = loss, steps
                # patience counts the steps without improvement once warm-up is over
                waited = steps - max(self.best_step[name], config.warmup_steps)
                if steps > config.warmup_steps and waited >= config.patience:
                    log.info("Early stopping after %d steps for %s", steps, name)
                    pl_module.live.discard(name)
                    pl_module.stopped_early[name] = True
                    continue
            if config.max_steps is not None and steps >= config.max_steps:
                log.info("Reached max_steps=%d for %s", config.max_steps, name)
                pl_module.live.discard(name)
        pl_module.updated_names = []
        if not pl_module.live:
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {
            "heldout": {k: tuple(v) for k, v in self.heldout.items()},
            "best": self.best,
            "best_step": self.best_step,
            "prepared": self.prepared,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.heldout = {k: Features(*v) for k, v in state_dict["heldout"].items()}
        self.best, self.best_step = dict(state_dict["best"]), dict(state_dict["best_step"])
        self.prepared = state_dict["prepared"]


class ProbeMetrics(Callback):
    """Scores every probe on whole validation/test sets with torchmetrics.

    Rows are scored in chunks of ``chunk_rows`` per feature key (one ``predict_proba`` per
    probe per chunk, not per batch). Logs ``<stage>/<probe>/<metric>`` to every attached
    Lightning logger and keeps a pandas table per stage in ``tables`` (index = probe name).
    """

    def __init__(self, chunk_rows: int | None = DEFAULT_CHUNK_ROWS) -> None:
        self.chunk_rows = chunk_rows
        self.tables: dict[str, pd.DataFrame] = {}
        self._scores: dict[tuple[str, str], ProbeScores] = {}
        self._buffers: dict[str, RowBuffer] = {}

    def _update(self, stage: str, pl_module: ProbeModule, outputs: Any) -> None:
        if not outputs or "features" not in outputs:
            return
        buffer = self._buffers.setdefault(stage, RowBuffer(self.chunk_rows))
        for key, rows in outputs["features"].items():
            if len(rows) and buffer.add(key, rows):
                self._score(stage, pl_module, key, buffer.take(key))

    def _flush(self, stage: str, pl_module: ProbeModule, drop_failed: bool = False) -> None:
        buffer = self._buffers.pop(stage, None)
        for key in buffer.names() if buffer else []:
            self._score(stage, pl_module, key, buffer.take(key, drop_failed))

    def _score(self, stage: str, pl_module: ProbeModule, key: Any, rows: Features | None) -> None:
        if rows is None:
            return
        for name in pl_module.configs:
            probe = pl_module.probes[name]
            if pl_module.key(name) != key or not hasattr(probe, "n_features_in_"):
                continue
            scores = self._scores.get((stage, name))
            if scores is None:
                scores = self._scores[(stage, name)] = ProbeScores(probe.classes_)
            scores.update(rows.y, *probe.predict_with_proba(rows.X))

    def _table(self, stage: str, pl_module: ProbeModule, log_metrics: bool) -> pd.DataFrame:
        rows = {}
        for name in pl_module.configs:
            scores = self._scores.get((stage, name))
            row = dict.fromkeys(METRIC_COLUMNS, float("nan"))
            row["support"] = 0
            if scores is not None:
                row.update(scores.compute())
                if log_metrics:
                    for metric in METRIC_COLUMNS:
                        pl_module.log(f"{stage}/{name}/{metric}", row[metric], on_epoch=True)
            row["steps"] = pl_module.steps[name]
            row["stopped_early"] = bool(pl_module.stopped_early.get(name, False))
            rows[name] = row
        table = pd.DataFrame.from_dict(rows, orient="index")
        table.index.name = "probe"
        return table

    def _finish(self, stage: str, trainer: L.Trainer, pl_module: ProbeModule) -> None:
        self._flush(stage, pl_module)
        if not trainer.sanity_checking:
            self.tables[stage] = self._table(stage, pl_module, log_metrics=True)
        self._reset(stage)

    def partial_table(self, stage: str, pl_module: ProbeModule) -> pd.DataFrame:
        """The table so far: metrics of what ``stage`` scored before an interruption (NaN where
        nothing was), with every probe's steps."""
        self._flush(stage, pl_module, drop_failed=True)
        return self._table(stage, pl_module, log_metrics=False)

    def _reset(self, stage: str) -> None:
        self._buffers.pop(stage, None)
        for key in [k for k in self._scores if k[0] == stage]:
            del self._scores[key]

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._update("val", pl_module, outputs)

    def on_test_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._update("test", pl_module, outputs)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: ProbeModule) -> None:
        self._finish("val", trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: ProbeModule) -> None:
        self._finish("test", trainer, pl_module)
