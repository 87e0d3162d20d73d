"""``ProbeRecord``: one probe's state in the bank, one field each, and what is derived from
its fields: a fresh record (reset), the checkpoint's per-probe parts, what DDP ranks exchange,
the read-only views and the metrics table's columns.

Each field's metadata (``kept``) says how it travels; a new field is one line here."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from lmprobe.bank.rows import from_tensors, to_tensors
from lmprobe.probes.base import Probe, probe_from_tensors, probe_to_tensors
from lmprobe.tracing.features import Features

KEPT = "lmprobe.kept"


@dataclasses.dataclass(frozen=True)
class Kept:
    """How a record's field travels.

    ``key``: its name in checkpoints and the bank's views (default: the field's name).
    ``names``: a flag kept as the sorted names of the probes where it is true (a set in
    the views). ``tensors``: kept in the checkpoint's tensor section ``key`` as
    ``save(value)`` (a dict of tensors), read with ``load(tensors, name)``; a None value is
    left out (of the section and the views). Otherwise kept in the plain JSON part as
    ``{name: save(value)}``, read with ``load``. ``older``: the value, from the record, when
    a checkpoint from before the field lacks it (None: the field's default). ``sync``: sent
    from the probe's owner to every DDP rank after training. ``column``: the metrics
    table's column (``to_column(value)``), in the order of the fields."""

    key: str = ""
    names: bool = False
    tensors: bool = False
    save: Callable[[Any], Any] | None = None
    load: Callable[..., Any] | None = None
    older: Callable[[ProbeRecord], Any] | None = None
    sync: bool = True
    column: str = ""
    to_column: Callable[[Any], Any] | None = None


def kept(default: Any = dataclasses.MISSING, **how: Any) -> Any:
    """A record field: ``default`` (a callable: a fresh value per record) and its ``Kept``."""
    factory = default if callable(default) else dataclasses.MISSING
    value = dataclasses.MISSING if callable(default) else default
    return dataclasses.field(default=value, default_factory=factory, metadata={KEPT: Kept(**how)})


def _probe_tensors(probe: Probe) -> dict[str, Any]:
    arrays, header = probe_to_tensors(probe)
    return {
        "arrays": {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()},
        "header": header,
    }


def _probe_from(tensors: dict[str, Any], name: str) -> Probe:
    arrays = {k: v.numpy() for k, v in tensors["arrays"].items()}
    return probe_from_tensors(arrays, tensors["header"], source=f"checkpoint probe {name!r}")


def _heldout_from(tensors: dict[str, torch.Tensor], name: str) -> Features:
    return from_tensors(tensors)


@dataclasses.dataclass(kw_only=True, eq=False)
class ProbeRecord:
    """One probe's state. Only the bank writes it; others read the bank's views."""

    # (the fields with a table column come in the table's order)
    # training batches the probe has consumed (its early-stopping clock)
    steps: int = kept(0, column="steps")
    stopped_early: bool = kept(False, column="stopped_early", to_column=bool)
    probe: Probe = kept(
        key="probes",
        tensors=True,
        save=_probe_tensors,
        load=_probe_from,
        column="alpha",
        to_column=lambda probe: getattr(probe, "alpha_", float("nan")),
    )
    # refitted on every training row once the held-out slice chose (``Refitting.refit``);
    # (a checkpoint from before this was recorded: refit, as then)
    refitted: bool = kept(False, column="refit", to_column=bool)
    # still trains (several processes: as its owner decided, ``set_live``)
    live: bool = kept(True, names=True, sync=False)
    best_loss: float = kept(math.inf, save=float)  # the best held-out loss so far
    best_step: int = kept(0)
    # (step, held-out loss) after every update of a probe that stops early
    history: list[tuple[int, float]] = kept(
        list, save=lambda h: [list(p) for p in h], load=lambda h: [tuple(p) for p in h]
    )
    # the online code length when training ends, and the uniform code's (0: not known)
    code_bits: float = kept(0.0)
    uniform_bits: float = kept(0.0)
    # the training classes counted in the first epoch (the majority baseline)
    class_counts: np.ndarray = kept(lambda: np.zeros(0), save=lambda a: a.tolist(), load=np.asarray)
    # some first-epoch training batch was traced without it (``drop_rows``); a checkpoint
    # from before this was recorded: those that had stopped
    rows_dropped: bool = kept(False, names=True, sync=False, older=lambda record: not record.live)
    # steps counted since it last trained (the batches its buffered rows hold)
    steps_buffered: int = kept(0, load=int, sync=False)
    # its slice of the training rows held out for early stopping (never trained on)
    heldout: Features | None = kept(
        None, tensors=True, save=to_tensors, load=_heldout_from, sync=False
    )

    def columns(self) -> dict[str, Any]:
        """The metrics table's columns from this record."""
        return {
            how.column: how.to_column(value) if how.to_column else value
            for field, how, value in self._kept()
            if how.column
        }

    def _kept(self) -> Iterator[tuple[str, Kept, Any]]:
        for field in dataclasses.fields(self):
            yield field.name, field.metadata[KEPT], getattr(self, field.name)


def how_kept() -> list[tuple[str, Kept]]:
    """(field name, its ``Kept`` with ``key`` filled in), in the fields' order."""
    found = []
    for field in dataclasses.fields(ProbeRecord):
        how = field.metadata[KEPT]
        found.append((field.name, how if how.key else dataclasses.replace(how, key=field.name)))
    return found


FIELDS = how_kept()


def view_value(value: Any) -> Any:
    """A value as the bank's views give it: lists as tuples, arrays read-only."""
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, np.ndarray):
        value = value.view()
        value.flags.writeable = False
    return value


def records_to_state(records: dict[str, ProbeRecord]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The records' checkpoint parts: (tensor sections, plain values), by key."""
    sections: dict[str, Any] = {}
    plain: dict[str, Any] = {}
    for field, how in FIELDS:
        values = {name: getattr(record, field) for name, record in records.items()}
        if how.names:
            plain[how.key] = sorted(name for name, value in values.items() if value)
        elif how.tensors:
            sections[how.key] = {n: how.save(v) for n, v in values.items() if v is not None}
        else:
            plain[how.key] = {n: how.save(v) if how.save else v for n, v in values.items()}
    return sections, plain


def records_from_state(
    records: dict[str, ProbeRecord], state: dict[str, Any], plain: dict[str, Any]
) -> None:
    """Set fresh records' fields from a checkpoint's tensor sections (``state``) and plain
    values; what the checkpoint lacks gets its ``older`` value, else keeps its default."""
    for field, how in FIELDS:
        for name, record in records.items():
            if how.tensors:
                found = name in state.get(how.key, {})
                value = how.load(state[how.key][name], name) if found else None
            elif how.names:
                found = how.key in plain
                value = found and name in plain[how.key]
            else:
                found = name in plain.get(how.key, {})
                value = plain[how.key][name] if found else None
                value = how.load(value) if found and how.load else value
            if found:
                setattr(record, field, value)
            elif how.older is not None:
                setattr(record, field, how.older(record))
