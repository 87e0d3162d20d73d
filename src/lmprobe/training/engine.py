"""The one training loop (``fit_and_test``) and the one set of Trainer defaults, shared by
``ProbeRunner`` (the Python API) and the Hydra app (``train.py``)."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch

from lmprobe.errors import LmProbeError
from lmprobe.probes.config import DEFAULT_CHUNK_ROWS
from lmprobe.scoring.uncertainty import DEFAULT_RESAMPLES
from lmprobe.tracing.models import input_device
from lmprobe.training.callbacks import ProbeEarlyStopping, ProbeMetrics, ProbeUpdater
from lmprobe.training.distributed import make_strategy, requested
from lmprobe.training.interrupts import check_stop
from lmprobe.training.module import ProbeModule

log = logging.getLogger("lmprobe")

# Lightning's own pytree helpers (lightning/pytorch/utilities/_pytree.py, 2.6) build torch's
# deprecated LeafSpec: a FutureWarning at every fit and test that no user can act on.
warnings.filterwarnings(
    "ignore",
    message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    category=FutureWarning,
    module=r"lightning\.pytorch\.utilities\._pytree",
)


class _NoAdvertisement(logging.Filter):
    """Drops Lightning's "Tip: ... try installing litlogger" line, printed by every Trainer
    that has no LitLogger: an advertisement, not information about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdvertisement())

# Probing has no optimizer and writes its own outputs: no Lightning checkpoints unless asked
# for, no model summary (the LM is not a parameter of the module), no sanity validation.
TRAINER_DEFAULTS: dict[str, Any] = {
    "max_epochs": 30,
    "devices": 1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "enable_progress_bar": True,
    "num_sanity_val_steps": 0,
}


def show_lmprobe_log() -> None:
    """Print lmprobe's INFO lines (e.g. early stopping) when the application set up no logging."""
    root = logging.getLogger()
    if not log.handlers and not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def probe_callbacks(
    seed: int | None = None,
    chunk_rows: int | None = DEFAULT_CHUNK_ROWS,
    bootstrap: int = DEFAULT_RESAMPLES,
) -> list[L.Callback]:
    """The callbacks every probe run needs (in any order)."""
    return [
        ProbeUpdater(chunk_rows),
        ProbeEarlyStopping(seed),
        ProbeMetrics(chunk_rows, bootstrap),
    ]


def accelerator_for(module: ProbeModule) -> str:
    """Lightning's accelerator follows the LM's own device."""
    return "gpu" if input_device(module.lm).type == "cuda" else "cpu"


def make_trainer(module: ProbeModule | None = None, **kwargs: Any) -> L.Trainer:
    """A ``Trainer`` with ``TRAINER_DEFAULTS`` under ``kwargs``; ``accelerator="auto"`` (or
    none) follows the LM's device when ``module`` is given. Several processes
    (``strategy="ddp"``, ``devices`` or ``num_nodes`` above one) run lmprobe's DDP
    (``lmprobe.training.distributed``): every rank reads the same global batches."""
    # None: Lightning's own default (what an unset key in the typed config means)
    options = {**TRAINER_DEFAULTS, **{k: v for k, v in kwargs.items() if v is not None}}
    if module is not None and options.get("accelerator", "auto") == "auto":
        options["accelerator"] = accelerator_for(module)
    if requested(options):
        options["strategy"] = make_strategy(options.get("accelerator"))
        options["use_distributed_sampler"] = False  # ranks share out each global batch
    return L.Trainer(**options)


