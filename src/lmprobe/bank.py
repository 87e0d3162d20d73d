"""``ProbeBank``: the probes of a run and all of their training state, in plain Python.

Like Padim's memory bank in anomalib, the estimator state has one owner: the bank holds the
probes, which of them still train, their step counts, their early-stopping bests and
held-out slice, the rows waiting to be trained on or scored, and the score tables. The
Lightning module hands it features; the callbacks say when to update, stop and score. A
checkpoint holds ``state_dict()``: tensors and plain values only, loadable with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn import config_context

from lmprobe.config import ProbeConfig
from lmprobe.errors import LmProbeError, plain
from lmprobe.features import FeatureKey, Features, PendingFeatures, gather, settle
from lmprobe.io import probe_from_tensors, probe_to_tensors
from lmprobe.metrics import column_of, metric_columns, row_log_loss
from lmprobe.probes import Probe, make_probe, resolve_probe_kind
from lmprobe.uncertainty import MAX_KEPT_DRAWS, bootstrap, paired_p_values, resample_counts

log = logging.getLogger("lmprobe")

DEFAULT_CHUNK_ROWS = 256
# The online code's block boundaries, as fractions of the training rows (Voita & Titov,
# 2020), and the seed stream of the rows' order for it.
MDL_FRACTIONS = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.0625, 0.125, 0.25, 0.5, 1.0)
MDL_STREAM = 2020
# Rows per update of a refit (``ProbeBank.refit``): part of what a refit is, like its step
# schedule (each update of a classifier probe sets its step), not a setting, so no knob
# described as call overhead (``chunk_rows``) changes a refitted probe.
REFIT_ROWS = 256


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


def _checked_rows() -> Any:
    """Rows reach the bank checked finite (``PendingFeatures`` checks every row when it
    reaches the host), so scikit-learn's own check of every call is skipped: about a tenth
    of the probes' update time on the CPU benchmark."""
    return config_context(assume_finite=True)


def _to_tensors(rows: Features) -> dict[str, torch.Tensor]:
    """Feature rows as checkpoint tensors (held-out slices, buffered training rows)."""
    return {f: torch.from_numpy(np.asarray(getattr(rows, f))) for f in Features._fields}


def _from_tensors(tensors: dict[str, torch.Tensor]) -> Features:
    return Features(*(tensors[f].numpy() for f in Features._fields))


class RowBuffer:
    """Collects feature rows per name until ``chunk_rows`` are there (``None``: every batch).

    scikit-learn's ``partial_fit`` and ``predict_proba`` cost about a millisecond per call
    whatever the size of the call, and SGD updates per sample anyway: handing probes larger
    chunks removes call overhead without changing the maths (beyond SGD's in-call shuffle).
    On a GPU it also means one device-to-host copy, one wait, per chunk instead of per batch.
    """

    def __init__(self) -> None:
        self.parts: dict[Any, list[PendingFeatures]] = {}
        self.rows: dict[Any, int] = {}

    def add(self, name: Any, features: PendingFeatures, chunk_rows: int | None) -> bool:
        """Buffer ``features``; True when ``name`` has a full chunk."""
        self.parts.setdefault(name, []).append(features)
        self.rows[name] = self.rows.get(name, 0) + len(features)
        return chunk_rows is None or self.rows[name] >= chunk_rows

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

    def settle(self, names: Sequence[Any] | None = None) -> None:
        """Bring every buffered part (of ``names``; None: all) still on a device to the host
        (one copy per device; on the CPU one copy of the rows, so what a GPU run does is
        what the tests see)."""
        names = self.parts if names is None else names
        settle([part for name in names for part in self.parts.get(name, [])])

    def failed(self) -> bool:
        """Some settled part has non-finite rows (``take`` would raise for it)."""
        return any(p._error is not None for parts in self.parts.values() for p in parts)

    def clear(self) -> None:
        self.parts.clear()
        self.rows.clear()


