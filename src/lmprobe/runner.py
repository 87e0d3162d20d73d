"""``ProbeRunner``: the original lm_probe API, driving a Lightning ``Trainer``.

The Hydra app (``lmprobe.app``) and this runner share ``fit_and_test``: one training loop.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch

from lmprobe.callbacks import (
    DEFAULT_CHUNK_ROWS,
    ProbeEarlyStopping,
    ProbeMetrics,
    ProbeUpdater,
)
from lmprobe.config import ProbeConfig
from lmprobe.data import ProbeDataModule, ProbeDataset, trim_padding
from lmprobe.errors import LmProbeError
from lmprobe.features import PendingFeatures, gather
from lmprobe.models import input_device, load_language_model
from lmprobe.module import ProbeModule
from lmprobe.probes import LinearProbe

log = logging.getLogger("lmprobe")


def show_lmprobe_log() -> None:
    """Print lmprobe's INFO lines (e.g. early stopping) when the application set up no logging."""
    root = logging.getLogger()
    if not log.handlers and not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def probe_callbacks(
    seed: int | None = None, chunk_rows: int | None = DEFAULT_CHUNK_ROWS
) -> list[L.Callback]:
    """The callbacks every probe run needs, in the order they must run after each batch."""
    return [ProbeUpdater(chunk_rows), ProbeEarlyStopping(seed), ProbeMetrics(chunk_rows)]


def accelerator_for(module: ProbeModule) -> str:
    return "gpu" if input_device(module.lm).type == "cuda" else "cpu"


def fit_and_test(
    trainer: L.Trainer,
    module: ProbeModule,
    datamodule: L.LightningDataModule,
    ckpt_path: str | None = None,
) -> pd.DataFrame:
    """Fit the probe bank, then score it on the whole test set; returns the metrics table."""
    metrics = [cb for cb in trainer.callbacks if isinstance(cb, ProbeMetrics)]
    if not metrics or not any(isinstance(cb, ProbeUpdater) for cb in trainer.callbacks):
        raise LmProbeError(
            "the Trainer lacks lmprobe's callbacks; add lmprobe.runner.probe_callbacks()"
        )
    datamodule.setup("fit")
    if getattr(datamodule, "val_set", None) is None:
        trainer.limit_val_batches = 0  # no validation split: skip Lightning's validation loop
    if getattr(datamodule, "test_set", None) is not None:
        module.validate_dataset(datamodule.test_set, "test")
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    if getattr(datamodule, "test_set", None) is None:
        return pd.DataFrame()
    trainer.test(module, datamodule=datamodule, verbose=False)
    return metrics[0].tables["test"]


