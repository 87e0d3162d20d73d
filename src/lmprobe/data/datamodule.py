"""``ProbeDataModule``: a data file read, filtered, tokenized once and split (or one file per
split), handed to Lightning as batches.

A file is read a chunk at a time and its chosen rows tokenized into a token file on disk
(``lmprobe.data.streaming``, ``lmprobe.data.packed``): peak memory does not grow with the number of
rows, and the rows chosen and the batches are those of reading the whole file at once.

Files of a word format (CoNLL-U, CoNLL: ``lmprobe.data.conll``) give word-level datasets: each
sentence tokenized as text, its subwords aligned to its words (``lmprobe.data.words``), one
label per word."""

from __future__ import annotations

import codecs
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
from torch.utils.data import DataLoader

from lmprobe.data.dataset import ProbeDataset, auto_window, batches, split_indices
from lmprobe.data.packed import PackedDataset
from lmprobe.data.readers import (
    UNKNOWN_LABEL_POLICIES,
    check_format,
    choose_rows,
    label_names,
    label_vocabulary,
    select_rows,
)
from lmprobe.data.sources import DataSource, FileSource, SplitRows
from lmprobe.data.streaming import (
    TEXT_HASH,
    TextSpill,
    effective_max_length,
    ensure_pad_token,
    pack,
    scan,
    warn_shared_texts,
)
from lmprobe.data.wordsplits import WordSplits
from lmprobe.errors import LmProbeError, plain
from lmprobe.probes.config import DEFAULT_CHUNK_ROWS

log = logging.getLogger(__name__)


def check_data_options(prefix: str = "", presplit: bool = False, **options: Any) -> None:
    """Every data option's value, checked before any file is read or model loaded; one line
    naming the key (``prefix`` + name, ``data.`` in the app) and the value. ``presplit``:
    the test split is a file, so ``test_size`` does not cut the training file."""

    def bad(key: str, fix: str) -> LmProbeError:
        return LmProbeError(f"{prefix}{key}={options[key]!r}: {fix}")

    def whole(key: str, low: int, none_ok: bool = True) -> None:
        value = options.get(key)
        if value is None and none_ok:
            return
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise bad(key, f"use a whole number >= {low}" + (" or null" if none_ok else ""))

    whole("batch_size", 1, none_ok=False)
    whole("sample_size", 1)  # the number of rows (sentences) to keep
    whole("max_length", 1)
    whole("num_workers", 0, none_ok=False)
    whole("group_size", 1)
    whole("length_window", 1)
    for key, low in (("test_size", 0.0), ("val_size", 0.0)):
        value = options.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(key, "use a fraction such as 0.2")
        if not (low < value < 1.0 or (key == "val_size" and value == 0)):
            raise bad(
                key,
                "use a fraction between 0 and 1, e.g. 0.2"
                + (" (0: none)" if key == "val_size" else ""),
            )
    test_size, val_size = options.get("test_size") or 0.0, options.get("val_size") or 0.0
    if not presplit and test_size + val_size >= 1.0:
        raise LmProbeError(
            f"{prefix}test_size={test_size} and {prefix}val_size={val_size} leave no training "
            f"rows; their sum must be below 1"
        )
    for key in ("val_path", "val_split"):  # a validation file: val_size cuts nothing
        if options.get(key) is not None and val_size:
            raise LmProbeError(
                f"{prefix}val_size={val_size} and {prefix}{key}={options[key]!r} both give "
                f"a validation split; set {prefix}val_size=0 to validate on the {key} file, "
                f"or {prefix}{key}=null to cut val_size from the training file"
            )
    if options.get("unknown_labels") not in (None, *UNKNOWN_LABEL_POLICIES):
        raise bad("unknown_labels", f"use one of {', '.join(UNKNOWN_LABEL_POLICIES)}")
    if options.get("file_format") is not None:
        check_format(options["file_format"], f"{prefix}file_format")
    encoding = options.get("encoding")
    if encoding is not None:
        try:
            codecs.lookup(str(encoding))
        except LookupError:
            raise bad("encoding", "use an encoding Python knows, e.g. utf-8 or latin-1") from None
    label_map = options.get("label_map")
    if label_map is not None and not isinstance(label_map, Mapping):
        raise bad("label_map", "use a mapping {original label: label}, e.g. {pos: 1, neg: 0}")
    for key in ("exclude", "include"):
        value = options.get(key)
        if value is None:
            continue
        lists = isinstance(value, Mapping) and all(
            isinstance(v, (list, tuple)) for v in value.values()
        )
        if not lists:
            raise bad(key, "give each column a list of values, e.g. {label: [neutral]}")