class _Background:
    """One job on a worker thread; ``result()`` joins it and raises what it raised."""

    def __init__(self, job: Callable[[], Any]) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(job,), name="lmprobe-bank")
        self._thread.daemon = True  # an abandoned job never keeps the interpreter alive
        self._thread.start()

    def _run(self, job: Callable[[], Any]) -> None:
        try:
            job()
        except BaseException as error:  # noqa: BLE001 - handed to whoever waits
            self._error = error

    def result(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error

    def join(self) -> None:
        """Wait for the job without raising what it raised (whoever waits with ``result``
        sees that)."""
        self._thread.join()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()


class ProbeBank:
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
        self._pending: _Background | None = None
        self._pending_rows = False  # it has rows for some probe (so one will be fitted)
        # While it runs: the probes live when it began (what training batches are traced
        # for) and the training batches' updates that came meanwhile, applied in order
        # once it has ended (``update``, ``wait``)
        self._live_before: list[str] | None = None
        self._deferred: list[tuple[dict[FeatureKey, PendingFeatures], float | None]] = []
        # The test bootstrap's resamples drawn ahead on a worker thread (``draw_resamples``):
        # (rows, resamples, seed, the job, its result).
        self._drawn: tuple[int, int, int, _Background, list[np.ndarray]] | None = None
        self.reset()

    def reset(self) -> None:
        """Fresh, unfitted probes (a new fit starts from here)."""
        self.wait()
        self.probes: dict[str, Probe] = {
            name: make_probe(c, self.seed) for name, c in self.configs.items()
        }
        self.live: set[str] = set(self.configs)
        self.stopped_early: dict[str, bool] = dict.fromkeys(self.configs, False)
        # Training batches each probe has consumed (its early-stopping clock).
        self.steps: dict[str, int] = dict.fromkeys(self.configs, 0)
        self.best_loss: dict[str, float] = dict.fromkeys(self.configs, math.inf)
        self.best_step: dict[str, int] = dict.fromkeys(self.configs, 0)
        # (step, held-out loss) after every update of a probe that stops early.
        self.history: dict[str, list[tuple[int, float]]] = {n: [] for n in self.configs}
        # Rows of the training set held out for early stopping: never traced as training data.
        self.heldout_index = np.empty(0, dtype=np.int64)
        self.heldout: dict[str, Features] = {}
        self.prepared = False
        self.tables: dict[str, pd.DataFrame] = {}
        self.class_tables: dict[str, pd.DataFrame] = {}  # per-class metrics of each pass
        # The first epoch counts each probe's training classes (the majority baseline).
        self.online_pass = True
        # The online code length when training ends (``code_length``; 0 bits: not known).
        self.code_bits: dict[str, float] = dict.fromkeys(self.configs, 0.0)
        self.uniform_bits: dict[str, float] = dict.fromkeys(self.configs, 0.0)
        self.class_counts: dict[str, np.ndarray] = {n: np.zeros(0) for n in self.configs}
        # Refitted on every training row (held-out ones too) once the held-out slice has
        # chosen alpha and the length of training (see ``refit``).
        self.refitted: dict[str, bool] = dict.fromkeys(self.configs, False)
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
        # Steps counted since each probe last trained (the batches its buffer holds).
        self.steps_buffered: dict[str, int] = dict.fromkeys(self.configs, 0)
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
    CONTROL_SPLITS = ("train", "val", "test")

    def attach_control_labels(self, dataset: Any, split: str) -> None:
        """Give ``dataset`` the control task's labels (only when probes have control twins;
        the training split first). Sequence-level: a seeded permutation of the split's own
        labels. Token-level: each token type (input id) gets a seeded random label drawn
        from the training labels' distribution, the same in every split. Word-level: the
        same per word type (``dataset.word_types``, the lower-cased word), as Hewitt & Liang
        define control tasks for words."""
        if not self.control_of or dataset is None:
            return
        labels = dataset.labels
        if getattr(dataset, "word_level", False) and dataset.word_types is None:
            raise LmProbeError(
                "control tasks on word-level data need each word's type: build the dataset "
                "with word_types (lmprobe.words.encode_words gives them) or set control=false"
            )
        if labels.dim() == 1:
            tag = self.CONTROL_SPLITS.index(split)
            order = np.random.default_rng((self.seed, tag)).permutation(len(labels))
            dataset.control_labels = labels[torch.from_numpy(order)]
            return
        if split == "train" or self._control_table is None:
            config = self.configs[next(iter(self.control_of.values()))]
            values = torch.as_tensor(dataset.label_values(config.null_label))
            self._control_classes, counts = np.unique(values.numpy(), return_counts=True)
            self._control_p = counts / counts.sum()
            self._control_table = np.empty(0, dtype=np.int64)
        word_level = getattr(dataset, "word_level", False)
        # a control label per type: the input id of a token, the word type of a word
        types = dataset.word_types if word_level else dataset.input_ids
        real = dataset.word_present if word_level else dataset.attention_mask.bool()
        size = int(types.max()) + 1
        if size > len(self._control_table):  # a prefix of the same seeded draw
            draw = np.random.default_rng(self.seed).choice(
                len(self._control_classes), size=size, p=self._control_p
            )
            self._control_table = self._control_classes[draw]
        table = torch.from_numpy(self._control_table)
        dataset.control_labels = torch.where(real, table[types.clamp(min=0)], dataset.labels)

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
            config, end = self.configs[name], self.steps[name]
            if config.max_steps is not None and end >= config.max_steps:
                continue
            if not self._stops_early(name):
                return True
            waited = end - max(self.best_step[name], config.warmup_steps)
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
    def wait(self, raise_error: bool = True) -> None:
        """Join the training running in the background (``flush(background=True)``), if
        any, and raise what it raised (``raise_error=False``: log it instead, when another
        error is on its way). A no-op otherwise."""
        pending = self._pending
        if pending is None:
            return
        self._pending, self._pending_rows, self._live_before = None, False, None
        deferred, self._deferred = self._deferred, []
        try:
            pending.result()
        except Exception as error:
            if raise_error:
                raise
            log.error("the probes' training on the worker thread failed too: %r", error)
            return  # (the run is failing: its later batches are not trained on)
        for features, chunk_rows in deferred:  # as if they had come after it, in order
            self.update(features, chunk_rows)

    @property
    def training_pending(self) -> bool:
        """Training handed to the worker thread has not been waited for yet."""
        return self._pending is not None

    @property
    def batches_waiting(self) -> bool:
        """Training batches wait for the worker's training to end (``update``)."""
        return bool(self._deferred)

    @property
    def training_running(self) -> bool:
        """Training handed to the worker thread is still running (waiting would block)."""
        return self._pending is not None and self._pending.running

    @contextlib.contextmanager
    def joined_after(self) -> Iterator[None]:
        """Wait for the worker thread when the block ends. If the block raised, its error
        is the one to see: the worker's, if any, is logged (``wait(raise_error=False)``)."""
        try:
            yield
        except BaseException:
            self.wait(raise_error=False)
            raise
        self.wait()

    def trained_any(self) -> bool:
        """Some probe is fitted, or will be once the background training is done."""
        return self._pending_rows or any(p.is_fitted for p in self.probes.values())

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
        return self._stops_early(name) or self.probes[name].selects

    def uses_kept_rows(self) -> bool:
        """Whether some probe learns from the kept training rows when training ends (a
        one-epoch run keeps them only then): a kind fitted from every row, a refit (a
        held-out slice to refit with), or a code length. From the configs: every rank
        decides alike."""
        return any(
            getattr(self.probes[name], "fits_rows", False)
            or (config.refit and config.heldout_size > 0 and self._needs_heldout(name))
            or self._codes(name)
            for name, config in self.configs.items()
        )

    def _codes(self, name: str) -> bool:
        """The kind has an online code length: a classifier with probabilities."""
        probe = self.probes[name]
        return probe.task == "classification" and hasattr(probe, "predict_proba")

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
            self.heldout[name] = rows.select_docs(union[:size])
            extra = rows.select_docs(union[size:])
            if len(extra.y):
                with _checked_rows():
                    self._fit(name, extra.X, extra.y)
        self.heldout_index = np.asarray(union, dtype=np.int64)
        self.prepared = True

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
            self.steps[name] += 1
            self.steps_buffered[name] += 1
            full = self._train_rows.add(name, rows, chunk_rows)
            max_steps = self.configs[name].max_steps
            if full or (max_steps is not None and self.steps[name] >= max_steps):
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
        names = [name for name in self._train_rows.names() if name in self.live]
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
        self._pending = _Background(train)
        return [name for name, rows, _ in taken if rows is not None]

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
        rows = self._train_rows.take(name, drop_failed)
        buffered, self.steps_buffered[name] = self.steps_buffered[name], 0
        return rows, buffered

    def _train_on(self, name: str, rows: Features | None, buffered: int) -> bool:
        if rows is None:
            return False
        if self.row_rank is not None:  # stable: a document's tokens keep their order
            order = np.argsort(self.row_rank[rows.doc], kind="stable")
            rows = Features(rows.X[order], rows.y[order], rows.doc[order])
        end = self.steps[name]
        with _checked_rows():
            for group, clock in self._by_group(rows, end - buffered, end):
                if name not in self.live:  # it stopped on an earlier group of the window
                    break
                self.steps[name] = clock
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
        probe = self.probes[name]
        classes = getattr(probe, "classes_", None)
        if classes is None and probe.task == "classification":
            classes = np.unique(np.asarray(self.configs[name].classes))
        if self.online_pass and classes is not None:
            counts = np.bincount(column_of(np.asarray(classes), y), minlength=len(classes))
            before = self.class_counts[name]
            self.class_counts[name] = before + counts if len(before) else counts
        probe.partial_fit(X, y)

    def _check_stopping(self, name: str) -> None:
        """Right after an update: score the held-out slice; retire the probe when it is out
        of patience (training batches without an improvement of ``threshold``, counted after
        ``warmup_steps``) or at ``max_steps``."""
        config, steps = self.configs[name], self.steps[name]
        heldout = self.heldout.get(name)
        if heldout is not None and len(heldout.y):
            loss = self.probes[name].heldout_loss(heldout.X, heldout.y)  # also chooses alpha
            if loss is not None and self._stops_early(name):
                self.history[name].append((steps, loss))
                if loss < self.best_loss[name] - config.threshold:
                    self.best_loss[name], self.best_step[name] = loss, steps
                waited = steps - max(self.best_step[name], config.warmup_steps)
                if steps > config.warmup_steps and waited >= config.patience:
                    log.info("Early stopping after %d steps for %s", steps, name)
                    self.live.discard(name)
                    self.stopped_early[name] = True
                    return
        if config.max_steps is not None and steps >= config.max_steps:
            log.info("Reached max_steps=%d for %s", config.max_steps, name)
            self.live.discard(name)

    # ------------------------------------------------------------------- refit
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
        fitted = any(self.probes[name].is_fitted for name, _ in rows)
        self._pending_rows = self._pending_rows or fitted

        def refits() -> None:
            if before is not None:
                before.result()
            self._each(self._finish, [(name, r, n_docs) for name, r in rows])

        self._pending = _Background(refits)
        return []

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
        if getattr(self.probes[name], "fits_rows", False):
            refitted = self._refit(name, rows, n_docs)
            self._code_length(name, rows, n_docs)
            return refitted
        self._code_length(name, rows, n_docs)
        return self._refit(name, rows, n_docs)

    def _all_rows(self, name: str, rows: Features, n_docs: int) -> Features | None:
        """The probe's kept training rows and its held-out slice, in document order; None
        unless they hold every one of the ``n_docs`` training documents."""
        heldout = self.heldout.get(name)
        if heldout is not None and len(heldout.y):
            rows = Features.concat([rows, heldout])
        if len(np.unique(rows.doc)) != n_docs:
            return None
        order = np.argsort(rows.doc, kind="stable")
        return Features(rows.X[order], rows.y[order], rows.doc[order])

    def _passes(self, name: str, n_rows: int) -> int:
        """The passes over its training rows the probe made (its ``n_samples_seen_``)."""
        heldout = self.heldout.get(name)
        trained_rows = n_rows - (len(heldout.y) if heldout is not None else 0)
        seen = getattr(self.probes[name], "n_samples_seen_", 0) or 0
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
        config, probe = self.configs[name], self.probes[name]
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
            with _checked_rows():
                return fresh.fit_rows(X, y)
        with _checked_rows():
            for epoch in range(passes):
                perm = np.random.default_rng((self.seed, epoch)).permutation(len(y))
                for start in range(0, len(y), REFIT_ROWS):
                    chunk = perm[start : start + REFIT_ROWS]
                    fresh.partial_fit(X[chunk], y[chunk])
        return fresh

    def _refit(self, name: str, rows: Features, n_docs: int) -> bool:
        heldout = self.heldout.get(name)
        probe = self.probes[name]
        seen = getattr(probe, "n_samples_seen_", None)
        if getattr(probe, "fits_rows", False):
            return self._fit_rows(name, rows, n_docs)
        if (
            not self.configs[name].refit
            or self.refitted[name]  # once (a run resumed after its refit ends again)
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
        self.refitted[name] = True
        return True

    def _fit_rows(self, name: str, rows: Features, n_docs: int) -> bool:
        """A kind fitted from every row (``fits_rows``): its final fit, from the kept
        training rows and the held-out slice (which chooses among its settings; with
        ``refit`` the final fit then also learns from it)."""
        probe, config = self.probes[name], self.configs[name]
        if self.refitted[name] or not probe.is_fitted:
            return False
        if self._all_rows(name, rows, n_docs) is None:
            log.info("probe %r keeps its online fit: not every training row was kept", name)
            return False
        order = np.argsort(rows.doc, kind="stable")
        heldout = self.heldout.get(name) or Features(rows.X[:0], rows.y[:0], rows.doc[:0])
        final = make_probe(config, self.seed)
        with _checked_rows():
            final.fit_rows(rows.X[order], rows.y[order], heldout.X, heldout.y, config.refit)
        probe.__dict__.clear()
        probe.__dict__.update(final.__dict__)
        self.refitted[name] = True
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
        probe = self.probes[name]
        if (
            self.uniform_bits[name]  # once (a resumed run)
            or (self.refitted[name] and not getattr(probe, "fits_rows", False))
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
        self.code_bits[name] = bits
        self.uniform_bits[name] = len(y) * math.log2(len(classes))
        return True

    # ------------------------------------------------------------------ scoring
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
        with _checked_rows():
            for name, probe in self.probes.items():
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

        self._drawn = (n, n_resamples, seed, _Background(draw), drawn)

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
        ``lmprobe.uncertainty``). Resets the pass."""
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
            row["steps"] = self.steps[name]
            row["stopped_early"] = bool(self.stopped_early[name])
            row["alpha"] = getattr(self.probes[name], "alpha_", float("nan"))
            row["refit"] = bool(self.refitted[name])
            if task == "classification":
                row["majority_accuracy"] = float("nan")
                if scores is not None and name not in self.control_of:
                    scored[name], n_classes[name] = scores.rows(), len(scores.classes)
                    per_class.append(scores.per_class(name))
                    row["majority_accuracy"] = self._majority_accuracy(name, scored[name])
                bits, uniform = self.code_bits[name], self.uniform_bits[name]
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
        counts = self.class_counts[name]
        if not len(scored["target"]) or not counts.any():
            return float("nan")
        return float((scored["target"] == int(np.argmax(counts))).mean())

    # -------------------------------------------------------------- checkpoints
    def snapshot_for_resume(self) -> None:
        """Keep the state as it is now, buffered training rows included, for the checkpoint
        of an interrupted run (see ``_resume_state``)."""
        self.wait()
        self._resume_state = self.state_dict(buffered=True)

    def checkpoint_state(self) -> dict[str, Any]:
        return self._resume_state if self._resume_state is not None else self.state_dict()

    def fingerprint_of(self, dataset: Any) -> dict[str, str]:
        """Hashes of the training data (tokens, labels), the probe configs and the label set."""
        import hashlib

        def digest(*parts: Any) -> str:
            h = hashlib.sha256()
            for part in parts:
                if isinstance(part, torch.Tensor):
                    part = part.contiguous().numpy().tobytes()
                h.update(part if isinstance(part, bytes) else str(part).encode())
            return h.hexdigest()[:16]

        configs = {n: dataclasses.asdict(c) for n, c in self.configs.items()}
        classes = sorted({str(c.classes) for c in self.configs.values()})
        return {
            "data": digest(*dataset.digest_parts()),
            "probes": digest(json.dumps(configs, sort_keys=True, default=str), self.seed),
            "labels": digest(*classes),
        }

    def check_resume(self, state: dict[str, Any], source: str) -> None:
        """Refuse a checkpoint written for other data, probes or labels, naming what differs."""
        theirs = json.loads(state["plain"]).get("fingerprint", {}) if "plain" in state else {}
        differ = [k for k, v in self.fingerprint.items() if theirs.get(k, v) != v]
        if not theirs or differ:
            what = ", ".join(differ) if theirs else "no fingerprint"
            raise LmProbeError(
                f"{source} was written by another run ({what} differ); resume with the same "
                f"data, probes and labels, or start afresh without ckpt_path"
            )

    def state_dict(self, buffered: bool = False) -> dict[str, Any]:
        """Tensors and plain values only (no pickled objects). ``buffered``: also the
        training rows waiting in the buffer (an interrupted run's checkpoint)."""
        self.wait()
        probes = {}
        for name, probe in self.probes.items():
            arrays, header = probe_to_tensors(probe)
            probes[name] = {
                "arrays": {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()},
                "header": header,
            }
        heldout = {name: _to_tensors(rows) for name, rows in self.heldout.items()}
        plain = {
            "live": sorted(self.live),
            "stopped_early": self.stopped_early,
            "steps": self.steps,
            "best_loss": {k: float(v) for k, v in self.best_loss.items()},
            "best_step": self.best_step,
            "history": {k: [list(p) for p in v] for k, v in self.history.items()},
            "prepared": self.prepared,
            "online_pass": self.online_pass,
            "code_bits": self.code_bits,
            "uniform_bits": self.uniform_bits,
            "class_counts": {k: v.tolist() for k, v in self.class_counts.items()},
            "refitted": self.refitted,
            "epoch_batches": self.epoch_batches,
            "steps_buffered": self.steps_buffered,
            "fingerprint": self.fingerprint,
        }
        waiting = {}
        if buffered:
            for name in self._train_rows.names():
                rows = gather(self._train_rows.parts[name], drop_failed=True)
                waiting[name] = _to_tensors(rows)
        return {
            "buffered": waiting,
            "probes": probes,
            "heldout": heldout,
            "heldout_index": torch.from_numpy(self.heldout_index),
            "plain": json.dumps(plain),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wait()
        missing = sorted(set(self.configs) - set(state["probes"]))
        if missing:
            raise LmProbeError(
                f"the checkpoint has no probe {missing[0]!r}; it was written for other probes"
            )
        self.probes = {
            name: probe_from_tensors(
                {k: v.numpy() for k, v in state["probes"][name]["arrays"].items()},
                state["probes"][name]["header"],
                source=f"checkpoint probe {name!r}",
            )
            for name in self.configs
        }
        self.heldout = {name: _from_tensors(rows) for name, rows in state["heldout"].items()}
        self.heldout_index = state["heldout_index"].numpy()
        plain = json.loads(state["plain"])
        self.live = set(plain["live"])
        self.stopped_early = dict(plain["stopped_early"])
        self.steps = dict(plain["steps"])
        self.best_loss = dict(plain["best_loss"])
        self.best_step = dict(plain["best_step"])
        self.history = {k: [tuple(p) for p in v] for k, v in plain["history"].items()}
        self.prepared = plain["prepared"]
        self.online_pass = plain["online_pass"]
        self.code_bits, self.uniform_bits = plain["code_bits"], plain["uniform_bits"]
        self.class_counts = {k: np.asarray(v) for k, v in plain["class_counts"].items()}
        self.refitted = dict(plain.get("refitted", dict.fromkeys(self.configs, False)))
        self.epoch_batches = int(plain.get("epoch_batches", 0))
        buffered = plain.get("steps_buffered", {})
        self.steps_buffered = {n: int(buffered.get(n, 0)) for n in self.configs}
        self.resumed = True
        self._train_rows.clear()
        for name, rows in state.get("buffered", {}).items():
            X, y, doc = _from_tensors(rows)
            self._train_rows.add(name, PendingFeatures(torch.from_numpy(X), y, doc), None)
