"""Labelled text in: file formats, readers, word alignment, datasets and the data modules."""
