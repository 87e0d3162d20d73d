"""Hugging Face datasets as data (``data=hf``, ``data=imdb``): ``HFDataModule``.

``data.name`` is a directory written by ``save_to_disk`` (read with ``datasets.load_from_disk``,
offline) or a name on the hub (``datasets.load_dataset``: the hub when it is reachable, else
the local cache). ``data.split`` is the training split; ``data.test_split`` and
``data.val_split`` name other splits of the same dataset (else ``test_size`` / ``val_size``
cut them from the training split). Every other data option (columns, filters, label map,
sampling, balance) is the file data's: the dataset is handed to the same code a chunk at a
time (``lmprobe.data.streaming``), from the memory-mapped Arrow files ``datasets`` keeps, so it
never has to fit in memory. ``ClassLabel`` columns are read as their names (``neg``,
``pos``), and their ``-1`` (no label) as missing. Loading never runs code from the hub:
``datasets`` reads data files only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from lmprobe.data import readers
from lmprobe.data.datamodule import ProbeDataModule
from lmprobe.data.readers import check_columns, first_line
from lmprobe.data.sources import DataSource
from lmprobe.errors import LmProbeError

#: The files ``save_to_disk`` writes: a ``DatasetDict`` (several splits) or one ``Dataset``.
SAVED_MARKERS = ("dataset_dict.json", "state.json")


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise LmProbeError(
            "data=hf needs the datasets package: pip install 'lmprobe-lightning[hf]' "
            "(or pip install datasets)"
        ) from None
    return datasets


def looks_local(name: str) -> bool:
    """A path rather than a hub name (``org/name``): absolute, relative with a dot, or ``~``."""
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..")


def check_hf_options(name: Any, prefix: str = "config key data.") -> None:
    """What can be checked before any model work: a name that is a path must exist."""
    if not isinstance(name, str) or not name:
        raise LmProbeError(
            f"{prefix}name={name!r}: name a Hugging Face dataset (e.g. stanfordnlp/imdb) or a "
            f"directory written by save_to_disk"
        )
    if looks_local(name) and not Path(name).expanduser().is_dir():
        raise LmProbeError(
            f"{prefix}name={name!r} names no directory; give a directory written by "
            f"datasets' save_to_disk, or a hub name such as stanfordnlp/imdb"
        )


def load_split(
    name: str, split: str, config_name: str | None = None, revision: str | None = None
) -> Any:
    """One split of a dataset (a ``datasets.Dataset``, memory-mapped)."""
    datasets = _datasets()
    check_hf_options(name, prefix="data.")
    local = Path(name).expanduser()
    if local.is_dir() and any((local / marker).is_file() for marker in SAVED_MARKERS):
        loaded = datasets.load_from_disk(str(local))
        if not isinstance(loaded, datasets.DatasetDict):
            return loaded  # one Dataset saved alone: the split is the whole of it
        if split not in loaded:
            raise LmProbeError(
                f"data split {split!r} is not in {name!r}; its splits are "
                f"{', '.join(loaded)} (set data.split, data.test_split, data.val_split)"
            )
        return loaded[split]
    try:
        return datasets.load_dataset(name, config_name, split=split, revision=revision)
    except Exception as err:  # noqa: BLE001 - hub, cache and builder errors come in many types
        where = f"{name!r}" + (f" ({config_name})" if config_name else "")
        raise LmProbeError(
            f"could not load split {split!r} of the Hugging Face dataset {where} "
            f"({type(err).__name__}: {first_line(err, 160)}); check data.name, data.split and "
            f"data.config_name; without network access to the hub, save it where there is "
            f"(datasets.load_dataset({name!r}).save_to_disk(DIR)) and set data.name=DIR"
        ) from None


def hf_chunks(dataset: Any, columns: list[str], rows: int) -> Iterator[pd.DataFrame]:
    """``columns`` of ``dataset`` as DataFrames of ``rows`` rows, converted from Arrow as
    pandas converts a parquet file; ``ClassLabel`` columns as their names."""
    datasets = _datasets()
    names = {
        c: dataset.features[c].names
        for c in columns
        if isinstance(dataset.features[c], datasets.ClassLabel)
    }
    table = dataset.select_columns(columns).with_format("arrow")
    for start in range(0, len(dataset), rows):
        chunk = table[start : start + rows].to_pandas()
        for column, labels in names.items():  # -1: no label, missing like an empty cell
            codes = chunk[column].fillna(-1).astype("int64")
            chunk[column] = pd.Categorical.from_codes(codes, categories=labels).astype(object)
        yield chunk


class HFSource(DataSource):
    """The splits of a Hugging Face dataset: ``split`` for training, ``test_split`` and
    ``val_split`` given whole (see the module's docstring)."""

    keys = {"val": "val_split", "test": "test_split"}

    def __init__(
        self,
        name: str,
        split: str = "train",
        test_split: str | None = None,
        val_split: str | None = None,
        config_name: str | None = None,
        revision: str | None = None,
    ) -> None:
        check_hf_options(name, prefix="data.")
        given = (("val", val_split), ("test", test_split))
        self.splits = {"train": split, **{s: named for s, named in given if named}}
        self.name, self.config_name, self.revision = name, config_name, revision

    def chunks(
        self, split: str, text_column: str, columns: Sequence[str]
    ) -> tuple[str, Iterable[pd.DataFrame]]:
        split = self.splits[split]
        dataset = load_split(self.name, split, self.config_name, self.revision)
        source = f"{self.name}[{split}]"
        wanted = [text_column, *columns]
        check_columns(dataset.column_names, wanted, f"Hugging Face dataset {source!r}")
        text = dataset.features[text_column]
        if getattr(text, "dtype", None) not in ("string", "large_string"):
            raise LmProbeError(
                f"data.text_column={text_column!r} of {source!r} holds "
                f"{type(text).__name__} values, not one text per row; name a string column "
                f"(word-level data: export it to a CoNLL file and use data=conll)"
            )
        return source, hf_chunks(dataset, list(dict.fromkeys(wanted)), readers.CHUNK_ROWS)


class HFDataModule(ProbeDataModule):
    """``ProbeDataModule`` reading the splits of a Hugging Face dataset (an ``HFSource``).
    ``options`` are ``ProbeDataModule``'s (not its file options)."""

    def __init__(
        self,
        name: str,
        split: str = "train",
        test_split: str | None = None,
        val_split: str | None = None,
        config_name: str | None = None,
        revision: str | None = None,
        **options: Any,
    ) -> None:
        source = HFSource(name, split, test_split, val_split, config_name, revision)
        super().__init__(source=source, **options)
