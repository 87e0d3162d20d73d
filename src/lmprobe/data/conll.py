"""CoNLL readers: files with one word per line and a blank line between sentences, read
into one row per word (``data=conllu``, ``data=conll``).

Both are ordinary readers of the registry (``lmprobe.data.readers.READERS``), registered as word
formats: the frame has a ``sentence`` column numbering the sentences, and the rows of a
sentence are its words in order. The data module then tokenizes each sentence as text and
aligns subwords to words (``lmprobe.data.words``); filters and label maps apply per word.

Every value is read as a string (``NA``, ``null`` or ``1`` stay the words they are).
"""

from __future__ import annotations

import pandas as pd

from lmprobe.data.readers import SENTENCE, read_text, register_reader
from lmprobe.errors import LmProbeError

#: The ten columns of Universal Dependencies' CoNLL-U, in file order.
CONLLU_COLUMNS = ("id", "form", "lemma", "upos", "xpos", "feats", "head", "deprel", "deps", "misc")


def _lines(path: str, encoding: str) -> list[str]:
    # a byte-order mark can sit at the start of the file or (WNUT-17's dev set) on a line of
    # its own: it is no character of any word
    return read_text(path, encoding).replace("\ufeff", "").split("\n")


def _frame(rows: list[list[str]], columns: list[str], path: str, what: str) -> pd.DataFrame:
    if not rows:
        raise LmProbeError(
            f"{path!r} has no sentences; a {what} file has one word per line and a blank "
            f"line between sentences (check data.path and data.file_format)"
        )
    return pd.DataFrame(rows, columns=[*columns, SENTENCE]).astype(
        {column: object for column in columns} | {SENTENCE: "int64"}
    )


@register_reader("conllu", ".conllu", words=True)
def read_conllu(path: str, encoding: str) -> pd.DataFrame:
    """Universal Dependencies CoNLL-U: one row per syntactic word, with the columns
    ``id form lemma upos xpos feats head deprel deps misc``. Comment lines (``#``) are
    skipped, and so are multiword-token lines (``1-2``: the model reads the syntactic words,
    ``do n't`` for ``don't``, which carry the labels) and empty nodes (``8.1``)."""
    rows: list[list[str]] = []
    sentence, in_sentence = 0, False
    for number, line in enumerate(_lines(path, encoding), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            sentence += in_sentence
            in_sentence = False
            continue
        if line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != len(CONLLU_COLUMNS):
            raise LmProbeError(
                f"line {number} of {path!r} has {len(fields)} tab-separated columns, not the "
                f"{len(CONLLU_COLUMNS)} of CoNLL-U ({' '.join(CONLLU_COLUMNS)}); for other "
                f"column layouts use data=conll"
            )
        if "-" in fields[0] or "." in fields[0]:  # multiword token or empty node
            continue
        rows.append([*fields, sentence])
        in_sentence = True
    return _frame(rows, list(CONLLU_COLUMNS), path, "CoNLL-U")


@register_reader("conll", ".conll", ".bio", ".iob", words=True)
def read_conll(path: str, encoding: str) -> pd.DataFrame:
    """Whitespace-separated columns, one word per line, blank lines between sentences
    (CoNLL-2003, WNUT, any BIO-tagged file). Columns are named by their position, ``0``
    (the word) to ``k-1``; ``-DOCSTART-`` lines are skipped. Tabs separate the columns
    when a line has any, else runs of spaces."""
    rows: list[list[str]] = []
    sentence, in_sentence, width, first = 0, False, None, 0
    for number, line in enumerate(_lines(path, encoding), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            sentence += in_sentence
            in_sentence = False
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        if fields[0] == "-DOCSTART-":
            continue
        if width is None:
            width, first = len(fields), number
        elif len(fields) != width:
            raise LmProbeError(
                f"line {number} of {path!r} has {len(fields)} columns but line {first} has "
                f"{width}; every word line of a CoNLL file needs the same columns"
            )
        rows.append([*fields, sentence])
        in_sentence = True
    return _frame(rows, [str(i) for i in range(width or 0)], path, "CoNLL")


def resolve_column(frame: pd.DataFrame, column: str | int, source: str) -> str:
    """A column of a word-level frame by name (``upos``) or by position in the file
    (``3``; ``-1`` is the last column, e.g. the NER tag of CoNLL-2003)."""
    if str(column) in frame.columns and str(column) != SENTENCE:
        return str(column)
    columns = [c for c in frame.columns if c != SENTENCE]
    try:
        index = int(str(column))
    except ValueError:
        return str(column)  # not a position: select_rows names the columns there are
    if not -len(columns) <= index < len(columns):
        raise LmProbeError(
            f"{source} has {len(columns)} columns ({', '.join(columns)}); column {index} is "
            f"not one of them: use 0 to {len(columns) - 1}, -1 for the last, or a name"
        )
    return columns[index]