def fit_and_test(
    trainer: L.Trainer,
    module: ProbeModule,
    datamodule: L.LightningDataModule,
    ckpt_path: str | None = None,
    test_follows: bool = False,
) -> pd.DataFrame:
    """Fit the probe bank, then score it on the whole test set; returns the metrics table.

    With a test set (or ``test_follows``: the caller scores one next, as ``ProbeRunner``
    does), the run's last training and the refit run on a worker thread while the test set
    is traced (``ProbeUpdater.train_through_test``); the bank waits for them before scoring
    or before anything reads the probes. With ``test_follows`` they may still run on
    return."""
    kinds = (ProbeUpdater, ProbeMetrics)
    if not all(any(isinstance(cb, k) for cb in trainer.callbacks) for k in kinds):
        raise LmProbeError(
            "the Trainer lacks lmprobe's callbacks; add lmprobe.training.engine.probe_callbacks()"
        )
    if trainer.max_epochs == 0:
        raise LmProbeError("trainer max_epochs=0 trains no probe; use max_epochs >= 1")
    datamodule.setup("fit")
    for split in module.bank.CONTROL_SPLITS:  # no-op without control twins
        _give_control_labels(module, getattr(datamodule, f"{split}_set", None), split)
    if getattr(datamodule, "val_set", None) is None:
        trainer.limit_val_batches = 0  # no validation split: skip Lightning's validation loop
    if getattr(datamodule, "test_set", None) is not None:
        module.bank.check_dataset(datamodule.test_set, "test")
    train_set = getattr(datamodule, "train_set", None)
    if train_set is not None:
        module.bank.set_fingerprint(train_set)
    if ckpt_path is not None:
        check_checkpoint(ckpt_path, module)
    module.prepare_features(datamodule)  # the feature store, when the run has one
    # weights_only: a checkpoint holds tensors and plain values (ProbeBank.state_dict), so
    # resuming never unpickles objects, which could run code from someone else's file.
    # With a test pass to follow, the run's last training and the refit run while the test
    # set is traced (ProbeUpdater.train_through_test); the bank waits for them to score.
    updater = next(cb for cb in trainer.callbacks if isinstance(cb, ProbeUpdater))
    has_test = getattr(datamodule, "test_set", None) is not None
    updater.train_through_test = has_test or test_follows
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    finally:
        updater.train_through_test = False
    check_stop()  # a SIGTERM after the training loop's last check stops before the test
    if not module.bank.trained_any():
        module.bank.wait()
        raise LmProbeError(
            "no probe was trained: no training batch had rows for any probe (check the "
            "training labels against each probe's null_label and classes)"
        )
    if not has_test:
        if not test_follows:
            module.bank.wait()
        return pd.DataFrame()
    with module.bank.joined_after():  # (scoring has waited already, unless it failed)
        return score_test_set(trainer, module, datamodule)


def check_checkpoint(ckpt_path: str | os.PathLike, module: ProbeModule) -> None:
    """Before any work: the checkpoint exists, was written by lmprobe, and by a run on the
    same data, probes and labels (its fingerprint)."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise LmProbeError(
            f"ckpt_path={str(ckpt_path)!r} is not a file; give the last.ckpt of the run"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one line
        raise LmProbeError(
            f"ckpt_path={str(ckpt_path)!r} is not a readable checkpoint ({type(err).__name__})"
        ) from None
    if not isinstance(state, dict) or "lmprobe" not in state:
        raise LmProbeError(
            f"ckpt_path={str(ckpt_path)!r} was not written by lmprobe (no probe state)"
        )
    if module.bank.fingerprint:
        module.bank.check_resume(state["lmprobe"], f"checkpoint {str(ckpt_path)!r}")


def baseline_table(
    baseline: str,
    module: ProbeModule,
    datamodule: L.LightningDataModule,
    trainer_for: Any,
    lm: Any = None,
) -> pd.DataFrame:
    """The same probes, fitted and scored the same way on the baseline model (``random_init``:
    ``lm`` (default ``module``'s LM) with its weights re-initialised with the seed).
    ``trainer_for(module)`` builds a fresh Trainer (fresh callbacks) for it. The baseline
    is traced: the feature store holds the features of the real weights only."""
    from lmprobe.results.baselines import check_baseline, random_init_copy

    check_baseline(baseline)
    configs = [module.configs[name] for name in module.bank.probe_names]
    other = ProbeModule(
        random_init_copy(module.lm if lm is None else lm, module.seed),
        configs,
        seed=module.seed,
        remote=module.remote,
        on_nonfinite=module.on_nonfinite,
    )
    log.info("fitting the same probes on the %s baseline", baseline)
    return fit_and_test(trainer_for(other), other, datamodule)


def _give_control_labels(module: ProbeModule, dataset: Any, split: str) -> None:
    """The bank's control labels of ``dataset``, given to it (when probes have twins)."""
    labels = module.bank.control_labels(dataset, split)
    if labels is not None:
        dataset.set_control_labels(labels)


def score_test_set(
    trainer: L.Trainer, module: ProbeModule, datamodule: L.LightningDataModule
) -> pd.DataFrame:
    """Score the bank on the data module's test set (empty table without one)."""
    if getattr(datamodule, "test_set", None) is None:
        return pd.DataFrame()
    if datamodule.test_set.control_labels is None:
        _give_control_labels(module, datamodule.test_set, "test")
    trainer.test(module, datamodule=datamodule, verbose=False)
    return module.bank.tables["test"]
