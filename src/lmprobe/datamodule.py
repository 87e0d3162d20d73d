"""``ProbeDataModule``: a data file read, filtered, tokenized once and split, handed to
Lightning as ``ProbeDataset`` batches; and ``tokenize_texts``."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from lmprobe.bank import DEFAULT_CHUNK_ROWS
from lmprobe.dataset import ProbeDataset, batches, split_indices
from lmprobe.errors import LmProbeError
from lmprobe.readers import prepare_frame, read_table, resolve_data_path

log = logging.getLogger(__name__)


def tokenize_texts(
    tokenizer: Any, texts: Sequence[str], max_length: int | None, model_max: int | None = None
) -> dict[str, torch.Tensor]:
    """Tokenize once, padded to the longest text; batches are trimmed again by ``pad_to_longest``."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LmProbeError(
                "the tokenizer has no pad token and no EOS token; set tokenizer.pad_token"
            )
        log.warning(
            "the tokenizer has no pad token; using its EOS token %r for padding (padding is "
            "masked out, so this does not change any activation)",
            tokenizer.eos_token,
        )
        tokenizer.pad_token = tokenizer.eos_token
    if max_length is not None and model_max is not None and max_length > model_max:
        log.warning(
            "max_length=%d is beyond the model's context of %d tokens; truncating to %d",
            max_length,
            model_max,
            model_max,
        )
        max_length = model_max
    if max_length is None:
        max_length = model_max
    return tokenizer(
        list(texts),
        padding=True,
        truncation=max_length is not None,
        max_length=max_length,
        return_tensors="pt",
    )


class ProbeDataModule(L.LightningDataModule):
    """Hands ``ProbeDataset`` splits to Lightning, batched and padded to each batch's longest.

    Either pass ready datasets (``train_set``, ``test_set``, optional ``val_set``), or a file
    (``path``) that ``setup`` reads, filters, samples, tokenizes once with ``tokenizer``, and
    splits (seeded, stratified) into train/val/test.
    """

    def __init__(
        self,
        train_set: ProbeDataset | None = None,
        test_set: ProbeDataset | None = None,
        val_set: ProbeDataset | None = None,
        path: str | None = None,
        text_column: str = "text",
        label_column: str = "label",
        label_map: Mapping[Any, Any] | None = None,
        exclude: Mapping[str, Sequence[Any]] | None = None,
        include: Mapping[str, Sequence[Any]] | None = None,
        sample_size: int | None = None,
        balance: bool = False,
        test_size: float = 0.2,
        val_size: float = 0.0,
        max_length: int | None = None,
        encoding: str = "utf-8",
        file_format: str | None = None,
        seed: int = 0,
        batch_size: int = 8,
        num_workers: int = 0,
        tokenizer: Any = None,
        model_max_length: int | None = None,
        continuous: bool = False,
        group_size: int | None = DEFAULT_CHUNK_ROWS,
    ) -> None:
        super().__init__()
        if train_set is None and path is None:
            raise LmProbeError("ProbeDataModule needs train_set or a data file path")
        if int(batch_size) < 1:
            raise LmProbeError(f"batch_size={batch_size!r} must be >= 1")
        self.train_set, self.test_set, self.val_set = train_set, test_set, val_set
        self.path = path
        self.text_column, self.label_column = text_column, label_column
        self.label_map = dict(label_map) if label_map else None
        self.exclude = {k: list(v) for k, v in (exclude or {}).items()}
        self.include = {k: list(v) for k, v in (include or {}).items()}
        self.sample_size = sample_size
        self.balance = balance
        self.test_size, self.val_size = test_size, val_size
        self.max_length = max_length
        self.encoding = encoding
        self.file_format = file_format
        self.seed = seed
        self.batch_size = int(batch_size)
        self.num_workers = num_workers
        self.tokenizer = tokenizer
        self.model_max_length = model_max_length
        self.continuous = continuous  # numeric targets for regression probes
        # Training batches come in a seeded random order, in groups of this many documents
        # sorted by length (little padding); probes train on whole groups, in the random
        # order (lmprobe.dataset.LengthGroupedBatches). None: no length grouping.
        self.group_size = group_size
        self.label_names: dict[int, Any] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            self.label_names = self.label_names or self.train_set.label_names
            return
        self.train_set, self.val_set, self.test_set = self.load_splits()

    def load_splits(self) -> tuple[ProbeDataset, ProbeDataset | None, ProbeDataset]:
        if self.tokenizer is None:
            raise LmProbeError("ProbeDataModule needs the model's tokenizer to read a text file")
        path = resolve_data_path(self.path)
        frame = read_table(path, self.encoding, self.file_format)
        frame, names = prepare_frame(
            frame,
            self.text_column,
            self.label_column,
            self.label_map,
            self.exclude,
            self.include,
            self.sample_size,
            self.balance,
            self.seed,
            source=f"data file {path!r}",
            continuous=self.continuous,
        )
        self.label_names = names
        labels = frame["_label"].to_numpy()
        if names is not None and len(names) < 2:
            raise LmProbeError(
                f"data file {path!r} has a single label {list(names.values())} after filtering; "
                f"a probe needs at least two classes"
            )
        strata = None if self.continuous else labels
        rest, test_idx = split_indices(len(frame), self.test_size, self.seed, strata)
        val_idx = np.array([], dtype=int)
        if self.val_size:
            fraction = self.val_size / (1.0 - self.test_size)
            inner_train, inner_val = split_indices(
                len(rest), fraction, self.seed, None if strata is None else strata[rest]
            )
            rest, val_idx = rest[inner_train], rest[inner_val]
        encoded = tokenize_texts(
            self.tokenizer,
            frame[self.text_column].astype(str).tolist(),
            self.max_length,
            self.model_max_length,
        )
        full = ProbeDataset(encoded["input_ids"], encoded["attention_mask"], labels, names)
        for split, idx in (("train", rest), ("test", test_idx)):
            if len(np.unique(labels[idx])) < 2:
                log.warning(
                    "the %s split of %s has a single class; its metrics will be degenerate",
                    split,
                    path,
                )
        val = full.subset(val_idx) if len(val_idx) else None
        return full.subset(rest), val, full.subset(test_idx)

    def _loader(self, dataset: ProbeDataset | None, by_length: bool = False) -> DataLoader | list:
        if dataset is None:
            return []
        return batches(dataset, self.batch_size, by_length, self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return batches(
            self.train_set,
            self.batch_size,
            num_workers=self.num_workers,
            group_size=self.group_size,
            seed=self.seed,
        )

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set, by_length=True)

    def test_dataloader(self) -> DataLoader | list:
        return self._loader(self.test_set, by_length=True)
