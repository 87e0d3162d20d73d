"""``ProbeBank``: the probes of a run and their training state, in plain Python.

The bank holds the probes, which of them still train, their step counts, their
early-stopping bests and held-out slice, the rows waiting to be trained on or scored, and the
score tables. The Lightning module hands it features; the callbacks call its methods to
update, stop and score. Its parts, one module each: ``control`` (control tasks),
``stopping`` (held-out plan, early stopping), ``worker`` (the worker thread and the rule for
when its results are visible), ``refit`` (refit and code length), ``scoring`` (metrics,
bootstrap, tables), ``checkpoint`` (state_dict, fingerprint), ``record`` (``ProbeRecord``:
one probe's state, one record per probe) and ``state`` (the records' read-only views, DDP
sync). A checkpoint holds ``state_dict()``: tensors and plain values only, loadable with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
import torch

from lmprobe.bank.checkpoint import Checkpoints
from lmprobe.bank.control import ControlTasks
from lmprobe.bank.refit import Refitting
from lmprobe.bank.rows import RowBuffer, checked_rows
from lmprobe.bank.scoring import Scoring
from lmprobe.bank.state import ProbeState
from lmprobe.bank.stopping import EarlyStopping
from lmprobe.bank.worker import BackgroundJob, Worker
from lmprobe.errors import LmProbeError, plain
from lmprobe.probes.base import (
    resolve_probe_kind,
)
from lmprobe.probes.config import ProbeConfig
from lmprobe.scoring.metrics import column_of
from lmprobe.tracing.features import FeatureKey, Features, PendingFeatures, settle

log = logging.getLogger("lmprobe")


def check_update_threads(value: Any) -> None:
    """``update_threads`` is ``None`` (``default_update_threads``) or a whole number >= 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise LmProbeError(
            f"update_threads={value!r}: use a whole number >= 1 (threads training probes at "
            f"once) or null (one per core but one)"
        )


