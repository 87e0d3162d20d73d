"""Readers: a new file format is one registered function; unknown formats fail clearly;
``ProbeDataset.classes``."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch

from lmprobe.data.dataset import ProbeDataset
from lmprobe.data.readers import READERS, SUFFIXES, read_table, read_text, register_reader
from lmprobe.errors import LmProbeError


@pytest.fixture()
def pipe_reader():
    """A pipe-separated format, registered for the test and removed afterwards."""
    assert "pipe" not in READERS and ".pipe" not in SUFFIXES
    try:

        @register_reader("pipe", ".pipe")
        def read_pipe(path: str, encoding: str) -> pd.DataFrame:
            return pd.read_csv(io.StringIO(read_text(path, encoding)), sep="|")

        yield read_pipe
    finally:
        READERS.pop("pipe", None)
        SUFFIXES.pop(".pipe", None)


def test_a_registered_reader_reads_its_suffix(tmp_path, pipe_reader):
    path = tmp_path / "reviews.pipe"
    path.write_text("text|label\ngood, really|pos\nbad|neg\n", encoding="utf-8")
    frame = read_table(str(path))
    assert frame.to_dict("list") == {"text": ["good, really", "bad"], "label": ["pos", "neg"]}
    # named explicitly, whatever the suffix; the shared text handling names a missing file
    other = tmp_path / "reviews.dat"
    other.write_bytes(path.read_bytes())
    assert read_table(str(other), file_format="pipe").equals(frame)
    with pytest.raises(LmProbeError, match="does not exist"):
        read_table(str(tmp_path / "missing.pipe"))


def test_unknown_file_format_names_it_and_the_known_ones(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text,label\na,0\n", encoding="utf-8")
    with pytest.raises(LmProbeError) as err:
        read_table(str(path), file_format="xml")
    message = str(err.value)
    assert "\n" not in message
    assert "'xml'" in message
    for name in ("csv", "tsv", "jsonl", "parquet"):
        assert name in message


def test_classes_of_sequence_labels():
    ids = torch.ones(4, 3, dtype=torch.long)
    ds = ProbeDataset(ids, torch.ones_like(ids), [2, 0, 2, 5])
    assert ds.classes == {0, 2, 5}
    assert all(type(value) is int for value in ds.classes)


def test_classes_of_token_labels_ignore_padding():
    ids = torch.ones(2, 4, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    labels = torch.tensor([[0, 1, 1, 9], [9, 3, 0, 1]])  # 9 only on padding
    ds = ProbeDataset(ids, mask, labels)
    assert ds.token_level
    assert ds.classes == {0, 1, 3}


@pytest.mark.parametrize(
    ("labels", "n", "seed"), [([0, 1], 40, 0), ([2, 0, 1], 7, 5), (["b", "a"], 1, 3)]
)
def test_balancing_draws_the_rows_pandas_groupby_sample_draws(labels, n, seed):
    """``sample_per_class`` is pandas' ``groupby(...).sample(n, random_state=seed)`` without
    its copy of every group: the same rows, in the same order."""
    from lmprobe.data.readers import sample_per_class

    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"_label": rng.choice(labels, 300), "x": rng.normal(size=300)})
    frame.index = rng.permutation(1000)[:300]  # an index that is not the row position
    expected = frame.groupby("_label", group_keys=False).sample(n=n, random_state=seed)
    got = sample_per_class(frame, "_label", n, seed)
    pd.testing.assert_frame_equal(got, expected)
