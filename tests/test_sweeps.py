"""Sweeps through Hydra's submitit launcher (``hydra/launcher=local``, the SLURM launcher's
local twin): every job in a process of its own, with the results the same job gives when
run in this process."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import make_texts
from test_app import compose_cfg, run_sweep

from lmprobe.app.job import train

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")


@pytest.fixture()
def csv_file(tmp_path):
    texts, labels = make_texts(160, seed=4)
    path = tmp_path / "reviews.csv"
    pd.DataFrame(
        {"text": texts, "label": ["positive" if y else "negative" for y in labels]}
    ).to_csv(path, index=False)
    return path


def test_a_submitit_local_sweep_runs_each_job_in_its_own_process(
    tmp_path, tiny_model_dir, csv_file
):
    sweep, _ = run_sweep(
        tmp_path,
        tiny_model_dir,
        str(csv_file),
        "hydra/launcher=local",
        "logger=none",
        "probes.pooling=mean,last",
    )
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in jobs] == ["0", "1"]
    tables = [pd.read_csv(job / "metrics.csv", index_col="probe") for job in jobs]
    assert [len(t) for t in tables] == [12, 12]
    assert not tables[0]["loss"].equals(tables[1]["loss"])  # mean and last pooling differ
    # submitit ran them: one log folder per job, each with the job's own output
    logs = sorted(d for d in (sweep / ".submitit").iterdir() if d.name.isdigit())
    assert len(logs) == 2 and all(any(d.glob("*_log.out")) for d in logs)
    # the mean-pooling job's metrics are those of the same run in this process
    run = tmp_path / "reference"
    train(
        compose_cfg(
            run,
            [
                "probes=gpt2_layers",
                f"model.name_or_path={tiny_model_dir}",
                "data=csv",
                f"data.path={csv_file}",
                "trainer.max_epochs=1",
                "trainer.enable_progress_bar=false",
                "logger=none",
                "probes.pooling=mean",
            ],
        )
    )
    expected = pd.read_csv(run / "metrics.csv", index_col="probe")
    job = next(
        t
        for t, d in zip(tables, jobs, strict=True)
        if "mean" in (d / ".hydra" / "overrides.yaml").read_text()
    )
    pd.testing.assert_frame_equal(job, expected, check_exact=True)