class ProbeDataModule(WordSplits, L.LightningDataModule):
    """Hands ``ProbeDataset`` splits to Lightning, batched and padded to each batch's longest.

    Either pass ready datasets (``train_set``, ``test_set``, optional ``val_set``), or a file
    (``path``) that ``setup`` reads, filters, samples, tokenizes once with ``tokenizer``, and
    splits (seeded, stratified) into train/val/test. ``test_path`` / ``val_path`` name files
    (same format) holding those splits instead; ``path`` is then the training file. Filters
    and the label map apply to every split alike, labels are numbered from the training
    file, and labels of another split that the training file lacks are an error (or
    dropped: ``unknown_labels="drop"``). ``sample_size`` and ``balance`` sample the
    training file only: a given test file is scored whole. ``source`` (a ``DataSource``,
    e.g. ``lmprobe.data.hf.HFSource``) gives the splits instead of the file options.

    A word format (``data=conllu``, ``data=conll``) gives one label per word; filters then
    choose which words are labelled (the others stay in the text), ``sample_size`` counts
    sentences, and a sentence longer than ``max_length`` tokens is cut into windows of
    whole words (no word is lost; a window does not see the words of the one before).

    Training batches: a seeded random order of documents, cut into groups of ``group_size``
    (a probe trains on one group at a time); ``length_window`` groups at a time are sorted
    by length into batches (default: about 50 batches' worth; one group for token- and
    word-level data), which is what keeps padding low. See ``LengthGroupedBatches``.
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
        length_window: int | None = None,
        test_path: str | None = None,
        val_path: str | None = None,
        unknown_labels: str = "error",
        source: DataSource | None = None,
    ) -> None:
        super().__init__()
        if source is None and path is not None:
            source = FileSource(path, test_path, val_path, encoding, file_format)
        if train_set is None and source is None:
            raise LmProbeError("ProbeDataModule needs train_set or a data file path")
        given = {} if source is None else source.splits
        check_data_options(
            batch_size=batch_size,
            sample_size=sample_size,
            max_length=max_length,
            test_size=test_size,
            val_size=val_size,
            num_workers=num_workers,
            group_size=group_size,
            length_window=length_window,
            unknown_labels=unknown_labels,
            file_format=file_format,
            encoding=encoding,
            label_map=label_map,
            exclude=exclude,
            include=include,
            presplit="test" in given,
            **{source.keys[split]: name for split, name in given.items() if split != "train"},
        )
        self.train_set, self.test_set, self.val_set = train_set, test_set, val_set
        self.source = source  #: where the splits are read from (``lmprobe.data.sources``)
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
        # order (lmprobe.data.dataset.LengthGroupedBatches). None: no length grouping.
        self.group_size = group_size
        # Groups sorted by length together (one "megabatch" in Hugging Face's terms): the
        # larger, the less padding, and the more rows the bank buffers. None: about 50
        # batches' worth (dataset.auto_window); 1: each group on its own.
        self.length_window = length_window
        self.test_path, self.val_path = test_path, val_path
        self.unknown_labels = unknown_labels
        self.label_names: dict[int, Any] | None = None
        #: every row left out while reading, and why (split, file, reason, rows): the
        #: run's dropped_rows.csv
        self.dropped_rows: list[dict[str, Any]] = []
        #: training rows no training batch holds: the probes' held-out slice, which is
        #: traced on its own before training (set by ``ProbeEarlyStopping.on_fit_start``),
        #: so training batches are full instead of trimmed around it
        self.heldout_rows: np.ndarray | None = None

    @property
    def word_level(self) -> bool:
        """One label per word (a CoNLL file, or a word-level ``train_set``)."""
        if self.train_set is not None:
            return self.train_set.word_level
        return self.source is not None and self.source.word_level

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            self.label_names = self.label_names or self.train_set.label_names
            return
        self.train_set, self.val_set, self.test_set = self.load_splits()

    def load_splits(self) -> tuple[ProbeDataset, ProbeDataset | None, ProbeDataset]:
        """The source's splits: each read and its rows chosen (``_read_rows``, or
        ``_read_words`` for word-level data), labels numbered from the training split, the
        splits not given whole cut from it (``_fractions``), then tokenized."""
        if self.tokenizer is None:
            raise LmProbeError("ProbeDataModule needs the model's tokenizer to read a text file")
        words = self.word_level
        if words and self.balance:
            raise LmProbeError(
                "data.balance samples one row per label, but word-level data has many labels "
                "per sentence; set data.balance=false"
            )
        read = self._read_words if words else self._read_rows
        one_file = len(self.source.splits) == 1 and not words  # its rows recorded as "all"
        parts: dict[str, SplitRows] = {}
        for split in self.source.splits:
            named = "data" if split == "train" and (one_file or words) else split
            dropped: list[dict[str, Any]] = []
            parts[split] = read(split, f"{named} file", parts.get("train"), dropped)
            tag = "all" if one_file else split
            self.dropped_rows += [{"split": tag, **record} for record in dropped]
        train = parts["train"]
        vocabulary = train.vocabulary
        names = None if vocabulary is None else label_names(vocabulary, self.label_map)
        if names is not None and len(names) < 2:
            raise LmProbeError(
                f"data file {train.name!r} has a single label {plain(names.values())} after "
                f"filtering; a probe needs at least two classes"
            )
        self.label_names = names
        strata = None if self.continuous else train.labels
        cuts = self._fractions(len(train.hashes), strata)
        test = parts.get("test", train)
        test_hashes = test.hashes if "test" in parts else train.hashes[cuts["test"]]
        warn_shared_texts(
            train.hashes[cuts["train"]], test_hashes, train.name, test.name, train.unit
        )
        if train.labels is not None:
            for split in ("train", "test"):
                labels = train.labels[cuts[split]] if split in cuts else test.labels
                if len(np.unique(labels)) < 2:
                    log.warning(
                        "the %s split of %s has a single class; its metrics will be degenerate",
                        split,
                        test.name if split not in cuts else train.name,
                    )
        ensure_pad_token(self.tokenizer)
        max_length = effective_max_length(self.max_length, self.model_max_length)
        datasets = {split: part.build(names, max_length) for split, part in parts.items()}
        full = datasets["train"]
        for split, units in cuts.items():
            datasets[split] = full.subset(train.rows(units))
        return datasets["train"], datasets.get("val"), datasets["test"]

    def _fractions(self, n: int, strata: np.ndarray | None) -> dict[str, np.ndarray]:
        """Units (rows, sentences) of the splits cut from the training split: those the
        source does not give whole. Seeded; stratified by ``strata``."""
        rest, parts = np.arange(n), {}
        given = self.source.splits
        if "test" not in given:
            inner, test = split_indices(n, self.test_size, self.seed, strata)
            rest, parts["test"] = inner, test
        if "val" not in given and self.val_size:
            fraction = self.val_size if "test" in given else self.val_size / (1 - self.test_size)
            inner, val = split_indices(
                len(rest), fraction, self.seed, None if strata is None else strata[rest]
            )
            rest, parts["val"] = rest[inner], rest[val]
        parts["train"] = rest
        return parts

    def _read_rows(
        self, split: str, what: str, train: SplitRows | None, dropped: list[dict[str, Any]]
    ) -> SplitRows:
        """One document per row, read a chunk at a time (texts on disk until tokenized):
        filters, label map, and (training split) sample and balance (``choose_rows``);
        labels numbered the training split's way (``train``)."""
        columns = [self.label_column, *self.exclude, *self.include]
        name, chunks = self.source.chunks(split, self.text_column, columns)
        source = f"{what} {name!r}"
        spill = TextSpill()
        raw = scan(chunks, self.text_column, columns, source, spill)
        selected = select_rows(
            raw,
            self.text_column,
            self.label_column,
            self.label_map,
            self.exclude,
            self.include,
            source,
            dropped,
        )
        vocabulary = None if train is None else train.vocabulary
        if train is None and not self.continuous:
            vocabulary = label_vocabulary(selected["_label"])
        first = train is None
        frame, _ = choose_rows(
            selected,
            self.label_column,
            self.label_map,
            self.sample_size if first else None,
            self.balance and first,
            self.seed,
            source,
            self.continuous,
            vocabulary,
            self.unknown_labels,
            dropped,
        )
        return SplitRows(
            name,
            frame[TEXT_HASH].to_numpy(),
            frame["_label"].to_numpy(),
            lambda names, max_length: self._pack(frame, spill, names, max_length),
            vocabulary=vocabulary,
        )

    def _pack(
        self,
        frame: pd.DataFrame,
        spill: TextSpill,
        names: dict[int, Any] | None,
        max_length: int | None,
    ) -> PackedDataset:
        """The chosen rows (``frame``, in its order) tokenized into a ``PackedDataset``."""
        try:
            return pack(
                frame["_row"].to_numpy(),
                spill,
                self.tokenizer,
                max_length,
                frame["_label"].to_numpy(),
                names,
            )
        finally:
            spill.close()

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
            leave_out=self.heldout_rows,
            window=self.window_groups,
        )

    @property
    def window_groups(self) -> int:
        """How many groups of training documents are sorted by length together:
        ``length_window``, else ``auto_window`` (one for token- and word-level data)."""
        if self.length_window is not None:
            return int(self.length_window)
        token_level = self.train_set is not None and self.train_set.labels.dim() == 2
        return auto_window(self.batch_size, self.group_size, token_level)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set, by_length=True)

    def test_dataloader(self) -> DataLoader | list:
        return self._loader(self.test_set, by_length=True)
