"""Checkpoints: the bank's state as tensors and plain values, and the fingerprint a
resumed run must match."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import torch

from lmprobe.bank.record import records_from_state, records_to_state
from lmprobe.bank.rows import from_tensors, to_tensors
from lmprobe.errors import LmProbeError
from lmprobe.tracing.features import PendingFeatures, gather

log = logging.getLogger("lmprobe")

# ``ProbeConfig`` fields added after checkpoints were written, with their defaults: left out
# of the probes' fingerprint at the default, so those checkpoints still resume.
ADDED_FIELDS = {"code_length": True}


class Checkpoints:
    """A part of ``ProbeBank`` (``lmprobe.bank.bank``): its methods use the bank's state."""

    def snapshot_for_resume(self) -> None:
        """Keep the state as it is now, buffered training rows included, for the checkpoint
        of an interrupted run (see ``_resume_state``)."""
        self.wait()
        self._resume_state = self.state_dict(buffered=True)

    def checkpoint_state(self) -> dict[str, Any]:
        return self._resume_state if self._resume_state is not None else self.state_dict()

    def fingerprint_of(self, dataset: Any) -> dict[str, str]:
        """Hashes of the training data (tokens, labels), the probe configs and the label set."""
        import hashlib

        def digest(*parts: Any) -> str:
            h = hashlib.sha256()
            for part in parts:
                if isinstance(part, torch.Tensor):
                    part = part.contiguous().numpy().tobytes()
                h.update(part if isinstance(part, bytes) else str(part).encode())
            return h.hexdigest()[:16]

        configs = {n: dataclasses.asdict(c) for n, c in self.configs.items()}
        for config in configs.values():  # fields added later, at their default: as before
            for field, default in ADDED_FIELDS.items():
                if config.get(field) == default:
                    config.pop(field)
        classes = sorted({str(c.classes) for c in self.configs.values()})
        return {
            "data": digest(*dataset.digest_parts()),
            "probes": digest(json.dumps(configs, sort_keys=True, default=str), self.seed),
            "labels": digest(*classes),
        }

    def check_resume(self, state: dict[str, Any], source: str) -> None:
        """Refuse a checkpoint written for other data, probes or labels, naming what differs."""
        theirs = json.loads(state["plain"]).get("fingerprint", {}) if "plain" in state else {}
        differ = [k for k, v in self.fingerprint.items() if theirs.get(k, v) != v]
        if not theirs or differ:
            what = ", ".join(differ) if theirs else "no fingerprint"
            raise LmProbeError(
                f"{source} was written by another run ({what} differ); resume with the same "
                f"data, probes and labels, or start afresh without ckpt_path"
            )

    def state_dict(self, buffered: bool = False) -> dict[str, Any]:
        """Tensors and plain values only (no pickled objects). ``buffered``: also the
        training rows waiting in the buffer (an interrupted run's checkpoint). The records'
        parts are derived from their fields (``lmprobe.bank.record``)."""
        self.wait()
        sections, plain = records_to_state(self._records)
        plain.update(
            prepared=self.prepared,
            online_pass=self.online_pass,
            epoch_batches=self.epoch_batches,
            fingerprint=self.fingerprint,
        )
        waiting = {}
        if buffered:
            for name in self._train_rows.names():
                rows = gather(self._train_rows.parts[name], drop_failed=True)
                waiting[name] = to_tensors(rows)
        return {
            "buffered": waiting,
            **sections,
            "heldout_index": torch.from_numpy(self.heldout_index),
            "plain": json.dumps(plain),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wait()
        missing = sorted(set(self.configs) - set(state["probes"]))
        if missing:
            raise LmProbeError(
                f"the checkpoint has no probe {missing[0]!r}; it was written for other probes"
            )
        plain = json.loads(state["plain"])
        self._fresh_records()
        records_from_state(self._records, state, plain)
        self.heldout_index = state["heldout_index"].numpy()
        self.prepared = plain["prepared"]
        self.online_pass = plain["online_pass"]
        self.epoch_batches = int(plain.get("epoch_batches", 0))
        self.resumed = True
        self._train_rows.clear()
        for name, rows in state.get("buffered", {}).items():
            X, y, doc = from_tensors(rows)
            self._train_rows.add(name, PendingFeatures(torch.from_numpy(X), y, doc), None)
