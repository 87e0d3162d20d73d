"""Labelled text in: file formats, readers, word alignment, datasets and the data modules."""

# The CoNLL formats register themselves with the readers (lmprobe.data.readers.READERS).
from lmprobe.data import conll  # noqa: F401
