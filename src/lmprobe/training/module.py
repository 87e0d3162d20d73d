"""``ProbeModule``: the frozen LM under nnsight, as a Lightning module with no optimizer.

Like anomalib's frozen-backbone models it only *collects* in its steps: each step runs one
trace and returns the features of every probe; the callbacks fit and score the probes.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch

from lmprobe.bank.bank import ProbeBank
from lmprobe.data.dataset import (
    ProbeDataset,
    batches,
    trim_padding,
)
from lmprobe.errors import LmProbeError
from lmprobe.probes.config import ProbeConfig
from lmprobe.tracing.ahead import TracedAhead
from lmprobe.tracing.features import (
    FeatureKey,
    Features,
    PendingFeatures,
    gather,
    settle,
)
from lmprobe.tracing.loop import Tracer, collect, trace_batches
from lmprobe.tracing.models import check_submodules, forward_order, torch_module
from lmprobe.tracing.store import FeatureSource, StoredFeatures
from lmprobe.training.ahead import TraceAhead
from lmprobe.training.distributed import Shards, sync_bank, sync_live, sync_scores

log = logging.getLogger("lmprobe")

# Having no optimizer is the design here, not a mistake worth a warning on every run.
warnings.filterwarnings("ignore", message=r".*configure_optimizers.* returned `None`")
# Batches stay on the host by design (see ProbeModule.transfer_batch_to_device).
warnings.filterwarnings("ignore", message=r".*overridden `transfer_batch_to_device`")

NONFINITE_POLICIES = ("error", "skip")


def available_memory_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


class ProbeModule(TraceAhead, L.LightningModule):
    """Holds the frozen LM and the probe bank; one nnsight trace per batch for all probes."""

    def __init__(
        self,
        model: Any,
        probes: Sequence[ProbeConfig],
        seed: int = 0,
        remote: bool = False,
        on_nonfinite: str = "error",
        feature_cache_fraction: float = 0.5,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False  # no optimizer: probes learn in callbacks
        self.bank = ProbeBank(probes, seed=seed)
        configs = list(self.bank.configs.values())
        if on_nonfinite not in NONFINITE_POLICIES:
            raise LmProbeError(
                f"on_nonfinite={on_nonfinite!r} is not one of {', '.join(NONFINITE_POLICIES)}"
            )
        self.seed = seed
        self.feature_cache_fraction = feature_cache_fraction
        sites = [c.submodule for c in configs]
        check_submodules(model, sites)
        torch_module(model).eval().requires_grad_(False)
        # the order measured now (one short forward) unless the model is a frame without weights
        frame = any(p.device.type == "meta" for p in torch_module(model).parameters())
        order = None if frame else forward_order(model, sites)
        # The LM in a plain attribute, not a registered submodule: its weights stay out of
        # checkpoints and Lightning never moves it; its own device placement is kept.
        self.tracer = Tracer(model, sites, remote=remote, on_nonfinite=on_nonfinite, order=order)
        # The feature store (lmprobe.tracing.store): ``feature_source`` fills ``features`` (one
        # ``StoredFeatures`` per split) before training; steps then read rows from it
        # instead of tracing. With the store, ``model`` may be a frame without weights
        # (``models.model_frame``): it never traces then.
        self.feature_source: FeatureSource | None = None
        self.features: dict[str, StoredFeatures] | None = None
        # Under trainer.strategy=ddp: this rank's share of each batch and its probes
        # (lmprobe.training.distributed); None in a one-process run.
        self.shards: Shards | None = None
        self.reset_probes()

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        self.shards = None
        if trainer.world_size > 1:
            sites = [c.submodule for c in self.configs.values()]
            self.shards = Shards(trainer.global_rank, trainer.world_size, sites)

    @property
    def lm(self) -> Any:
        return self.tracer.lm

    @property
    def remote(self) -> bool:
        return self.tracer.remote

    @property
    def on_nonfinite(self) -> str:
        return self.tracer.on_nonfinite

    @property
    def order(self) -> dict[str, int]:
        """Every probed site's rank in the forward pass (for a frame without weights, at
        the first trace, which a frame cannot run: an error then)."""
        return self.tracer.order

    def prepare_features(self, datamodule: Any) -> None:
        """Before training: every split's features from the store, the missing ones traced
        into it first (a no-op without a store)."""
        if self.feature_source is None:
            return
        splits = {s: getattr(datamodule, f"{s}_set", None) for s in ("train", "val", "test")}
        for dataset in splits.values():  # the one-line label errors of the first batch
            if dataset is not None:
                self.bank.check_labels(dataset.labels[:1], list(self.configs))
        self.features = self.feature_source.prepare(
            splits,
            self.bank.keys_for(list(self.configs)),
            batch_size=getattr(datamodule, "batch_size", None) or 8,
        )
        if any(stored.traced for stored in self.features.values()):
            # a frame without weights cannot trace
            self.tracer = self.tracer.on(self.feature_source.load_model())

    @property
    def configs(self) -> dict[str, ProbeConfig]:
        return self.bank.configs

    def reset_probes(self) -> None:
        """Fresh, unfitted probes and no kept features (a new fit starts from here)."""
        self.bank.reset()
        self._train_cache: (
            dict[int, tuple[torch.Tensor, dict[FeatureKey, PendingFeatures]]] | None
        ) = {}
        self._eval_cache: dict[tuple[str, int], tuple[torch.Tensor, dict]] = {}
        self._cache_checked = False
        # the first length window's rows, traced with the held-out slice (lmprobe.tracing.ahead)
        self._ahead: TracedAhead | None = None

    # ----------------------------------------------------------------- features
    def extract(
        self,
        batch: dict[str, torch.Tensor],
        names: Sequence[str],
        label: str = "batch",
        all_positions: bool = False,
        split: str = "train",
        docs: np.ndarray | None = None,
    ) -> dict[FeatureKey, PendingFeatures]:
        """One trace for the features of ``names``; they may still be on the device. With
        the store's features of ``split``, its rows instead: ``docs`` are the split's rows
        of the batch's documents (None: ``batch["index"]``)."""
        self.bank.check_labels(batch["labels"], names)
        keys = self.bank.keys_for(names)
        stored = (self.features or {}).get(split)
        if self.features is not None and (stored is None or not stored.covers(keys)):
            raise LmProbeError(
                f"feature store: no stored features of the {split} split for {label} "
                f"(an lmprobe bug: please report it; feature_store=false avoids the store)"
            )
        # keys the store could not take (or every key, without a store) are traced
        traced = keys if stored is None else [k for k in keys if not stored.has([k])]
        features = {}
        if traced:
            features = self.tracer(batch, traced, label, all_positions)
        if stored is None:
            return features
        index = batch["index"].numpy()
        rows = index if docs is None else docs
        return {
            key: features[key]
            if key in features
            else stored.features(key, rows, index, label, self.on_nonfinite)
            for key in keys
        }

    def extract_shared(
        self,
        batch: dict[str, torch.Tensor],
        names: Sequence[str],
        label: str = "batch",
        split: str = "train",
        docs: np.ndarray | None = None,
    ) -> dict[FeatureKey, PendingFeatures]:
        """``extract`` of a global batch: in a multi-process run this rank traces its share
        and gets back the rows of every rank for the sites it owns (``Shards.route``)."""
        if self.shards is None:
            return self.extract(batch, names, label, split=split, docs=docs)
        share = self.shards.share(batch)
        features = {}
        if share is not None:
            if docs is not None:  # the share's rows of the split (the feature store's)
                docs = docs[slice(*self.shards.bounds(len(batch["index"])))]
            features = self.extract(share, names, label, split=split, docs=docs)
        return self.shards.route(features, label)

    def sync_live(self) -> None:
        """Multi-process: every rank learns which probes their owners still train."""
        if self.shards is not None:
            sync_live(self.bank, self.shards)

    def sync_bank(self) -> None:
        """Multi-process: every probe's trained state, from its owner, on every rank."""
        if self.shards is not None:
            sync_bank(self.bank, self.shards)

    def sync_scores(self, stage: str) -> None:
        """Multi-process: every probe's scores of ``stage``, from its owner, on rank 0."""
        if self.shards is not None:
            sync_scores(self.bank, stage, self.shards)

    def extract_dataset(
        self,
        dataset: ProbeDataset,
        names: Sequence[str],
        batch_size: int = 8,
        rows: np.ndarray | None = None,
    ) -> dict[FeatureKey, Features]:
        """Features of a whole dataset (the early-stopping slice is traced this way);
        ``rows``: the training-set row of each of its documents (it is a subset)."""
        parts = self._trace_parts(dataset, names, batch_size, "batch {}", rows)
        return {key: gather(p) for key, p in parts.items()}

    def _trace_parts(
        self,
        dataset: ProbeDataset,
        names: Sequence[str],
        batch_size: int,
        label: str,
        rows: np.ndarray | None = None,
        offload_every: int = 0,
    ) -> dict[FeatureKey, list[PendingFeatures]]:
        """Every batch's features of ``dataset``, traced longest first, per key (``label``
        with the batch number in it names each batch); ``offload_every`` batches, those
        traced since move to host memory as they are (``lmprobe.tracing.loop.offload``)."""

        def trace(batch: dict[str, torch.Tensor], name: str) -> dict[FeatureKey, PendingFeatures]:
            docs = None if rows is None else rows[batch["index"].numpy()]
            return self.extract_shared(batch, names, name, docs=docs)

        loader = batches(dataset, batch_size, by_length=True)
        return collect(trace_batches(trace, loader, label, offload_every))

    def prepare_heldout(
        self,
        dataset: ProbeDataset,
        batch_size: int,
        seed: int | None,
        window: np.ndarray | None = None,
        window_end: int = -1,
    ) -> None:
        """Trace the early-stopping rows once, before training, and hand them to the bank.
        ``window``: the first length window's training documents (whose last batch is at
        ``window_end``), traced sorted by length together with the slice when it can be
        (``trace_ahead``), else the slice is traced on its own."""
        union = self.bank.heldout_plan(len(dataset), seed)
        features: dict[FeatureKey, Features] = {}
        if len(union) and self.can_trace_ahead(window):
            features = self.trace_ahead(dataset, batch_size, union, window, window_end)
        elif len(union):
            features = self.extract_dataset(
                dataset.subset(union), list(self.configs), batch_size, rows=union
            )
            for key, rows in features.items():  # subset rows back to training-set rows
                features[key] = Features(rows.X, rows.y, union[rows.doc])
        self.bank.set_heldout(union, len(dataset), features)

    # ------------------------------------------------------------------ steps
    def configure_optimizers(self) -> None:
        return None

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        # Batches stay on the host: labels and document indices are only ever used there,
        # and trace_features moves the two tensors the LM reads to the LM's own input device
        # (which need not be Lightning's root device under a device_map).
        return batch

    def on_train_end(self) -> None:
        self._ahead = None  # a run that stopped within its first window

    def on_train_epoch_end(self) -> None:
        self._ahead = None  # (a first window that is the whole epoch)
        # Kept features of a probe that stopped mid-chunk were never gathered: bring them to
        # the host now, so the cache holds no device memory.
        if self._train_cache:
            parts = [f for _, features in self._train_cache.values() for f in features.values()]
            settle(parts)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> Any:
        live = self.bank.live_names()  # (a window training on the worker: its probes)
        if not live:
            self.bank.drop_rows(self.configs)
            return None
        if len(self.bank.heldout_index):
            keep = ~torch.isin(batch["index"], torch.from_numpy(self.bank.heldout_index))
            if not bool(keep.any()):
                return None
            if not bool(keep.all()):
                batch = trim_padding({k: v[keep] for k, v in batch.items()})
        if self.bank.online_pass:  # the stopped probes miss this batch's rows
            traced = set(self.bank.keys_for(live))
            self.bank.drop_rows(n for n in self.configs if self.bank.key(n) not in traced)
        live = self.kept_names(live)
        # The batch's place in the epoch, counted by the bank: after a mid-epoch resume
        # Lightning's batch_idx can be one behind it (the interrupted batch).
        position = self.bank.epoch_batches
        cached = self._train_cache.get(position) if self._train_cache is not None else None
        ahead = self._ahead
        if ahead is not None and position > ahead.last_position:
            ahead = self._ahead = None  # the first window has passed: free its rows
        index = batch["index"].numpy()
        if cached is not None and torch.equal(cached[0], batch["index"]):
            features = cached[1]
        elif ahead is not None and ahead.holds(index, keys := self.bank.keys_for(live)):
            features = ahead.take(index, keys, f"training batch {position}")
            self._remember(position, batch["index"], features)
        else:
            features = self.extract_shared(batch, live, f"training batch {position}")
            self._remember(position, batch["index"], features)
        return {"features": features}

    def _remember(
        self, position: int, index: torch.Tensor, features: dict[FeatureKey, PendingFeatures]
    ) -> None:
        """Keep the features of the batch at ``position`` of the epoch so later epochs skip
        the LM and the probes' final fits, refits and code lengths learn from them, if
        they fit in memory: the first epoch's, and in any epoch those of a batch not kept
        yet (a run resumed mid-epoch). A one-epoch run keeps them only for those."""
        if self._train_cache is None or self.trainer is None or position in self._train_cache:
            return
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and 0 <= max_epochs <= 1 and not self.bank.uses_kept_rows():
            return
        if not self._cache_checked:
            self._cache_checked = True
            per_batch = sum(f.nbytes for f in features.values())
            n_batches = self.trainer.num_training_batches
            need = per_batch * (n_batches if np.isfinite(n_batches) else 1)
            budget = self.feature_cache_fraction * available_memory_bytes()
            fits = need <= budget
            if self.shards is not None:  # every rank keeps them, or none (same steps)
                fits = self.shards.agree(fits)
            if not fits:
                log.warning(
                    "pooled training features would need %.1f GiB (budget %.1f GiB): not "
                    "keeping them, so every epoch re-runs the model and no probe is refitted",
                    need / 2**30,
                    budget / 2**30,
                )
                self._train_cache = None
                return
        self._train_cache[position] = (index.clone(), features)

    def refit_probes(self, background: bool = False) -> list[str]:
        """Refit each probe with a held-out slice on all training rows (``ProbeBank.refit``),
        from the features kept in the first epoch. Returns the probes refitted (none:
        ``background``, the refits then run on the bank's worker thread)."""
        if not self._train_cache:
            return []
        parts: dict[FeatureKey, list[PendingFeatures]] = {}
        for _, features in self._train_cache.values():
            for key, rows in features.items():
                parts.setdefault(key, []).append(rows)
        dataset = self.trainer.train_dataloader.dataset
        rows = {key: gather(p) for key, p in parts.items()}
        if not rows:  # a rank that owns no site (more ranks than sites)
            return []
        # A resumed run traces, for each probe the uninterrupted run refits (every batch of
        # a whole first epoch was traced for it), the documents whose rows it did not keep
        # (those of the batches before the interruption). A probe that stopped in the first
        # epoch is left as trained, as then: no extra pass over the data.
        first = self.trainer.num_training_batches
        if self.bank.resumed and not (self.bank.online_pass and self.bank.epoch_batches < first):
            self._complete_rows(dataset, rows)
        given = [(n, rows[self.bank.key(n)]) for n in self.configs if self.bank.key(n) in rows]
        return self.bank.refit_all(given, len(dataset), background)

    def _eval_step(self, stage: str, batch: dict[str, torch.Tensor], batch_idx: int) -> Any:
        cached = self._eval_cache.get((stage, batch_idx))
        if cached is not None and torch.equal(cached[0], batch["index"]):
            return {"features": cached[1]}
        features = self.extract_shared(
            batch, list(self.configs), f"{stage} batch {batch_idx}", split=stage
        )
        if stage == "val":  # the validation set is scored every epoch: trace it once
            self._eval_cache[(stage, batch_idx)] = (batch["index"].clone(), features)
        return {"features": features}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> Any:
        return self._eval_step("val", batch, batch_idx)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> Any:
        return self._eval_step("test", batch, batch_idx)

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lmprobe"] = self.bank.checkpoint_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "lmprobe" not in checkpoint:
            raise LmProbeError("this checkpoint was not written by lmprobe (no probe state)")
        self.bank.load_state_dict(checkpoint["lmprobe"])
