"""Adding a kind of thing touches one place: a pooling (``lmprobe.probes.poolings``), a probe
kind (``lmprobe.probes.base``), a data format (``lmprobe.data.readers``) and a metric
(``lmprobe.scoring.metrics``), each registered from this test module and run through the
app, as ``train.py`` runs it."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from conftest import make_texts

from lmprobe.data import readers
from lmprobe.probes import base, poolings
from lmprobe.probes.kinds import MeanDifferenceProbe
from lmprobe.scoring import metrics


def error_rate(confusion: np.ndarray) -> np.ndarray:
    """A new metric: the share of rows predicted wrongly (a function of the confusion matrix
    or a stack of them, as the bootstrap passes)."""
    return 1 - metrics.accuracy(confusion)


def test_a_pooling_a_kind_a_format_and_a_metric_added_from_outside(
    tmp_path, tiny_model_dir, monkeypatch
):
    from test_app import compose_cfg

    from lmprobe.app.job import train

    # each registry is a dict: the test's entries are removed again when it ends
    pooled = []  # documents the new pooling pooled
    monkeypatch.setitem(
        poolings.POOLINGS, "median", lambda h, real: pooled.append(len(h)) or _median(h, real)
    )
    monkeypatch.setitem(base.PROBE_KINDS, "nearest_mean", NearestMean)
    monkeypatch.setitem(readers.READERS, "pipes", read_pipes)
    monkeypatch.setitem(readers.SUFFIXES, ".pipes", "pipes")
    monkeypatch.setitem(metrics.CLASSIFICATION_METRICS, "error_rate", error_rate)

    texts, labels = make_texts(80, seed=3)
    path = tmp_path / "reviews.pipes"
    path.write_text(
        "text|label\n" + "".join(f"{t}|{y}\n" for t, y in zip(texts, labels, strict=True)),
        encoding="utf-8",
    )
    cfg = compose_cfg(
        tmp_path / "run",
        [
            "probes=gpt2_layers",
            "probes.submodules=[transformer.h.1.output,transformer.h.2.output]",
            "probes.pooling=[median,mean]",
            "probes.kind=nearest_mean",
            f"model.name_or_path={tiny_model_dir}",
            "model.device=cpu",
            "data=csv",
            f"data.path={path}",
            "data.batch_size=8",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            "logger=none",
        ],
    )
    train(cfg)
    table = pd.read_csv(tmp_path / "run" / "metrics.csv", index_col="probe")
    assert list(table.index) == [
        f"transformer.h.{i}.output/{pool}" for i in (1, 2) for pool in ("median", "mean")
    ]
    assert (table["support"] == 16).all()  # 20% of the 80 rows the new format read
    np.testing.assert_allclose(table["error_rate"], 1 - table["accuracy"])
    assert (table["error_rate_low"] <= table["error_rate_high"]).all()
    assert sum(pooled) >= 80  # every document pooled by the new pooling (per layer)


def _median(hidden, real):
    import torch

    masked = torch.where(real[..., None], hidden.float(), torch.nan)
    return masked.nanmedian(dim=1).values


class NearestMean(MeanDifferenceProbe):
    """A new probe kind (here the class-mean difference under another name)."""

    kind = "nearest_mean"


def read_pipes(path: str, encoding: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(readers.read_text(path, encoding)), sep="|")
