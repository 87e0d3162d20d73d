"""``ProbeRunner``: the original lm_probe API, driving a Lightning ``Trainer``.

Signatures, positional order and defaults are lm_probe's (``README.md``, "Differences from
lm_probe", lists where results need a different behaviour). The loop is the one in
``lmprobe.training.engine``, shared with the Hydra app.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch

from lmprobe.data.datamodule import ProbeDataModule
from lmprobe.data.dataset import ProbeDataset, trim_padding
from lmprobe.data.packed import PackedDataset
from lmprobe.errors import LmProbeError
from lmprobe.integrations.lightning import batches_completed
from lmprobe.probes.base import Probe
from lmprobe.probes.config import DEFAULT_CHUNK_ROWS, ProbeConfig
from lmprobe.results.baselines import check_baseline, merge_baseline
from lmprobe.tracing.features import FeatureKey
from lmprobe.tracing.loop import gathered, trace_batches
from lmprobe.tracing.models import load_language_model
from lmprobe.training.distributed import requested
from lmprobe.training.engine import (
    baseline_table,
    fit_and_test,
    make_trainer,
    probe_callbacks,
    score_test_set,
)
from lmprobe.training.module import ProbeModule

#: What the runner trains and scores on: padded tensors, or a data module's token file.
DATASETS = (ProbeDataset, PackedDataset)


class ProbeRunner:
    """Train a bank of linear probes on a frozen LM, the lm_probe way:

    ```python
    runner = ProbeRunner(model, [ProbeConfig("transformer.h.5.mlp.output", [0, 1])])
    runner.fit_probes(train_set, test_set, batch_size=8)
    print(runner.metrics)
    ```
    """

    def __init__(
        self,
        model: Any,
        probe_configs: ProbeConfig | Sequence[ProbeConfig],
        remote: bool = False,
        *,
        tokenizer: Any = None,
        seed: int = 0,
        on_nonfinite: str = "error",
        **load_kwargs: Any,
    ) -> None:
        from lmprobe.training.engine import show_lmprobe_log

        show_lmprobe_log()
        if isinstance(probe_configs, ProbeConfig):
            probe_configs = [probe_configs]
        self.model = load_language_model(model, tokenizer, **load_kwargs)
        self.seed = seed
        self.module = ProbeModule(
            self.model, list(probe_configs), seed=seed, remote=remote, on_nonfinite=on_nonfinite
        )
        self.configs = [self.module.configs[name] for name in self.module.bank.probe_names]
        self.trainer: L.Trainer | None = None
        self._metrics: pd.DataFrame | None = None

    def __repr__(self) -> str:
        return f"Probe runner for {len(self.configs)} probe(s)"

    # ----------------------------------------------------------------- training
    def fit_probes(
        self,
        train_set: ProbeDataset,
        eval_set: ProbeDataset | None = None,
        num_epoch: int = 30,
        batch_size: int = 32,
        limit_eval_batches: bool | None = None,
        *,
        test_set: ProbeDataset | None = None,
        max_epochs: int | None = None,
        logger: Any = False,
        enable_progress_bar: bool = True,
        callbacks: Sequence[L.Callback] = (),
        ckpt_path: str | None = None,
        chunk_rows: int | None = DEFAULT_CHUNK_ROWS,
        length_window: int | None = None,
        baseline: str | None = None,
        **trainer_kwargs: Any,
    ) -> ProbeRunner:
        """Fit every probe on ``train_set`` and, if given, score them on ``eval_set``.

        Epochs after the first reuse the features kept from the first, so ``num_epoch``
        costs little LM time. The whole ``eval_set`` is scored unless ``limit_eval_batches``
        is ``True`` (lm_probe's behaviour: as many batches as training ran).
        ``test_set``/``max_epochs`` are this project's spellings of ``eval_set``/``num_epoch``.
        Probes are updated with at least ``chunk_rows`` rows at a time (``None``: after
        every batch); steps, patience and warm-up count training batches either way.
        ``length_window`` groups of ``chunk_rows`` documents are traced sorted by length
        together (``None``: about 50 batches' worth; what the probes learn does not depend
        on it, only the padding and the rows buffered do).
        ``baseline="random_init"`` also fits the same probes on the model with re-initialised
        weights and puts their accuracy beside each probe's (``random_init_accuracy``).
        """
        check_baseline(baseline)
        if requested(trainer_kwargs):
            raise LmProbeError(
                f"ProbeRunner runs in one process (got strategy="
                f"{trainer_kwargs.get('strategy', 'auto')!r}, devices="
                f"{trainer_kwargs.get('devices', 1)!r}); for several devices use the app: "
                f"python train.py trainer.devices=N trainer.strategy=ddp"
            )
        if test_set is not None:
            if eval_set is not None:
                raise LmProbeError("give eval_set or test_set (the same thing), not both")
            eval_set = test_set
        if max_epochs is not None:
            num_epoch = max_epochs
        for split, dataset in (("train_set", train_set), ("eval_set", eval_set)):
            if dataset is not None and not isinstance(dataset, DATASETS):
                raise LmProbeError(
                    f"{split} is a {type(dataset).__name__}; wrap it: ProbeDataset(input_ids, "
                    f"attention_mask, labels)"
                )
        if isinstance(num_epoch, bool) or not isinstance(num_epoch, int) or num_epoch < 1:
            raise LmProbeError(f"num_epoch={num_epoch!r} must be a positive integer, e.g. 10")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise LmProbeError(f"batch_size={batch_size!r} must be a positive integer, e.g. 32")
        if eval_set is not None:  # label checks before any model work
            self.module.bank.check_dataset(eval_set, "test")
        if ckpt_path is None:  # a fresh fit starts from fresh probes
            self._reset_probes()
        L.seed_everything(self.seed, workers=True, verbose=False)

        def datamodule_for(test: ProbeDataset | None) -> ProbeDataModule:
            return ProbeDataModule(
                train_set=train_set,
                test_set=test,
                batch_size=batch_size,
                seed=self.seed,
                group_size=chunk_rows,
                length_window=length_window,
            )

        def trainer_for(
            module: ProbeModule, extra: Sequence[L.Callback] = (), log_to: Any = False
        ) -> L.Trainer:
            return make_trainer(
                module,
                max_epochs=num_epoch,
                logger=log_to,
                enable_progress_bar=enable_progress_bar,
                callbacks=[*probe_callbacks(self.seed, chunk_rows), *extra],
                **trainer_kwargs,
            )

        self.trainer = trainer_for(self.module, callbacks, logger)
        # the last training may run on while eval_set is traced (fit_and_test)
        test_follows = eval_set is not None
        fit_and_test(self.trainer, self.module, datamodule_for(None), ckpt_path, test_follows)
        self._metrics = None
        if eval_set is not None:
            limit = None
            if limit_eval_batches:
                limit = max(1, batches_completed(self.trainer))
            with self.module.bank.joined_after():  # (scoring has waited already)
                self._metrics = self.compute_metrics(eval_set, batch_size, limit)
        if baseline is not None and eval_set is not None:
            other = baseline_table(baseline, self.module, datamodule_for(eval_set), trainer_for)
            self._metrics = merge_baseline(self._metrics, other, baseline)
        return self

    def compute_metrics(
        self, dataset: ProbeDataset, batch_size: int = 32, batch_limit: int | None = None
    ) -> pd.DataFrame:
        """Metrics of every probe on ``dataset`` (its first ``batch_limit`` batches; ``None``
        or 0: all), one row per probe: loss, accuracy, precision, recall, f1, matthews, ..."""
        if not isinstance(dataset, DATASETS):
            raise LmProbeError(f"dataset is a {type(dataset).__name__}; wrap it in ProbeDataset")
        if self.trainer is None:
            self.trainer = make_trainer(
                self.module, callbacks=probe_callbacks(self.seed), enable_progress_bar=False
            )
        self.module.bank.check_dataset(dataset, "evaluation")
        if batch_limit is not None and (
            isinstance(batch_limit, bool)
            or not isinstance(batch_limit, numbers.Integral)
            or batch_limit < 0
        ):
            raise LmProbeError(f"batch_limit={batch_limit!r} must be None or an integer >= 0")
        if batch_limit:
            # lm_probe scores the first batch_limit batches in the dataset's own order; the
            # test loader goes longest first, so limiting its batches would pick other rows.
            dataset = dataset.subset(np.arange(min(len(dataset), batch_limit * batch_size)))
        self.trainer.limit_test_batches = 1.0  # the rows to score were chosen just above
        datamodule = ProbeDataModule(train_set=dataset, test_set=dataset, batch_size=batch_size)
        return score_test_set(self.trainer, self.module, datamodule)

    def intervene(
        self,
        train_set: ProbeDataset,
        test_set: ProbeDataset,
        sites: str | Sequence[str] | None = None,
        *,
        erase: bool = True,
        steer: bool = False,
        alphas: Sequence[float] = (-1.0, -0.5, 0.5, 1.0),
        batch_size: int = 8,
        bootstrap: int = 1000,
        **leace_options: Any,
    ) -> pd.DataFrame:
        """After ``fit_probes``: erase the labels' linear information (LEACE, the probe's own
        direction(s), random directions of the same rank) and/or steer along the probe's
        direction at each of ``sites`` (probe names or submodules; ``None``: the best probe
        by test accuracy), run the LM on ``test_set`` and score every probe and the LM's
        loss; one row per site, condition, alpha and probe (``lmprobe.intervene``)."""
        from lmprobe.intervene import intervene

        for split, dataset in (("train_set", train_set), ("test_set", test_set)):
            if not isinstance(dataset, DATASETS):
                raise LmProbeError(
                    f"{split} is a {type(dataset).__name__}; wrap it in ProbeDataset"
                )
        return intervene(
            self.module,
            self.model,
            train_set,
            test_set,
            sites,
            erase=erase,
            steer=steer,
            alphas=alphas,
            batch_size=batch_size,
            bootstrap=bootstrap,
            seed=self.seed,
            table=self._metrics,
            leace_options=leace_options,
        )

    @property
    def metrics(self) -> pd.DataFrame:
        """Test-set metrics, one row per probe (loss, accuracy, precision, recall, f1, matthews)."""
        if self._metrics is None:
            raise LmProbeError("no metrics yet: call fit_probes(train_set, eval_set) first")
        return self._metrics

    # ------------------------------------------------------------------ probes
    def _reset_probes(self) -> None:
        """Fresh probes for a new fit, kept in the same objects (``ProbeBank.reset``):
        lm_probe trains the probes of ``runner.probes`` in place, so a probe taken with
        ``runner[name]`` before ``fit_probes`` must be the trained one afterwards."""
        self.module.reset_probes()

    @property
    def probes(self) -> list[Probe]:
        """The probes in the order of the configs (lm_probe's list); ``runner[name]`` by name."""
        return [self.module.bank.probes[name] for name in self.module.bank.probe_names]

    @property
    def submodules(self) -> list[str]:
        return [c.submodule for c in self.configs]

    @property
    def pool(self) -> bool:
        """lm_probe's flag: True when every probe pools (none is token-level)."""
        return not any(c.token_level for c in self.configs)

    def _name(self, name: str) -> str:
        if name in self.module.configs:
            return name
        matches = [c.name for c in self.configs if c.submodule == name]
        if len(matches) == 1:
            return matches[0]
        raise KeyError(
            f"no probe named {name!r}; probes: {', '.join(self.module.configs)}"
            if not matches
            else f"{name!r} has {len(matches)} probes: {', '.join(matches)}; use the name"
        )

    def __getitem__(self, name: str) -> Probe:
        return self.module.bank.probes[self._name(name)]

    # ----------------------------------------------------------------- features
    def get_probe_features(
        self,
        input_ids: Any,
        attention_mask: Any,
        subset: Sequence[str] | None = None,
        batch_size: int = 8,
    ) -> dict[str, np.ndarray]:
        """The features each probe sees for these documents, keyed by probe name (by default
        its submodule): (documents, d) for pooled probes, (documents, tokens, d) for
        token-level ones (every position, padding included, as in lm_probe). ``subset``
        limits it to some probes (names or submodules)."""
        ids = torch.as_tensor(np.asarray(input_ids)).long()
        mask = torch.as_tensor(np.asarray(attention_mask)).long()
        if ids.dim() == 1:
            ids, mask = ids.unsqueeze(0), mask.unsqueeze(0)
        names = [self._name(n) for n in subset] if subset else self.module.bank.probe_names
        configs = [self.module.configs[n] for n in names]
        groups = {
            "token": [c.name for c in configs if c.token_level],
            "pooled": [c.name for c in configs if not c.token_level],
        }
        # Labels are unused here; a sentinel that equals no null_label keeps every row.
        sentinel = torch.full_like(ids, torch.iinfo(torch.long).min)

        def in_order(token: bool) -> Iterator[dict[str, torch.Tensor]]:
            """The documents in batches, in their order: token-level ones with every
            position, so rows reshape to (docs, tokens)."""
            for start in range(0, len(ids), batch_size):
                rows = slice(start, start + batch_size)
                batch = {
                    "input_ids": ids[rows],
                    "attention_mask": mask[rows],
                    "labels": sentinel[rows] if token else sentinel[rows, 0],
                    "index": torch.arange(len(ids))[rows],
                }
                yield batch if token else trim_padding(batch)

        features: dict[FeatureKey, np.ndarray] = {}
        for token, group in ((True, groups["token"]), (False, groups["pooled"])):
            if not group:
                continue
            traced = trace_batches(
                lambda batch, label, group=group, token=token: self.module.extract(
                    batch, group, label, all_positions=token
                ),
                in_order(token),
                lambda i: f"documents {i * batch_size}-{(i + 1) * batch_size}",
            )
            features.update((key, rows.X) for key, rows in gathered(traced).items())
        result = {}
        for name in names:
            X = features[self.module.bank.key(name)]
            result[name] = X.reshape(len(ids), ids.shape[1], -1) if name in groups["token"] else X
        return result