class ProbeRunner:
    """Train a bank of linear probes on a frozen LM, the lm_probe way::

    runner = ProbeRunner(model, [ProbeConfig("transformer.h.5.mlp.output", [0, 1])])
    runner.fit_probes(train_set, test_set, batch_size=8)
    print(runner.metrics)
    """

    def __init__(
        self,
        model: Any,
        configs: ProbeConfig | Sequence[ProbeConfig],
        tokenizer: Any = None,
        seed: int = 0,
        remote: bool = False,
        on_nonfinite: str = "error",
        **load_kwargs: Any,
    ) -> None:
        show_lmprobe_log()
        configs = [configs] if isinstance(configs, ProbeConfig) else list(configs)
        self.model = load_language_model(model, tokenizer, **load_kwargs)
        self.seed = seed
        self.module = ProbeModule(
            self.model, configs, seed=seed, remote=remote, on_nonfinite=on_nonfinite
        )
        self.configs = list(self.module.configs.values())
        self.trainer: L.Trainer | None = None
        self._metrics: pd.DataFrame | None = None

    def fit_probes(
        self,
        train_set: ProbeDataset,
        test_set: ProbeDataset | None = None,
        batch_size: int = 8,
        max_epochs: int = 1,
        logger: Any = False,
        enable_progress_bar: bool = True,
        callbacks: Sequence[L.Callback] = (),
        ckpt_path: str | None = None,
        chunk_rows: int | None = DEFAULT_CHUNK_ROWS,
        **trainer_kwargs: Any,
    ) -> ProbeRunner:
        """Fit every probe on ``train_set`` and, if given, score them on all of ``test_set``.

        Probes are updated with at least ``chunk_rows`` rows at a time (``None``: after every
        batch); steps, patience and warm-up count training batches either way.
        """
        for split, dataset in (("train_set", train_set), ("test_set", test_set)):
            if dataset is not None and not isinstance(dataset, ProbeDataset):
                raise LmProbeError(
                    f"{split} is a {type(dataset).__name__}; wrap it: ProbeDataset(input_ids, "
                    f"attention_mask, labels)"
                )
        if ckpt_path is None:  # a fresh fit starts from fresh probes
            self.module.reset_probes()
        L.seed_everything(self.seed, workers=True, verbose=False)
        datamodule = ProbeDataModule(train_set=train_set, test_set=test_set, batch_size=batch_size)
        self.trainer = L.Trainer(
            **{
                "max_epochs": max_epochs,
                "accelerator": accelerator_for(self.module),
                "devices": 1,
                "logger": logger,
                "enable_checkpointing": False,
                "enable_model_summary": False,
                "enable_progress_bar": enable_progress_bar,
                "num_sanity_val_steps": 0,
                "callbacks": [*probe_callbacks(self.seed, chunk_rows), *callbacks],
                **trainer_kwargs,
            }
        )
        self._metrics = fit_and_test(self.trainer, self.module, datamodule, ckpt_path)
        return self

    @property
    def metrics(self) -> pd.DataFrame:
        """Test-set metrics, one row per probe (loss, accuracy, precision, recall, f1, matthews)."""
        if self._metrics is None:
            raise LmProbeError("no metrics yet: call fit_probes(train_set, test_set) first")
        return self._metrics

    @property
    def probes(self) -> dict[str, LinearProbe]:
        return self.module.probes

    def __getitem__(self, name: str) -> LinearProbe:
        if name in self.module.probes:
            return self.module.probes[name]
        matches = [c.name for c in self.configs if c.submodule == name]
        if len(matches) == 1:
            return self.module.probes[matches[0]]
        raise KeyError(
            f"no probe named {name!r}; probes: {', '.join(self.module.probes)}"
            if not matches
            else f"{name!r} has {len(matches)} probes: {', '.join(matches)}; use the name"
        )

    def get_probe_features(
        self, input_ids: Any, attention_mask: Any, batch_size: int = 8
    ) -> dict[str, np.ndarray]:
        """The features each probe sees for these documents (pooled, or one row per real token)."""
        ids = torch.as_tensor(np.asarray(input_ids)).long()
        mask = torch.as_tensor(np.asarray(attention_mask)).long()
        if ids.dim() == 1:
            ids, mask = ids.unsqueeze(0), mask.unsqueeze(0)
        # Labels are unused here; a sentinel that equals no null_label keeps every real token.
        sentinel = torch.full_like(ids, torch.iinfo(torch.long).min)
        configs = self.module.configs.values()
        groups = {
            "token": [c.name for c in configs if c.token_level],
            "pooled": [c.name for c in configs if not c.token_level],
        }
        parts: dict[Any, list[PendingFeatures]] = {}
        for start in range(0, len(ids), batch_size):
            rows = slice(start, start + batch_size)
            for kind, group in groups.items():
                if not group:
                    continue
                labels = sentinel[rows] if kind == "token" else sentinel[rows, 0]
                batch = trim_padding(
                    {
                        "input_ids": ids[rows],
                        "attention_mask": mask[rows],
                        "labels": labels,
                        "index": torch.arange(len(ids))[rows],
                    }
                )
                out = self.module.extract(batch, group, f"documents {start}-{start + batch_size}")
                for key, features in out.items():
                    parts.setdefault(key, []).append(features)
        features = {key: gather(p).X for key, p in parts.items()}
        return {name: features[self.module.key(name)] for name in self.module.configs}
