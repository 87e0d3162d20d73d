"""torchmetrics internals lmprobe relies on: a metric's private ``_to_sync`` flag, set with
``sync_on_compute`` so that a metric computes on this process's rows only (under DDP lmprobe
routes each probe's rows to the process that owns it; torchmetrics would add the other
ranks' states again). ``check()`` lists what an installed torchmetrics lacks."""

from __future__ import annotations

import torchmetrics

TESTED = ("1.9",)  # major.minor releases checked (tests/test_integrations.py)


def local_only(metric: torchmetrics.Metric) -> torchmetrics.Metric:
    """``metric`` computes on its own states, never synced across processes."""
    metric.sync_on_compute = metric._to_sync = False
    return metric


def check() -> list[str]:
    """The internals lmprobe uses that the installed torchmetrics lacks (empty: all there)."""
    metric = torchmetrics.MeanMetric()
    return [] if hasattr(metric, "_to_sync") else ["Metric._to_sync"]