def default_update_threads() -> int:
    """One thread per core this process may run on but one, left to the thread that
    traces the model (on a 2-core machine the probes train one at a time, as the worker
    thread already trains them beside the traces), and at least one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # (not on every platform)
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


class ProbeBank(ProbeState, ControlTasks, EarlyStopping, Worker, Refitting, Scoring, Checkpoints):
    """The probes of one run, keyed by probe name (see the module docstring)."""

    def __init__(self, configs: Sequence[ProbeConfig], seed: int = 0) -> None:
        configs = list(configs)
        if not configs:
            raise LmProbeError("no probes configured; pass at least one ProbeConfig")
        names = [c.name for c in configs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise LmProbeError(
                f"probe name {duplicates[0]!r} is used twice; give each ProbeConfig a "
                f"distinct name= (e.g. '{duplicates[0]}/last'; in the app, probes.names)"
            )
        for config in configs:
            resolve_probe_kind(config.kind)  # an unknown kind fails before any model work
        self.configs: dict[str, ProbeConfig] = {}
        # Control twins (Hewitt & Liang, 2019): trained like their probe, on the same
        # features, with the control task's labels; their numbers go to the probe's row.
        self.control_of: dict[str, str] = {}
        for config in configs:
            self.configs[config.name] = config
            if config.control:
                if resolve_probe_kind(config.kind).task != "classification":
                    raise LmProbeError(
                        f"probe {config.name!r}: control tasks are for classifier probes; "
                        f"set control=false for kind {config.kind!r}"
                    )
                twin = dataclasses.replace(config, name=f"{config.name}/control", control=False)
                self.configs[twin.name] = twin
                self.control_of[twin.name] = config.name
        self.seed = seed
        # Threads training independent probes at once (``_each``; None:
        # ``default_update_threads``).
        # scikit-learn's SGD loop releases the GIL, and each probe's result is the same.
        self.update_threads: int | None = None
        self._control_table: np.ndarray | None = None
        # Training handed to a worker thread (``flush(background=True)``), if any: every
        # method that reads or changes the probes' state waits for it first (``wait``).
        self._pending: BackgroundJob | None = None
        self._pending_rows = False  # it has rows for some probe (so one will be fitted)
        # While it runs: the probes live when it began (what training batches are traced
        # for) and the training batches' updates that came meanwhile, applied in order
        # once it has ended (``update``, ``wait``)
        self._live_before: list[str] | None = None
        self._deferred: list[tuple[dict[FeatureKey, PendingFeatures], float | None]] = []
        # The test bootstrap's resamples drawn ahead on a worker thread (``draw_resamples``):
        # (rows, resamples, seed, the job, its result).
        self._drawn: tuple[int, int, int, BackgroundJob, list[np.ndarray]] | None = None
        self.reset()

    def reset(self) -> None:
        """Fresh, unfitted probes (a new fit starts from here), in the same probe objects
        (``_fresh_records``)."""
        self.wait()
        self._fresh_records(keep=getattr(self, "_records", None))
        # Rows of the training set held out for early stopping: never traced as training data.
        self.heldout_index = np.empty(0, dtype=np.int64)
        self.prepared = False
        self.tables: dict[str, pd.DataFrame] = {}
        self.class_tables: dict[str, pd.DataFrame] = {}  # per-class metrics of each pass
        # The first epoch counts each probe's training classes (the majority baseline).
        self.online_pass = True
        self._train_rows = RowBuffer()
        # Training batches consumed in the current epoch (a resumed run skips them).
        self.epoch_batches = 0
        self.resumed = False  # loaded from a checkpoint
        # What the run's results depend on (data, probes, labels): a checkpoint of another
        # run is refused before any work (``check_resume``).
        self.fingerprint: dict[str, str] = {}
        # The state to checkpoint when a run is interrupted: taken before the buffered rows
        # are trained on for the partial results, so a resumed run trains them as an
        # uninterrupted run would (``snapshot_for_resume``).
        self._resume_state: dict[str, Any] | None = None
        # Rank of each training document in the order probes must see rows (None: as fed).
        self.row_rank: np.ndarray | None = None
        # Length windows (``LengthGroupedBatches``): each training document's group and
        # each group's batch count; a buffer spanning groups trains group by group.
        self.group_of: np.ndarray | None = None
        self.group_batches: np.ndarray | None = None
        self._score_rows: dict[str, RowBuffer] = {}
        self._scores: dict[tuple[str, str], Any] = {}

    # --------------------------------------------------------------- features
    def key(self, name: str) -> FeatureKey:
        return FeatureKey.of(self.configs[name], control=name in self.control_of)

    @property
    def probe_names(self) -> list[str]:
        """The user's probes (control twins left out)."""
        return [name for name in self.configs if name not in self.control_of]

    # ------------------------------------------------------------ control tasks

    def keys_for(self, names: Sequence[str]) -> list[FeatureKey]:
        return list(dict.fromkeys(self.key(n) for n in names))

    @property
    def done(self) -> bool:
        """Every probe has stopped training."""
        self.wait()
        return not self.live

    def goes_on(self) -> bool:
        """Some live probe cannot stop while training on the rows buffered now, whatever
        its held-out losses: the run goes on past that training, so nothing waits for its
        decisions (``ProbeUpdater`` trains such a window on the worker thread). A probe's
        step count is already the window's end; patience can run out only if that end is
        ``patience`` steps past its best step so far (which can only move later)."""
        self.wait()  # (an earlier window's training, and the batches waiting for it)
        for name in self.live:
            config, end = self.configs[name], self._records[name].steps
            if config.max_steps is not None and end >= config.max_steps:
                continue
            if not self._stops_early(name):
                return True
            waited = end - max(self._records[name].best_step, config.warmup_steps)
            if end <= config.warmup_steps or waited < config.patience:
                return True
        return False

    def live_names(self) -> list[str]:
        """The probes a training batch is traced for: the live ones, or, while a length
        window's training runs on the worker thread, those live when it began (a superset:
        the rows of a probe it stops are dropped when the batch's update is applied)."""
        if self._live_before is not None:
            return self._live_before
        return sorted(self.live)

    # ------------------------------------------------------ background training

    def check_labels(self, labels: torch.Tensor, names: Sequence[str]) -> None:
        for name in names:
            config = self.configs[name]
            if config.token_level and labels.dim() != 2:
                raise LmProbeError(
                    f"probe {name!r} has pooling='none' (one label per token) but the data has "
                    f"one label per sequence; use pooling='mean' or token-level labels"
                )
            if not config.token_level and labels.dim() != 1:
                raise LmProbeError(
                    f"probe {name!r} pools to one vector per sequence (pooling="
                    f"{config.pooling!r}) but the data has one label per token; use pooling='none'"
                )

    def check_dataset(self, dataset: Any, split: str) -> None:
        """Label checks over a whole split, before any model work."""
        self.check_labels(dataset.labels[:1], list(self.configs))
        for name, config in self.configs.items():
            kind = resolve_probe_kind(config.kind)
            present = np.unique(dataset.label_values(config.null_label))
            if len(present) == 0:
                raise LmProbeError(f"the {split} split has no labelled rows for probe {name!r}")
            if not kind.needs_classes:
                continue
            if dataset.labels.is_floating_point() and not np.all(present == np.round(present)):
                raise LmProbeError(
                    f"{split} labels of probe {name!r} are continuous (e.g. {present[0].item()!r}) but "
                    f"its kind {config.kind!r} is a classifier; use kind='sgd_regressor'"
                )
            unknown = [v for v in present.tolist() if v not in set(config.classes)]
            if unknown:
                raise LmProbeError(
                    f"{split} label {unknown[0]!r} is not in classes {plain(config.classes)} of probe "
                    f"{name!r}; add it to classes"
                    + (" or set null_label" if config.token_level else "")
                )
            if len(present) < 2:
                log.warning(
                    "the %s split has a single class (%s) for probe %r: its metrics are degenerate",
                    split,
                    present[0],
                    name,
                )

    # ------------------------------------------------------------ early stopping

    # ----------------------------------------------------------------- training
    def update(
        self, features: dict[FeatureKey, PendingFeatures], chunk_rows: int | None
    ) -> list[str]:
        """One training batch: count a step for every live probe with rows, train those
        whose chunk is full (or that reach ``max_steps``). Returns the probes trained.

        While a window's training runs on the worker thread, the batch waits (its rows
        kept as they are) and is applied when that training ends (``wait``), with the
        probes it left live: what is learned is the same, and tracing goes on meanwhile.
        Returns [] then."""
        if self._live_before is not None and self.training_running:
            self._deferred.append((features, chunk_rows))
            return []
        self.wait()
        due = []
        for name in sorted(self.live):
            rows = features.get(self.key(name))
            if rows is None or len(rows) == 0:
                continue
            record = self._records[name]
            record.steps += 1
            record.steps_buffered += 1
            full = self._train_rows.add(name, rows, chunk_rows)
            max_steps = self.configs[name].max_steps
            if full or (max_steps is not None and record.steps >= max_steps):
                due.append(name)
        return self._train_names(due)

    def flush(self, drop_failed: bool = False, background: bool = False) -> list[str]:
        """Train every live probe on its buffered rows (end of epoch, before validation,
        on an interruption: ``drop_failed`` then leaves out batches with non-finite rows).

        ``background``: the rows are taken off the buffer (and checked) here, and the
        training runs on a worker thread while the caller goes on (the last training of a
        run, while the test set is traced); every method that reads or changes the probes'
        state waits for it (``wait``), so what is learned is the same. Returns the probes
        given rows (trained, or training)."""
        self.wait()
        names = [name for name in self._train_rows.names() if self._records[name].live]
        if background and not drop_failed:
            self._train_rows.settle()  # every row reaches the host and is checked here
            background = not self._train_rows.failed()  # non-finite: raise as always
        else:
            background = False
        if not background:
            trained = self._train_names(names, drop_failed)
            self._train_rows.clear()
            return trained
        taken = [(name, *self._take(name)) for name in names]
        self._train_rows.clear()

        def train() -> None:
            self._each(self._train_on, taken)

        self._pending_rows = any(rows is not None for _, rows, _ in taken)
        self._live_before = sorted(self.live)
        self._pending = BackgroundJob(train)
        return [name for name, rows, _ in taken if rows is not None]

    # ------------------------------------------------------------ the epochs
    def start_epoch(self, epoch: int) -> None:
        """A training epoch begins (the first one is the online pass: its classes are
        counted for the majority baseline)."""
        self.online_pass = epoch == 0
        self.epoch_batches = 0

    def restart_epoch(self) -> None:
        """The epoch's batches are counted from the first again."""
        self.epoch_batches = 0

    def next_batch(self) -> int:
        """Count one more training batch of the epoch; returns its place in the epoch."""
        self.epoch_batches += 1
        return self.epoch_batches - 1

    def set_update_threads(self, threads: int | None) -> None:
        """Probes trained at once (None: ``default_update_threads``)."""
        self.update_threads = threads

    def set_fingerprint(self, dataset: Any) -> None:
        """What a checkpoint of this run is checked against (``fingerprint_of``)."""
        self.fingerprint = self.fingerprint_of(dataset)

    def settle_buffered(self) -> None:
        """Move the buffered training rows to the host now (between a length window's
        groups: a window buffers several groups' rows, and on a GPU they would otherwise all
        wait in device memory; one copy per group, as without a window), and those of the
        batches waiting for the worker's training (``update``)."""
        self._train_rows.settle()
        settle([part for features, _ in self._deferred for part in features.values()])

    def set_row_order(
        self,
        order: np.ndarray | None,
        group_of: np.ndarray | None = None,
        group_batches: np.ndarray | None = None,
    ) -> None:
        """Train every chunk in this order of training documents (``order[i]`` is the i-th
        document), whatever order the batches were traced in (length-grouped batches).
        ``group_of``/``group_batches``: each document's group and each group's batch count
        (``LengthGroupedBatches``): rows of several groups train one group at a time."""
        self.wait()
        self.row_rank = None
        if order is not None:
            self.row_rank = np.empty(len(order), dtype=np.int64)
            self.row_rank[order] = np.arange(len(order))
        self.group_of, self.group_batches = group_of, group_batches

    def _train_names(self, names: Sequence[str], drop_failed: bool = False) -> list[str]:
        """Train each probe of ``names`` on its buffered rows (``_each``). Their rows reach
        the host here, one copy per device (probes of one site share them), then each probe
        gathers its own as it starts, so no more are gathered at once than there are
        threads. Returns the probes trained."""
        self._train_rows.settle(names)

        def train(name: str) -> bool:
            return self._train_on(name, *self._take(name, drop_failed))

        done = self._each(train, [(name,) for name in names])
        return [name for name, trained in zip(names, done, strict=True) if trained]

    def _each(self, job: Callable[..., Any], items: Sequence[tuple]) -> list[Any]:
        """``job(*item)`` for every item, each item a different probe's work, on up to
        ``update_threads`` threads (one: in order, here). Probes share no training state and
        scikit-learn's SGD loop releases the GIL, so independent probes train on the host's
        cores at once with the results of one by one. Returns the results in order; every
        job runs, whatever the threads, then the first error (in order) is raised."""

        def outcome(*item: Any) -> tuple[Any, Exception | None]:
            try:
                return job(*item), None
            except Exception as error:  # noqa: BLE001 - raised below, after every job
                return None, error

        threads = min(self.update_threads or default_update_threads(), len(items))
        if threads <= 1:
            outcomes = [outcome(*item) for item in items]
        else:
            with ThreadPoolExecutor(threads, thread_name_prefix="lmprobe-probes") as pool:
                futures = [pool.submit(outcome, *item) for item in items]
            outcomes = [future.result() for future in futures]
        for _, error in outcomes:
            if error is not None:
                raise error
        return [result for result, _ in outcomes]

    def _take(self, name: str, drop_failed: bool = False) -> tuple[Features | None, int]:
        """A probe's buffered rows (on the host, checked) and the steps they count."""
        rows, record = self._train_rows.take(name, drop_failed), self._records[name]
        buffered, record.steps_buffered = record.steps_buffered, 0
        return rows, buffered

    def _train_on(self, name: str, rows: Features | None, buffered: int) -> bool:
        if rows is None:
            return False
        if self.row_rank is not None:  # stable: a document's tokens keep their order
            order = np.argsort(self.row_rank[rows.doc], kind="stable")
            rows = Features(rows.X[order], rows.y[order], rows.doc[order])
        record = self._records[name]
        end = record.steps
        with checked_rows():
            for group, clock in self._by_group(rows, end - buffered, end):
                if not record.live:  # it stopped on an earlier group of the window
                    break
                record.steps = clock
                self._fit(name, group.X, group.y)
                self._check_stopping(name)
        return True

    def _by_group(self, rows: Features, start: int, end: int) -> list[tuple[Features, int]]:
        """Rows in the random order, split by group where they span several (a length
        window), each with the probe's step count at the group's end, as if the groups had
        come one by one: ``start`` (its count before these rows) plus the batch counts of
        the groups up to it; the last ends at ``end``, the probe's count now."""
        if self.group_of is None or self.group_batches is None:
            return [(rows, end)]
        groups = self.group_of[rows.doc]
        cuts = np.flatnonzero(np.diff(groups)) + 1
        if not len(cuts) or groups.min() < 0:  # one group (or rows of no group: as fed)
            return [(rows, end)]
        bounds = np.r_[0, cuts, len(groups)]
        parts, clock = [], start
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            clock += int(self.group_batches[groups[lo]])
            part = Features(rows.X[lo:hi], rows.y[lo:hi], rows.doc[lo:hi])
            parts.append((part, min(clock, end)))
        parts[-1] = (parts[-1][0], end)
        return parts

    def _fit(self, name: str, X: np.ndarray, y: np.ndarray) -> None:
        """``partial_fit`` one block of rows; in the first epoch also count its classes (the
        majority baseline's training counts)."""
        record = self._records[name]
        probe = record.probe
        classes = getattr(probe, "classes_", None)
        if classes is None and probe.task == "classification":
            classes = np.unique(np.asarray(self.configs[name].classes))
        if self.online_pass and classes is not None:
            counts = np.bincount(column_of(np.asarray(classes), y), minlength=len(classes))
            before = record.class_counts
            record.class_counts = before + counts if len(before) else counts
        probe.partial_fit(X, y)

    # ------------------------------------------------------------------- refit

    # ------------------------------------------------------------------ scoring

    # -------------------------------------------------------------- checkpoints
