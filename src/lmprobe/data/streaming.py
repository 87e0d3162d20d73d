"""A data source read a chunk at a time into a ``PackedDataset``, so that peak memory does
not grow with the number of rows.

``scan`` passes over the source's chunks once. Of each chunk it keeps only the columns that
choose rows (the label and the filter columns) and a stand-in for the text that says whether
it is there; the texts themselves go to a temporary file (``TextSpill``). The rows are then
chosen from that thin frame by the same code, with the same seed, as from a whole one
(``lmprobe.data.readers.prepare_frame``: filters, label map, balance, sample, shuffle; none of
them looks at a text beyond whether it is empty), and ``pack`` tokenizes the chosen texts a
chunk at a time into a token file (``lmprobe.data.packed``).
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from lmprobe.data import readers
from lmprobe.data.packed import PackedDataset, TokenStore
from lmprobe.data.readers import check_columns, check_plain_values, missing_text
from lmprobe.errors import LmProbeError

log = logging.getLogger(__name__)

#: The thin frame's text column when the text is not needed for anything else: this value
#: where the row has a text, missing where it has none.
TEXT_PRESENT = "t"


class TextSpill:
    """Texts of a source's rows (UTF-8, end to end) in an unnamed temporary file, which the
    system removes when it is closed; memory keeps where each row's text ends."""

    def __init__(self, directory: str | None = None) -> None:
        self._file = tempfile.TemporaryFile(prefix="lmprobe-texts-", dir=directory)
        self._lengths: list[np.ndarray] = []
        self._written = 0
        self.ends: np.ndarray | None = None

    def add(self, texts: Sequence[str]) -> None:
        """Append the texts of the next rows."""
        encoded = [text.encode("utf-8", "surrogatepass") for text in texts]
        data = b"".join(encoded)
        os.pwrite(self._file.fileno(), data, self._written)
        self._written += len(data)
        self._lengths.append(np.fromiter(map(len, encoded), np.int64, len(encoded)))

    def finish(self) -> None:
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        self._lengths = []
        self.ends = np.cumsum(lengths)

    def read(self, rows: np.ndarray) -> list[str]:
        """The texts of ``rows`` (ascending), read in one piece when they lie close together."""
        ends = self.ends
        starts = np.where(rows > 0, ends[np.maximum(rows - 1, 0)], 0)
        stops = ends[rows]
        fd = self._file.fileno()
        span = int(stops[-1] - starts[0])
        if span <= 4 * int((stops - starts).sum()) + (1 << 20):
            block, base = os.pread(fd, span, int(starts[0])), int(starts[0])
            pieces = [block[a - base : b - base] for a, b in zip(starts, stops, strict=True)]
        else:
            pieces = [os.pread(fd, int(b - a), int(a)) for a, b in zip(starts, stops, strict=True)]
        return [piece.decode("utf-8", "surrogatepass") for piece in pieces]

    def close(self) -> None:
        self._file.close()


#: The thin frame's column of each row's text hash (``hash`` of the text, this process):
#: texts repeated between splits are found by it (``shared_texts``).
TEXT_HASH = "_text_hash"


def shared_texts(train: np.ndarray, test: np.ndarray) -> int:
    """How many of the ``test`` rows' text hashes are also among the ``train`` rows'."""
    return int(np.isin(test, train).sum())


