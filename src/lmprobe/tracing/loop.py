"""The trace loop: batches of documents through the model under nnsight, each batch's
features (``trace_features``) yielded with it.

Every pass over documents runs here: a training or scoring step (one batch, ``Tracer``), a
dataset traced before training (the held-out slice, a resumed run's missing documents), the
feature store's fill, ``ProbeRunner.get_probe_features`` and ``FeatureExtractor``. What they
differ in is an argument: where the batches come from, the trace of one batch (``Tracer``
itself, or the module's, which reads stored rows and shares batches between ranks), how a
batch is named in errors, and whether the rows move to the host as they come.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from lmprobe.tracing.features import (
    FeatureKey,
    Features,
    PendingFeatures,
    by_device,
    gather,
    host_blocks,
    trace_features,
)
from lmprobe.tracing.models import forward_order, forward_parameters

Batch = dict[str, torch.Tensor]
BatchFeatures = dict[FeatureKey, PendingFeatures]
#: One batch's trace: ``trace(batch, label)``, ``label`` naming the batch in errors.
BatchTrace = Callable[[Batch, str], BatchFeatures]


class Tracer:
    """A model ready to be traced at ``sites``: where the forward passes each (measured at
    the first trace unless ``order`` is given), the parameters its forward takes, whether it
    runs remotely and what a row that is not finite does (``on_nonfinite``)."""

    def __init__(
        self,
        lm: Any,
        sites: Iterable[str],
        *,
        remote: bool = False,
        on_nonfinite: str = "error",
        order: dict[str, int] | None = None,
    ) -> None:
        self.lm = lm
        self.sites = list(dict.fromkeys(sites))
        self.remote = remote
        self.on_nonfinite = on_nonfinite
        self.forward_takes = forward_parameters(lm)
        self._order = order

    @property
    def order(self) -> dict[str, int]:
        if self._order is None:
            self._order = forward_order(self.lm, self.sites)
        return self._order

    def __call__(
        self, batch: Batch, keys: Iterable[FeatureKey], label: str = "", all_positions: bool = False
    ) -> BatchFeatures:
        """One trace of ``batch`` for ``keys`` (``trace_features``)."""
        return trace_features(
            self.lm,
            batch,
            keys,
            self.order,
            forward_takes=self.forward_takes,
            remote=self.remote,
            batch_label=label,
            on_nonfinite=self.on_nonfinite,
            all_positions=all_positions,
        )

    def on(self, lm: Any) -> Tracer:
        """This tracer for ``lm``, the same model loaded anew (a frame's weights): the
        order, once measured, is kept."""
        return type(self)(
            lm, self.sites, remote=self.remote, on_nonfinite=self.on_nonfinite, order=self._order
        )

    def of(self, keys: Iterable[FeatureKey], all_positions: bool = False) -> BatchTrace:
        """The trace of one batch for ``keys``, for ``trace_batches``."""
        keys = list(keys)
        return lambda batch, label: self(batch, keys, label, all_positions)


def trace_batches(
    trace: BatchTrace,
    batches: Iterable[Batch],
    label: str | Callable[[int], str] = "batch {}",
    offload_every: int = 0,
) -> Iterator[tuple[Batch, BatchFeatures]]:
    """Each batch of ``batches`` with its features, ``trace(batch, name)``: ``name`` is
    ``label`` formatted with the batch's number (or ``label(number)``). Every
    ``offload_every`` batches, the features traced since move to host memory as they are
    (``offload``); otherwise they stay where the trace left them."""
    recent: list[PendingFeatures] = []
    for i, batch in enumerate(batches):
        features = trace(batch, label.format(i) if isinstance(label, str) else label(i))
        yield batch, features
        if offload_every:
            recent.extend(features.values())
            if (i + 1) % offload_every == 0:
                offload(recent)
                recent = []


def collect(
    traced: Iterable[tuple[Batch, BatchFeatures]],
) -> dict[FeatureKey, list[PendingFeatures]]:
    """Each key's features of ``traced`` (``trace_batches``), one part per batch."""
    parts: dict[FeatureKey, list[PendingFeatures]] = {}
    for _, features in traced:
        for key, rows in features.items():
            parts.setdefault(key, []).append(rows)
    return parts


def gathered(traced: Iterable[tuple[Batch, BatchFeatures]]) -> dict[FeatureKey, Features]:
    """Each key's rows of ``traced`` on the host, concatenated (``gather``)."""
    return {key: gather(parts) for key, parts in collect(traced).items()}


def offload(parts: Sequence[PendingFeatures]) -> None:
    """Move the matrices of ``parts`` to host memory as they are (one copy per device; not
    yet checked for finite values: that happens when their rows are used)."""
    for (device, _), waiting in by_device(parts).items():
        if device.type == "cpu":
            continue
        for part, block in zip(waiting, host_blocks([p.X for p in waiting]), strict=True):
            part.X = torch.from_numpy(block)
