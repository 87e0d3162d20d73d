"""Tracing ahead for ProbeModule: the held-out slice and the first length window traced
together (lmprobe.tracing.ahead), and the missing training documents of a resumed run traced
in the batches that held them."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from lmprobe.data.dataset import (
    LengthGroupedBatches,
    ProbeDataset,
    loader_batch_size,
    trim_padding,
)
from lmprobe.probes.config import DEFAULT_CHUNK_ROWS
from lmprobe.tracing.ahead import TracedAhead
from lmprobe.tracing.features import (
    FeatureKey,
    Features,
    PendingFeatures,
    gather,
)
from lmprobe.tracing.loop import gathered, trace_batches

log = logging.getLogger("lmprobe")


class TraceAhead:
    """A part of ``ProbeModule``: its methods use the probemodule's state."""

    def can_trace_ahead(self, window: np.ndarray | None) -> bool:
        """Whether the first window ``window`` can be traced with the held-out slice: in
        one process without a feature store (several processes route each batch's rows
        between ranks; stored features are read, not traced)."""
        return (
            window is not None and len(window) > 0 and self.shards is None and self.features is None
        )

    def trace_ahead(
        self,
        dataset: ProbeDataset,
        batch_size: int,
        union: np.ndarray,
        window: np.ndarray,
        window_end: int,
        names: Sequence[str] | None = None,
    ) -> dict[FeatureKey, Features]:
        """Trace the held-out slice ``union`` and the first window's documents ``window``
        sorted by length together (``lmprobe.tracing.ahead``): returns the slice's rows, keeps the
        window's for its training batches. A resumed run calls this again for the window's
        rows (the same batches, so the same rows; the slice's are in its checkpoint)."""
        names = list(self.configs) if names is None else list(names)
        docs = np.concatenate([union, window])
        ahead = TracedAhead(window, window_end)
        # off the device a group's worth of batches at a time, as the training buffer does
        per_group = max(1, -(-DEFAULT_CHUNK_ROWS // batch_size))
        label = "batch {} of the held-out slice and first length window"
        parts = self._trace_parts(dataset.subset(docs), names, batch_size, label, None, per_group)
        heldout: dict[FeatureKey, Features] = {}
        for key, traced in parts.items():
            held = ahead.add(key, traced, docs, union)
            if held:  # checked for finite values as a trace's rows are
                heldout[key] = gather(held)
        self._ahead = ahead
        return heldout

    def keep_ahead(self, position: int, index: np.ndarray) -> None:
        """Keep the rows traced ahead of the batch at ``position`` (documents ``index``) as
        its features for later epochs (a resumed run: the batches before the interruption,
        which it does not trace again)."""
        keys = self.bank.keys_for(self.kept_names(sorted(self.bank.live)))
        if self._ahead is not None and keys and self._ahead.holds(index, keys):
            label = f"training batch {position}"
            self._remember(position, torch.from_numpy(index), self._ahead.take(index, keys, label))

    def kept_names(self, live: Sequence[str]) -> list[str]:
        """The probes a training batch is traced for: the ``live`` ones and, in a resumed
        run, those whose every first-epoch row the uninterrupted run kept (for their refit:
        ``refit_probes``)."""
        if not self.bank.resumed:
            return list(live)
        return sorted(set(live) | (set(self.configs) - self.bank.rows_dropped))

    def _complete_rows(self, dataset: ProbeDataset, rows: dict[FeatureKey, Features]) -> None:
        """Add to ``rows`` those of the training documents (the held-out slice aside) each
        probe not in ``bank.rows_dropped`` lacks, traced as the uninterrupted run traced them
        (``_trace_missing``)."""
        training = np.setdiff1d(np.arange(len(dataset)), self.bank.heldout_index)
        names = [n for n in self.configs if n not in self.bank.rows_dropped]
        missing: dict[FeatureKey, np.ndarray] = {}
        for key in self.bank.keys_for(names):
            kept = rows[key].doc if key in rows else np.empty(0, dtype=np.int64)
            lack = np.setdiff1d(training, kept)
            if len(lack):
                missing[key] = lack
        if not missing:
            return
        needed = [n for n in names if self.bank.key(n) in missing]
        extra = self._trace_missing(
            dataset, needed, np.unique(np.concatenate(list(missing.values())))
        )
        for key, lack in missing.items():
            if key not in extra:  # (a site another rank owns)
                continue
            more = extra[key]
            own = np.isin(more.doc, lack)
            more = Features(more.X[own], more.y[own], more.doc[own])
            rows[key] = Features.concat([rows[key], more]) if key in rows else more

    def _trace_missing(
        self, dataset: ProbeDataset, names: Sequence[str], missing: np.ndarray
    ) -> dict[FeatureKey, Features]:
        """Features of the training documents ``missing`` (a resumed run's, of the batches
        before the interruption): traced in the training batches that held them, as the
        uninterrupted run traced them (other batches pad them otherwise, which moves the
        activations' last bits); by length with other loaders."""
        loader = self.trainer.train_dataloader
        sampler = getattr(loader, "batch_sampler", None)
        if not isinstance(sampler, LengthGroupedBatches):
            batch_size = loader_batch_size(loader)
            extra = self.extract_dataset(dataset.subset(missing), names, batch_size, missing)
            return {key: Features(f.X, f.y, missing[f.doc]) for key, f in extra.items()}
        held: dict[int, np.ndarray] = {}  # by batch position: its documents among ``missing``
        for position in range(len(sampler)):
            index = sampler.batch(position)
            index = index[np.isin(index, missing)]
            if len(index):
                held[position] = index
        positions = list(held)
        loaded = (
            trim_padding(loader.collate_fn([dataset[int(i)] for i in index]))
            for index in held.values()
        )

        def trace(batch: dict[str, torch.Tensor], label: str) -> dict[FeatureKey, PendingFeatures]:
            return self.extract_shared(batch, names, label)

        return gathered(trace_batches(trace, loaded, lambda i: f"training batch {positions[i]}"))