def scan(
    chunks: Iterable[pd.DataFrame],
    text_column: str,
    columns: Sequence[str],
    source: str,
    spill: TextSpill,
) -> pd.DataFrame:
    """The thin frame of a source: ``columns`` (label, filters), the text column (a stand-in
    unless it is one of ``columns``), ``_row``, the row's position in the source, and
    ``TEXT_HASH``; the texts go to ``spill``. A column missing from some chunks (JSONL objects without that
    key) is missing there, as a whole-file read would have it."""
    columns = list(dict.fromkeys(columns))
    thin_columns = list(dict.fromkeys([text_column, *columns]))
    parts, seen, row = [], {}, 0
    for chunk in chunks:
        seen.update(dict.fromkeys(chunk.columns))
        n = len(chunk)
        check_plain_values(chunk, thin_columns, source, row)
        if text_column in chunk.columns:
            texts = chunk[text_column]
            absent = missing_text(texts).to_numpy()
            texts = [
                "" if gone else text for text, gone in zip(texts.astype(str), absent, strict=True)
            ]
            spill.add(texts)
            hashes = np.fromiter(map(hash, texts), np.int64, n)
        else:
            absent = np.ones(n, dtype=bool)
            spill.add([""] * n)
            hashes = np.zeros(n, dtype=np.int64)
        thin = pd.DataFrame(
            {
                c: chunk[c] if c in chunk.columns else pd.Series([None] * n, index=chunk.index)
                for c in thin_columns
            }
        )
        if text_column not in columns:
            thin[text_column] = np.where(absent, None, TEXT_PRESENT)
        thin["_row"] = np.arange(row, row + n, dtype=np.int64)
        thin[TEXT_HASH] = hashes
        parts.append(thin.reset_index(drop=True))
        row += n
    spill.finish()
    if row == 0:  # select_rows names an empty source
        return pd.DataFrame(columns=thin_columns)
    check_columns(list(seen), [text_column, *columns], source)
    return pd.concat(parts, ignore_index=True)


def pack(
    rows: np.ndarray,
    spill: TextSpill,
    tokenizer: Any,
    max_length: int | None,
    labels: Any,
    label_names: dict[int, Any] | None,
    directory: str | None = None,
    chunk_rows: int | None = None,
) -> PackedDataset:
    """A ``PackedDataset`` of the source rows ``rows`` (its documents in that order), their
    texts tokenized ``chunk_rows`` at a time exactly as one call on every text would tokenize them
    (truncated to ``max_length``; padding adds nothing but pads, so none is asked for)."""
    chunk_rows = chunk_rows or readers.CHUNK_ROWS
    store = TokenStore(directory)
    starts = np.empty(len(rows), dtype=np.int64)
    lengths = np.empty(len(rows), dtype=np.int64)
    order = np.argsort(rows, kind="stable")  # the spill is read front to back
    for first in range(0, len(rows), chunk_rows):
        where = order[first : first + chunk_rows]
        texts = spill.read(rows[where])
        ids = tokenizer(
            texts, truncation=max_length is not None, max_length=max_length, padding=False
        )["input_ids"]
        sizes = np.fromiter(map(len, ids), np.int64, len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(sizes.sum()))
        start = store.append(flat)
        starts[where] = start + np.cumsum(sizes) - sizes
        lengths[where] = sizes
    return PackedDataset(
        store,
        starts,
        lengths,
        labels,
        label_names,
        pad_id=tokenizer.pad_token_id,
        padding_side=tokenizer.padding_side,
    )


def ensure_pad_token(tokenizer: Any) -> None:
    """Pad with the EOS token when the tokenizer has no pad token (padding is masked)."""
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


def effective_max_length(max_length: int | None, model_max: int | None) -> int | None:
    """``max_length``, at most the model's context (``None``: the model's context)."""
    if max_length is not None and model_max is not None and max_length > model_max:
        log.warning(
            "max_length=%d is beyond the model's context of %d tokens; truncating to %d",
            max_length,
            model_max,
            model_max,
        )
        max_length = model_max
    return model_max if max_length is None else max_length


def warn_shared_texts(
    train: np.ndarray, test: np.ndarray, train_path: Any, test_path: Any, what: str = "documents"
) -> None:
    """A warning counting the test rows whose text (hash) is also a training text: a probe
    scored on texts it trained on measures memory as well as the property."""
    shared = shared_texts(train, test)
    if shared:
        log.warning(
            "%d of the %d test %s (%s) repeat a text of the training split (%s): their "
            "scores are not held out; remove the repeats from one of the files",
            shared,
            len(test),
            what,
            test_path,
            train_path,
        )
