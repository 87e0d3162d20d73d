"""Callbacks that train, stop and score the probe bank from the features a step returns."""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
import torchmetrics
from lightning.pytorch.callbacks import Callback
from sklearn.metrics import log_loss

from lmprobe.features import Features
from lmprobe.module import ProbeModule

log = logging.getLogger("lmprobe")

METRIC_COLUMNS = ("loss", "accuracy", "precision", "recall", "f1", "matthews")


class ProbeUpdater(Callback):
    """``partial_fit`` every live probe on the features of each training batch."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: ProbeModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        pl_module.updated_names = []
        if not outputs or "features" not in outputs:
            return
        features = outputs["features"]
        for name in sorted(pl_module.live):
            rows = features.get(pl_module.key(name))
            if rows is None or len(rows.y) == 0:
                continue
            pl_module.probes[name].partial_fit(rows.X, rows.y)
            pl_module.updated_names.append(name)


class ProbeEarlyStopping(Callback):
    """Per-probe early stopping on a fixed, seeded held-out slice of the training set.

    Probe ``p`` holds out the first ``round(test_size_p * n)`` rows of one seeded permutation
    of the training set, so probes with equal ``test_size`` share a slice. Those rows are
    traced once, before training, and never trained on by ``p``. A probe stops when its
    held-out log loss has not improved by ``threshold`` for ``patience`` updates (after
    ``warmup_steps``), or at ``max_steps``; the run stops when every probe has.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self.heldout: dict[str, Features] = {}
        self.best: dict[str, float] = {}
        self.wait: dict[str, int] = {}
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
        self.best = {name: math.inf for name in pl_module.configs}
        self.wait = {name: 0 for name in pl_module.configs}
        self.prepared = True

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: ProbeModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for name in pl_module.updated_names:
            config = pl_module.configs[name]
            probe = pl_module.probes[name]
            steps = probe.n_updates_
            heldout = self.heldout.get(name)
            if config.early_stopping and heldout is not None and len(heldout.y):
                loss = log_loss(heldout.y, probe.predict_proba(heldout.X), labels=probe.classes_)
                if trainer.loggers:
                    pl_module.log(f"train/{name}/heldout_loss", loss, on_step=True)
                if loss < self.best[name] - config.threshold:
                    self.best[name], self.wait[name] = loss, 0
                elif steps > config.warmup_steps:
                    self.wait[name] += 1
                if steps > config.warmup_steps and self.wait[name] >= config.patience:
                    log.info("Early stopping after %d steps for %s", steps, name)
                    pl_module.live.discard(name)
                    pl_module.stopped_early[name] = True
                    continue
            if config.max_steps is not None and steps >= config.max_steps:
                log.info("Reached max_steps=%d for %s", config.max_steps, name)
                pl_module.live.discard(name)
        if not pl_module.live:
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {
            "heldout": {k: tuple(v) for k, v in self.heldout.items()},
            "best": self.best,
            "wait": self.wait,
            "prepared": self.prepared,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.heldout = {k: Features(*v) for k, v in state_dict["heldout"].items()}
        self.best, self.wait = dict(state_dict["best"]), dict(state_dict["wait"])
        self.prepared = state_dict["prepared"]


def _metric_collection(n_classes: int) -> torchmetrics.MetricCollection:
    from torchmetrics import classification as tc

    return torchmetrics.MetricCollection(
        {
            "accuracy": tc.MulticlassAccuracy(n_classes, average="micro"),
            "precision": tc.MulticlassPrecision(n_classes, average="macro"),
            "recall": tc.MulticlassRecall(n_classes, average="macro"),
            "f1": tc.MulticlassF1Score(n_classes, average="macro"),
            "matthews": tc.MulticlassMatthewsCorrCoef(n_classes),
        }
    )


class ProbeMetrics(Callback):
    """Scores every probe on whole validation/test sets with torchmetrics.

    Logs ``<stage>/<probe>/<metric>`` to every attached Lightning logger and keeps a pandas
    table per stage in ``tables`` (index = probe name).
    """

    def __init__(self) -> None:
        self.tables: dict[str, pd.DataFrame] = {}
        self._metrics: dict[tuple[str, str], torchmetrics.MetricCollection] = {}
        self._loss: dict[tuple[str, str], list[float]] = {}

    def _update(self, stage: str, pl_module: ProbeModule, outputs: Any) -> None:
        if not outputs or "features" not in outputs:
            return
        for name in pl_module.configs:
            probe = pl_module.probes[name]
            rows = outputs["features"].get(pl_module.key(name))
            if rows is None or len(rows.y) == 0 or not hasattr(probe, "n_features_in_"):
                continue
            proba = probe.predict_proba(rows.X)
            target = probe.class_index(rows.y)
            metrics = self._metrics.get((stage, name))
            if metrics is None:
                metrics = self._metrics[(stage, name)] = _metric_collection(len(probe.classes_))
            metrics.update(torch.from_numpy(proba.argmax(1)), torch.from_numpy(target))
            total = log_loss(rows.y, proba, labels=probe.classes_, normalize=False)
            sums = self._loss.setdefault((stage, name), [0.0, 0])
            sums[0] += float(total)
            sums[1] += len(rows.y)

    def _table(self, stage: str, pl_module: ProbeModule, log_metrics: bool) -> pd.DataFrame:
        rows = {}
        for name in pl_module.configs:
            metrics = self._metrics.get((stage, name))
            row = dict.fromkeys(METRIC_COLUMNS, float("nan"))
            row["support"] = 0
            if metrics is not None:
                row.update({k: float(v) for k, v in metrics.compute().items()})
                total, count = self._loss[(stage, name)]
                row["loss"], row["support"] = total / count, count
                if log_metrics:
                    for metric in METRIC_COLUMNS:
                        pl_module.log(f"{stage}/{name}/{metric}", row[metric], on_epoch=True)
            row["steps"] = getattr(pl_module.probes[name], "n_updates_", 0)
            row["stopped_early"] = bool(pl_module.stopped_early.get(name, False))
            rows[name] = row
        table = pd.DataFrame.from_dict(rows, orient="index")
        table.index.name = "probe"
        return table

    def _finish(self, stage: str, trainer: L.Trainer, pl_module: ProbeModule) -> None:
        if not trainer.sanity_checking:
            self.tables[stage] = self._table(stage, pl_module, log_metrics=True)
        self._reset(stage)

    def partial_table(self, stage: str, pl_module: ProbeModule) -> pd.DataFrame:
        """The table so far: metrics of what ``stage`` scored before an interruption (NaN where
        nothing was), with every probe's steps."""
        return self._table(stage, pl_module, log_metrics=False)

    def _reset(self, stage: str) -> None:
        for key in [k for k in self._metrics if k[0] == stage]:
            del self._metrics[key]
            self._loss.pop(key, None)

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
