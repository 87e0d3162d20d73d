"""``PackedDataset``: tokenized documents kept unpadded in a file on disk, for data larger
than memory.

The token ids of every document lie end to end in one flat int32 file (``TokenStore``);
memory holds three numbers per document (where its tokens start, how many there are, its
label), so a million short documents cost some 20 MB whatever their length. Each item is
read from the file when a batch asks for it (``os.pread``: nothing is mapped into the
process, so the file's pages count as the system's cache, not as this process's memory),
and ``collate`` pads a batch to its own longest document on the tokenizer's padding side:
exactly the batch that padding every document to the longest of all and trimming the
columns that are padding in every row (``lmprobe.data.dataset.pad_to_longest``) gives.

The data module builds these from data files (``lmprobe.data.streaming``); ``ProbeDataset``
(padded tensors in memory) stays the type of the Python API and of word-level data.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lmprobe.data.dataset import ProbeDataset, check_documents
from lmprobe.errors import LmProbeError

#: Bytes of one stored token id (int32: every vocabulary has fewer than 2**31 entries).
TOKEN_BYTES = 4


def _remove(path: str, fd: int, owner: int) -> None:
    # only the process that made the file removes it (DataLoader workers are forked copies)
    if os.getpid() != owner:
        return
    try:
        os.close(fd)
    except OSError:
        pass
    try:
        os.unlink(path)
    except OSError:
        pass


class TokenStore:
    """Token ids appended end to end to a temporary file (in ``directory``, default the
    system's temporary directory: ``$TMPDIR``), removed when the store is garbage collected
    or the process exits. Readable from DataLoader workers (forked or spawned)."""

    def __init__(self, directory: str | None = None) -> None:
        fd, self.path = tempfile.mkstemp(prefix="lmprobe-tokens-", suffix=".bin", dir=directory)
        self._fd, self._pid = fd, os.getpid()
        self.tokens = 0  # ids written so far
        self._digest: str | None = None
        self._finalizer = weakref.finalize(self, _remove, self.path, fd, self._pid)

    def append(self, ids: np.ndarray) -> int:
        """Write ``ids`` after the last ones; returns the position of the first."""
        data = np.ascontiguousarray(ids, dtype=np.int32).tobytes()
        written = 0
        while written < len(data):  # os.write may write less than asked (large writes)
            written += os.pwrite(self._fd, data[written:], self.tokens * TOKEN_BYTES + written)
        start, self.tokens = self.tokens, self.tokens + len(ids)
        self._digest = None
        return start

    def read(self, start: int, length: int) -> np.ndarray:
        """``length`` ids from position ``start`` (int32)."""
        if self._pid != os.getpid() and self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        data = os.pread(self._fd, length * TOKEN_BYTES, start * TOKEN_BYTES)
        if len(data) != length * TOKEN_BYTES:
            raise LmProbeError(
                f"the token file {self.path} is shorter than expected (removed or truncated "
                f"while the run was reading it); keep the temporary directory while a run lasts"
            )
        return np.frombuffer(data, dtype=np.int32)

    def digest(self) -> str:
        """SHA-256 of every id written (read back in pieces, sequentially)."""
        if self._digest is None:
            h, step = hashlib.sha256(), 1 << 22
            for start in range(0, self.tokens, step):
                h.update(self.read(start, min(step, self.tokens - start)).tobytes())
            self._digest = h.hexdigest()
        return self._digest

    def __getstate__(self) -> dict[str, Any]:
        # a spawned DataLoader worker reopens the file by its path (read only)
        return {"path": self.path, "tokens": self.tokens, "_digest": self._digest}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fd, self._pid = None, -1


class PackedDataset(Dataset):
    """Documents as unpadded token ids in a ``TokenStore``, and their labels (one per
    document). Rows ``i`` are ``store.read(starts[i], lengths[i])``; ``pad_id`` and
    ``padding_side`` are the tokenizer's, for ``collate``.

    Items are dicts with ``input_ids`` and ``attention_mask`` of the document's own length,
    ``labels``, ``index`` (the row in this dataset) and ``control`` once control labels are
    set; ``collate`` pads them into a batch. ``input_ids`` / ``attention_mask`` give every
    document padded to the longest (all of them in memory: for small data and inspection).
    """

    token_level = False
    word_level = False
    word_ids = None
    word_types = None

    def __init__(
        self,
        store: TokenStore,
        starts: np.ndarray,
        lengths: np.ndarray,
        labels: Any,
        label_names: Mapping[Any, Any] | None = None,
        pad_id: int = 0,
        padding_side: str = "right",
    ) -> None:
        self.store = store
        self.starts = np.asarray(starts, dtype=np.int64)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.labels = torch.tensor(np.asarray(labels))  # a copy: inputs may be read-only
        if not self.labels.is_floating_point():
            self.labels = self.labels.long()
        self.label_names = dict(label_names) if label_names else None
        self.pad_id, self.padding_side = int(pad_id), padding_side
        self.control_labels: torch.Tensor | None = None  # (``set_control_labels``)
        if not len(self.starts) == len(self.lengths) == len(self.labels):
            raise LmProbeError(
                f"{len(self.starts)} starts, {len(self.lengths)} lengths and "
                f"{len(self.labels)} labels; pass one of each per document"
            )
        check_documents(self.lengths)

    def __len__(self) -> int:
        return len(self.lengths)

    def tokens(self, row: int) -> np.ndarray:
        """The token ids of document ``row`` (int32, unpadded)."""
        return self.store.read(int(self.starts[row]), int(self.lengths[row]))

    def __getitem__(self, idx: Any) -> dict[str, torch.Tensor]:
        if not isinstance(idx, (int, np.integer)):  # a slice or rows: one padded batch
            rows = np.arange(len(self))[idx]
            return self.collate([self[int(i)] for i in np.atleast_1d(rows)])
        row = int(idx) + (len(self) if idx < 0 else 0)
        if not 0 <= row < len(self):
            raise IndexError(f"row {idx} of a dataset of {len(self)} documents")
        ids = torch.from_numpy(self.tokens(row).astype(np.int64))
        item = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": self.labels[row],
            "index": torch.tensor(row),
        }
        if self.control_labels is not None:
            item["control"] = self.control_labels[row]
        return item

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Items padded to the longest of them with ``pad_id`` on ``padding_side``."""
        longest = max(len(item["input_ids"]) for item in items)
        ids = torch.full((len(items), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            cols = slice(longest - n, longest) if self.padding_side == "left" else slice(0, n)
            ids[row, cols] = item["input_ids"]
            mask[row, cols] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        for key in ("labels", "index", "control"):
            if key in items[0]:
                batch[key] = torch.stack([item[key] for item in items])
        return batch

    @property
    def input_ids(self) -> torch.Tensor:
        return self[:]["input_ids"]

    @property
    def attention_mask(self) -> torch.Tensor:
        return self[:]["attention_mask"]

    set_control_labels = ProbeDataset.set_control_labels

    def subset(self, indices: Sequence[int] | np.ndarray) -> PackedDataset:
        """The rows ``indices`` (sharing this dataset's token file)."""
        indices = np.asarray(indices, dtype=np.int64)
        subset = PackedDataset(
            self.store,
            self.starts[indices],
            self.lengths[indices],
            self.labels[torch.from_numpy(indices)],
            self.label_names,
            self.pad_id,
            self.padding_side,
        )
        if self.control_labels is not None:
            subset.control_labels = self.control_labels[torch.from_numpy(indices)]
        return subset

    @property
    def classes(self) -> set[int]:
        return {int(value) for value in torch.unique(self.labels)}

    def label_values(self, null_label: int | None = None) -> np.ndarray:
        """The label of every document."""
        return self.labels.numpy()

    def digest_parts(self) -> tuple[Any, ...]:
        """What identifies the data (a run's fingerprint): every token written, where each
        document's tokens are, and the labels; hashed without reading the rows one by one."""
        return (self.store.digest(), self.starts.tobytes(), self.lengths.tobytes(), self.labels)

    def documents_digest(self) -> str:
        """What the model reads, hashed (the feature store's key: labels left out), without
        padding every document in memory as ``input_ids`` would: the token file's digest,
        where each document's tokens are, and the padding side."""
        h = hashlib.sha256()
        h.update(f"packed {self.store.digest()} {self.padding_side}\n".encode())
        h.update(np.ascontiguousarray(self.starts, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(self.lengths, dtype=np.int64).tobytes())
        return h.hexdigest()
