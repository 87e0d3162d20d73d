"""Data sources: where the rows of a data module's splits come from (``DataSource``).

A source names its training split and any validation or test split it holds whole (the data
module cuts the others from the training split), and hands over each one's rows. One split
loader (``ProbeDataModule.load_splits``) reads every source alike: a file (``FileSource``),
one file per split (the same), word-level files (a word format of ``lmprobe.data.readers``),
or the splits of a Hugging Face dataset (``lmprobe.data.hf.HFSource``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from lmprobe.data.readers import (
    WORD_FORMATS,
    format_of,
    read_chunks,
    read_table,
    resolve_data_path,
)


class DataSource(ABC):
    """The splits of a data set, read a chunk at a time."""

    #: split (``train``, ``val``, ``test``) -> what names it (a file, a split of a dataset):
    #: the training split first, then those given whole
    splits: dict[str, str]
    #: the data options that name the validation and test splits, for messages
    keys: dict[str, str]

    @property
    def word_level(self) -> bool:
        """One row per word (``lmprobe.data.conll``) rather than one per document."""
        return False

    @abstractmethod
    def chunks(
        self, split: str, text_column: str, columns: Sequence[str]
    ) -> tuple[str, Iterable[pd.DataFrame]]:
        """The name of ``split``'s source (for messages) and its rows, a chunk at a time;
        ``text_column`` and ``columns`` (label, filters) are those the data module reads."""

    def table(self, split: str) -> tuple[str, pd.DataFrame]:
        """The name of ``split``'s source and its rows, whole (word-level data)."""
        raise NotImplementedError(f"{type(self).__name__} has no word-level data")


class FileSource(DataSource):
    """A data file (``path``), and the files of the splits given whole (same format)."""

    keys = {"val": "val_path", "test": "test_path"}

    def __init__(
        self,
        path: str,
        test_path: str | None = None,
        val_path: str | None = None,
        encoding: str = "utf-8",
        file_format: str | None = None,
    ) -> None:
        given = (("val", val_path), ("test", test_path))
        self.splits = {"train": path, **{split: file for split, file in given if file}}
        self.encoding, self.file_format = encoding, file_format

    @property
    def word_level(self) -> bool:
        return format_of(str(self.splits["train"]), self.file_format) in WORD_FORMATS

    def chunks(
        self, split: str, text_column: str, columns: Sequence[str]
    ) -> tuple[str, Iterable[pd.DataFrame]]:
        path = resolve_data_path(self.splits[split])
        return path, read_chunks(path, self.encoding, self.file_format)

    def table(self, split: str) -> tuple[str, pd.DataFrame]:
        path = resolve_data_path(self.splits[split])
        return path, read_table(path, self.encoding, self.file_format)


@dataclass
class SplitRows:
    """One split as the split loader read it, before it is tokenized."""

    name: str  #: its source's name (a file, a dataset's split), for messages
    hashes: np.ndarray  #: the hash of each unit's text (a document, or a sentence's words)
    labels: np.ndarray | None  #: each document's label (None for words: many per sentence)
    #: the dataset, given the label names and the tokens' max_length
    build: Callable[[dict[int, Any] | None, int | None], Any]
    unit: str = "documents"
    vocabulary: dict[Any, int] | None = None  #: label -> number (the training split's)
    types: dict[str, int] = field(default_factory=dict)  #: word types (words)
    sentence: np.ndarray | None = None  #: each dataset row's sentence (words, once built)

    def rows(self, units: np.ndarray) -> np.ndarray:
        """The dataset rows of ``units`` (documents, or sentences: all their windows)."""
        if self.sentence is None:
            return units
        return np.flatnonzero(np.isin(self.sentence, units))
