"""A probe's state across processes (DDP): what each probe's owner knows and the others\nneed for the tables and outputs, and which probes still train."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("lmprobe")


class ProbeState:
    """A part of ``ProbeBank``: its methods use the probebank's state."""

    # What a probe's owner knows that the other processes need for the tables and outputs.
    PER_PROBE = (
        "probes",
        "stopped_early",
        "steps",
        "best_loss",
        "best_step",
        "history",
        "code_bits",
        "uniform_bits",
        "class_counts",
        "refitted",
    )

    def probe_state(self, names: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The ``PER_PROBE`` state of the probes ``names``, by field."""
        return {field: {n: getattr(self, field)[n] for n in names} for field in self.PER_PROBE}

    def merge_probe_state(self, state: dict[str, dict[str, Any]]) -> None:
        """Take another process's ``probe_state`` of its probes."""
        for field, values in state.items():
            getattr(self, field).update(values)

    def set_live(self, names: set[str]) -> None:
        """The probes that still train (several processes: as their owners decided)."""
        self.live = set(names)
