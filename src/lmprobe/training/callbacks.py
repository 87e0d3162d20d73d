"""Callbacks: thin policies that say when the probe bank trains, stops and scores.

The state they act on lives in ``ProbeModule.bank`` (``lmprobe.bank.bank.ProbeBank``); each
callback only decides *when*, so their order in ``Trainer(callbacks=...)`` does not matter.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import pandas as pd
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from lmprobe.bank.bank import check_update_threads
from lmprobe.data.dataset import LengthGroupedBatches, ProbeDataset, loader_batch_size
from lmprobe.probes.config import DEFAULT_CHUNK_ROWS
from lmprobe.scoring.metrics import CLASSIFICATION_METRICS, REGRESSION_METRICS
from lmprobe.scoring.uncertainty import DEFAULT_RESAMPLES
from lmprobe.training.module import ProbeModule

log = logging.getLogger("lmprobe")

# the metrics sent to loggers (intervals and bookkeeping columns stay in metrics.csv)
LOGGED = {"loss", "auroc", *CLASSIFICATION_METRICS, *REGRESSION_METRICS}


def _features(outputs: Any) -> dict | None:
    return outputs.get("features") if isinstance(outputs, dict) else None


class ProbeUpdater(Callback):
    """Train the live probes on the training batches' features and stop the run once every
    probe has stopped. With length-grouped batches (``LengthGroupedBatches``, what
    ``ProbeDataModule`` gives) a probe trains on each whole group, in the group's random
    order, at the end of each length window (group by group); otherwise on ``chunk_rows``
    rows at a time (``None``: after every batch). A probe's *steps* count the training
    batches it consumed either way.

    ``train_through_test`` (set by ``lmprobe.training.engine.fit_and_test`` when a test pass
    follows): the run's last training, at the last batch of its last epoch, and the refit
    when training ends go to a worker thread (``ProbeBank.flush(background=True)``,
    ``ProbeBank.refit_all``) and run while the test set is traced; the bank waits for them
    before it scores (or anything reads the probes), so the numbers are the same. Nothing
    is decided from that work: the run's training has ended.

    ``train_while_tracing`` (one process): each length window that ends inside an epoch
    trains on the worker thread too, while the next window is traced; the batches traced
    meanwhile are applied once it ends (``ProbeBank.update``), so what is learned is the
    same. Only where some live probe cannot stop in that training (``ProbeBank.goes_on``),
    so the run ends at the same batch; the probes it stops ignore the rows traced for them
    meanwhile. False: every window trains before the next batch is traced.

    ``update_threads``: independent probes train at once on that many threads (None: one
    per core of the host but one, at most one per probe), with the results of one at a time
    (``ProbeBank._each``); 1 trains them one by one."""

    train_while_tracing = True  # (a class default: runs build their updater themselves)
    update_threads: int | None = None  # (likewise)

    def __init__(
        self,
        chunk_rows: int | None = DEFAULT_CHUNK_ROWS,
        train_while_tracing: bool | None = None,
        update_threads: int | None = None,
    ) -> None:
        self.chunk_rows = chunk_rows
        if train_while_tracing is not None:
            self.train_while_tracing = train_while_tracing
        if update_threads is not None:
            check_update_threads(update_threads)
            self.update_threads = update_threads
        self._groups: LengthGroupedBatches | None = None
        self.train_through_test = False

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: ProbeModule) -> None:
        # (not called for the epoch a run resumes in the middle of: see on_train_start)
        # MDL's online code is the first pass over the training data
        pl_module.bank.start_epoch(trainer.current_epoch)

    def on_train_start(self, trainer: L.Trainer, pl_module: ProbeModule) -> None:
        sampler = getattr(trainer.train_dataloader, "batch_sampler", None)
        self._groups = sampler if isinstance(sampler, LengthGroupedBatches) else None
        bank = pl_module.bank
        bank.set_update_threads(self.update_threads)
        groups = self._groups
        if groups is None:
            bank.set_row_order(None)
        else:
            bank.set_row_order(groups.order, groups.group_of, groups.group_batches)
        # Resumed mid-epoch: Lightning restarts the epoch's batches from the first one (and
        # calls no epoch-start hook), so skip those the bank already trained on; a count of
        # a whole epoch means that epoch had ended.
        if self._groups is not None and 0 < bank.epoch_batches < len(self._groups):
            self._groups.skip = bank.epoch_batches
        else:
            if self._groups is None and bank.epoch_batches:
                log.warning("resumed mid-epoch without lmprobe's batch sampler: not exact")
            bank.restart_epoch()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: ProbeModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        features = _features(outputs)
        position = pl_module.bank.next_batch()  # this batch's place in the epoch
        if features:  # grouped: buffer until the length window ends
            pl_module.bank.update(features, math.inf if self._groups else self.chunk_rows)
        groups = self._groups
        if groups and position in groups.window_ends:
            if self._in_background(pl_module) and self._last_batch_of_run(trainer, position):
                pl_module.bank.flush(background=True)
                return  # (and no stopping decision: the run ends after this batch)
            # a window inside the epoch trains while the next one is traced when the run
            # goes on past it whatever it decides (so it ends at the same batch)
            bank, within = pl_module.bank, position < len(groups) - 1
            in_one = self.train_while_tracing and pl_module.shards is None
            bank.flush(background=within and in_one and bank.goes_on())
        elif groups and groups.window > 1 and (position + 1) % groups.batches_per_group == 0:
            pl_module.bank.settle_buffered()  # a group's worth: off the device
        self._stop_when_done(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: ProbeModule) -> None:
        # Lightning validates at the end of a training epoch *before* on_train_epoch_end:
        # train on the rows still buffered first, so "val" scores the probes as they are.
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            pl_module.bank.flush()
            pl_module.sync_live()  # ranks: the probes that flush retired

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: ProbeModule) -> None:
        bank = pl_module.bank
        if bank.training_pending and not bank.batches_waiting:  # nothing is buffered
            return  # (the last batch's training, going on while the test set is traced)
        pl_module.bank.flush()
        self._stop_when_done(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: ProbeModule) -> None:
        # What the held-out slice chose is final: train the final probes on all the rows
        # (with a test pass to follow, on the worker thread while the test set is traced)
        pl_module.refit_probes(background=self._in_background(pl_module))
        pl_module.sync_bank()  # ranks: every probe's final state on every rank

    def on_exception(
        self, trainer: L.Trainer, pl_module: ProbeModule, exception: BaseException
    ) -> None:
        # Interrupted mid-chunk: the buffered rows were paid for, so train on them (all
        # but a batch with non-finite rows, if that is what stopped the run) for the
        # partial results; the checkpoint keeps the state from before, buffer included, so
        # a resumed run trains them as an uninterrupted one would.
        pl_module.bank.snapshot_for_resume()
        pl_module.bank.flush(drop_failed=True)

    def _in_background(self, pl_module: ProbeModule) -> bool:
        """Training may go on while the test set is traced: a test pass follows, and the
        run is one process (several exchange the probes' state when training ends)."""
        return self.train_through_test and pl_module.shards is None

    def _last_batch_of_run(self, trainer: L.Trainer, position: int) -> bool:
        """This batch ends the run's last epoch and no validation pass follows (it would
        score the probes first)."""
        groups, max_epochs = self._groups, trainer.max_epochs
        return (
            groups is not None
            and position == len(groups) - 1
            and max_epochs is not None
            and 0 <= max_epochs <= trainer.current_epoch + 1
            and not trainer.enable_validation
        )

    @staticmethod
    def _stop_when_done(trainer: L.Trainer, pl_module: ProbeModule) -> None:
        if pl_module.bank.training_running:
            return  # a window still trains on the worker: decided at a later batch's end
        pl_module.sync_live()  # ranks: one decision, taken from each probe's owner
        if pl_module.bank.done:
            trainer.should_stop = True


class ProbeEarlyStopping(Callback):
    """Per-probe early stopping on a fixed, seeded held-out slice of the training set.

    Probe ``p`` holds out the first ``round(heldout_size_p * n)`` rows of one seeded
    permutation of the training set, so probes with equal ``heldout_size`` share a slice.
    Those rows are traced once, before training, and never trained on by ``p``. The bank
    scores the slice after each update and retires a probe whose held-out loss has not
    improved by ``threshold`` for ``patience`` training batches (after ``warmup_steps``).
    This callback prepares the slice and logs the held-out losses.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._logged: dict[str, int] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: ProbeModule) -> None:
        # Before Lightning builds the training batches (after a resume's restore): tell
        # the datamodule which rows the slice takes, so no training batch holds them and
        # the model traces as many batches as documents need (none trimmed around it).
        datamodule = trainer.datamodule
        train_set = getattr(datamodule, "train_set", None)
        if train_set is None or not hasattr(datamodule, "heldout_rows"):
            return  # other loaders: training_step trims the slice's rows out of batches
        bank = pl_module.bank
        rows = bank.heldout_index if bank.prepared else bank.heldout_plan(len(train_set), self.seed)
        datamodule.heldout_rows = rows

    def on_train_start(self, trainer: L.Trainer, pl_module: ProbeModule) -> None:
        dataset = trainer.train_dataloader.dataset
        bank = pl_module.bank
        bank.check_dataset(dataset, "training")
        batch_size = loader_batch_size(trainer.train_dataloader)
        # The first length window is traced before any training: with the slice, sorted
        # by length together, they pad less than each on its own (lmprobe.tracing.ahead).
        sampler = getattr(trainer.train_dataloader, "batch_sampler", None)
        window, window_end = None, -1
        if isinstance(sampler, LengthGroupedBatches):  # (the same batches every epoch)
            window, window_end = sampler.first_window()
        if not bank.prepared:
            if trainer.current_epoch > 0:
                window, window_end = None, -1
            pl_module.prepare_heldout(dataset, batch_size, self.seed, window, window_end)
        elif (  # resumed in a run that traced the first window ahead (in its first epoch)
            (bank.epoch_batches > 0 or trainer.current_epoch > 0)
            and len(bank.heldout_index)
            and bank.live
            and pl_module.can_trace_ahead(window)
        ):
            # the same batches as the uninterrupted run traced, so the very same rows: for
            # the rest of the window, for later epochs and for the refit
            union, names = bank.heldout_index, pl_module.kept_names(sorted(bank.live))
            pl_module.trace_ahead(dataset, batch_size, union, window, window_end, names)
            # the window's batches trained on before the interruption: later epochs (and
            # the refit) replay their rows
            for position in range(min(bank.epoch_batches, window_end + 1)):
                pl_module.keep_ahead(position, sampler.batch(position))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: ProbeModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._log_losses(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: ProbeModule) -> None:
        self._log_losses(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: ProbeModule) -> None:
        # Several processes: the curves of probes other ranks trained reached rank 0 (the
        # one that logs) at the end of training (a no-op in one process: all logged)
        self._log_losses(trainer, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: ProbeModule) -> None:
        # the losses of the run's last training, if it ran while the test set was traced
        self._log_losses(trainer, pl_module)

    def _log_losses(self, trainer: L.Trainer, pl_module: ProbeModule) -> None:
        """Each new held-out loss, at the probe's own step: a curve per probe. (Straight to
        the loggers: Lightning's ``self.log`` steps with optimizer steps, and there are none.)
        Not while the bank trains in the background: its curves are still growing."""
        if pl_module.bank.training_pending:
            return
        for name, history in pl_module.bank.history.items():
            for step, loss in history[self._logged.get(name, 0) :]:
                for logger in trainer.loggers:
                    logger.log_metrics({f"train/{name}/heldout_loss": loss}, step=step)
            self._logged[name] = len(history)


class ProbeMetrics(Callback):
    """Scores every probe on whole validation/test sets, ``chunk_rows`` rows per feature key
    at a time, and logs ``<stage>/<probe>/<metric>`` to every attached Lightning logger. The
    tables (index = probe name) are kept in ``ProbeModule.bank.tables``. The test table
    gets 95% bootstrap intervals and ``p_vs_best`` from ``bootstrap`` resamples (0: none)."""

    def __init__(
        self, chunk_rows: int | None = DEFAULT_CHUNK_ROWS, bootstrap: int = DEFAULT_RESAMPLES
    ) -> None:
        self.chunk_rows = chunk_rows
        self.bootstrap = bootstrap

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._add("val", pl_module, outputs)

    def on_test_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._add("test", pl_module, outputs)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: ProbeModule) -> None:
        # The bootstrap's resamples are drawn on a worker thread while the test set is
        # traced; a pooled probe scores one row per test document. (One process only: with
        # several, each traces its own share.)
        loader = trainer.test_dataloaders
        dataset = getattr(loader, "dataset", None)
        if self.bootstrap and pl_module.shards is None and _documents_are_rows(dataset):
            pl_module.bank.draw_resamples(len(dataset), self.bootstrap)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: ProbeModule) -> None:
        self._finish("val", trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: ProbeModule) -> None:
        self._finish("test", trainer, pl_module)

    def _add(self, stage: str, pl_module: ProbeModule, outputs: Any) -> None:
        features = _features(outputs)
        if features:
            pl_module.bank.score(stage, features, self.chunk_rows)

    def _finish(self, stage: str, trainer: L.Trainer, pl_module: ProbeModule) -> None:
        resamples = self.bootstrap if stage == "test" else 0
        pl_module.bank.flush_scoring(stage)
        pl_module.sync_scores(stage)  # ranks: every probe's scores, from its owner
        table = pl_module.bank.finish_scoring(stage, n_resamples=resamples)
        if trainer.sanity_checking:
            return
        pl_module.bank.keep_table(stage, table)
        if not trainer.loggers:
            return
        scalars = {
            f"{stage}/{name}/{metric}": float(value)
            for name, row in table.iterrows()
            for metric, value in row.items()
            if metric in LOGGED and pd.notna(value)
        }
        for logger in trainer.loggers:  # one call per logger (self.log costs ~1 ms a value)
            logger.log_metrics(scalars, step=trainer.current_epoch)


def _documents_are_rows(dataset: Any) -> bool:
    """Whether a pooled probe scores one row per document of ``dataset`` (a
    ``ProbeDataset`` with a label per document; token- and word-level data give a row per
    token or word)."""
    return isinstance(dataset, ProbeDataset) and not dataset.token_level
