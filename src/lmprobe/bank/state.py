"""The probes' records (``lmprobe.bank.record``): fresh ones, the read-only views others
read, and their state across processes (DDP): what each probe's owner knows and the others
need for the tables and outputs, and which probes still train."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from lmprobe.bank.record import FIELDS, Kept, ProbeRecord, view_value
from lmprobe.probes.base import make_probe

log = logging.getLogger("lmprobe")


class ProbeState:
    """A part of ``ProbeBank``: its methods use the probebank's state.

    The bank's one writer of the records is its own methods; everyone else reads a view:
    ``bank.<key>`` for every field of ``ProbeRecord`` (``probes``, ``steps``, ``history``,
    ...), a read-only mapping by probe name (a frozenset of names for a flag kept as names,
    ``live``, ``rows_dropped``)."""

    _records: dict[str, ProbeRecord]

    def _fresh_records(self, keep: Mapping[str, ProbeRecord] | None = None) -> None:
        """A fresh record per probe. ``keep``: earlier records whose probe objects stay the
        same objects, refreshed in place (lm_probe's ``runner[name]`` taken before a fit is
        the trained probe afterwards)."""
        records = {}
        for name, config in self.configs.items():
            probe = make_probe(config, self.seed)
            old = keep.get(name) if keep else None
            if old is not None and type(old.probe) is type(probe):
                old.probe.__dict__.clear()
                old.probe.__dict__.update(probe.__dict__)
                probe = old.probe
            records[name] = ProbeRecord(probe=probe)
        self._records = records

    def probe_state(self, names: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The synced fields (``Kept.sync``) of the probes ``names``, by field."""
        return {
            field: {n: getattr(self._records[n], field) for n in names}
            for field, how in FIELDS
            if how.sync
        }

    def merge_probe_state(self, state: dict[str, dict[str, Any]]) -> None:
        """Take another process's ``probe_state`` of its probes."""
        for field, values in state.items():
            for name, value in values.items():
                setattr(self._records[name], field, value)

    def set_live(self, names: set[str]) -> None:
        """The probes that still train (several processes: as their owners decided)."""
        for name, record in self._records.items():
            record.live = name in names


def _view(bank: ProbeState, field: str, how: Kept) -> Any:
    values = {name: getattr(record, field) for name, record in bank._records.items()}
    if how.names:
        return frozenset(name for name, value in values.items() if value)
    return MappingProxyType(
        {name: view_value(value) for name, value in values.items() if value is not None}
    )


def _add_views() -> None:
    for field, how in FIELDS:

        def get(bank: ProbeState, field: str = field, how: Kept = how) -> Any:
            return _view(bank, field, how)

        get.__doc__ = f"Read-only: each probe's ``{field}`` (``ProbeRecord``)."
        setattr(ProbeState, how.key, property(get))


_add_views()
