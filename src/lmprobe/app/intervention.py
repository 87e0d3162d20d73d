"""``train.py``'s intervention stage (``intervene=erase/steer``): its config check and the
stage itself, which runs ``lmprobe.intervene.intervene`` and writes its outputs."""

from __future__ import annotations

from typing import Any

import pandas as pd

from lmprobe.errors import LmProbeError
from lmprobe.intervene import (
    DEFAULT_ALPHAS,
    INTERVENTION_CSV,
    INTERVENTION_FIGURE,
    intervene,
    intervention_figure,
    log_to_tensorboard,
    write_intervention,
)
from lmprobe.results.outputs import save_figure
from lmprobe.scoring.uncertainty import DEFAULT_RESAMPLES
from lmprobe.training.distributed import requested


def check_config(cfg: Any) -> None:
    """The app's ``intervene`` node, before any model work: not with several processes
    (one-line error) and alphas that are numbers."""
    node = cfg.get("intervene")
    if not node:
        return
    if requested(cfg.trainer):
        raise LmProbeError(
            "intervene=erase/steer runs in one process, not with trainer.strategy=ddp or "
            "several devices; train with DDP, then resume on one device with intervene set, "
            "or use intervene=none"
        )
    if not node.get("erase", True) and not node.get("steer", False):
        raise LmProbeError(
            "config key intervene: erase and steer are both false; use intervene=none"
        )
    if node.get("erase", True):
        import importlib.util

        if importlib.util.find_spec("concept_erasure") is None:
            raise LmProbeError(
                "intervene=erase needs the concept-erasure package: "
                "pip install 'lmprobe-lightning[intervene]'"
            )


def app_stage(cfg, module, lm, datamodule, table, out, loggers, keep_outputs) -> pd.DataFrame:
    """``train.py``'s intervention stage, after the run's own outputs are written:
    ``intervention.csv``, ``intervention.png`` and TensorBoard scalars."""
    node = cfg.intervene
    batch_size = node.get("batch_size") or getattr(datamodule, "batch_size", None) or 8
    frame = intervene(
        module,
        lm,
        datamodule.train_set,
        datamodule.test_set,
        list(node.sites) if node.get("sites") else None,
        erase=bool(node.get("erase", True)),
        steer=bool(node.get("steer", False)),
        alphas=[float(a) for a in node.get("alphas") or DEFAULT_ALPHAS],
        batch_size=int(batch_size),
        bootstrap=int(node.get("bootstrap", DEFAULT_RESAMPLES)),
        seed=int(cfg.seed),
        table=table,
    )
    figure = intervention_figure(frame)
    rescue, problems = keep_outputs(
        out,
        [
            (INTERVENTION_CSV, lambda d: write_intervention(frame, d / INTERVENTION_CSV)),
            (INTERVENTION_FIGURE, lambda d: save_figure(figure, d / INTERVENTION_FIGURE)),
        ],
    )
    if problems:
        raise LmProbeError(f"could not write {'; '.join(problems)}; kept in {rescue} instead")
    log_to_tensorboard(frame, loggers, figure)
    shown = frame[frame["probe_is"] != "before"]
    columns = ["site", "condition", "rank", "alpha", "probe", "accuracy", "accuracy_change"]
    columns += [c for c in ("p_positive",) if c in frame.columns] + ["bits_per_token_change"]
    print(f"\nInterventions ({out / INTERVENTION_CSV}):")
    print(shown[columns].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return frame
