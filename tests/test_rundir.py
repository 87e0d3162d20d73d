"""A run owns its run directory: earlier results are refused or replaced on request, a lock
stops a concurrent run, outputs that cannot be written are kept elsewhere, and every row
left out of the data is counted in dropped_rows.csv."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
from conftest import make_texts
from omegaconf import open_dict
from test_app import compose_cfg

from lmprobe import LinearProbe, LmProbeError
from lmprobe.app.job import train
from lmprobe.results.rundir import LOCK_NAME


@pytest.fixture()
def tiny_cfg(tmp_path, tiny_model_dir):
    """test_app's tiny run: twelve probes of the tiny GPT-2 on 160 short texts."""
    texts, labels = make_texts(160, seed=4)
    path = tmp_path / "reviews.csv"
    pd.DataFrame({"text": texts, "label": labels}).to_csv(path, index=False)
    return compose_cfg(
        tmp_path / "run",
        [
            "probes=gpt2_layers",
            f"model.name_or_path={tiny_model_dir}",
            "model.device=cpu",
            "data=csv",
            f"data.path={path}",
            "data.batch_size=8",
            "trainer.max_epochs=2",
            "trainer.enable_progress_bar=false",
        ],
    )


def one_line(excinfo: pytest.ExceptionInfo, *names: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for name in names:
        assert name in message, (name, message)
    return message


def shrink(cfg) -> None:
    with open_dict(cfg):
        cfg.trainer.max_epochs = 1
        cfg.logger = None


def test_a_second_run_into_a_used_directory_is_refused_unless_overwrite(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    shrink(tiny_cfg)
    train(tiny_cfg)
    keep = run / "notes.txt"  # the user's own file: never lmprobe's to remove
    keep.write_text("mine")
    stale = run / "probes" / "old-probe-0123456789.safetensors"
    stale.write_bytes(b"x")
    (run / "last.ckpt").write_bytes(b"x")
    with pytest.raises(LmProbeError) as excinfo:
        train(tiny_cfg)
    one_line(excinfo, str(run), "metrics.csv", "probes", "overwrite=true")
    assert not (run / LOCK_NAME).exists()  # released on the way out
    with open_dict(tiny_cfg):
        tiny_cfg.overwrite = True
    train(tiny_cfg)
    assert keep.read_text() == "mine"
    assert not stale.exists() and not (run / "last.ckpt").exists()
    index = json.loads((run / "probes" / "index.json").read_text())
    assert sorted(p.name for p in (run / "probes").glob("*.safetensors")) == sorted(index.values())
    assert not (run / LOCK_NAME).exists()


def test_a_held_lock_makes_a_concurrent_run_fail_fast(tiny_cfg, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    import socket

    # a live process of this host holds it (this one: certainly alive)
    (run / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    loaded = []
    monkeypatch.setattr("lmprobe.app.job.load_model", lambda *a: loaded.append(1))
    with pytest.raises(LmProbeError) as excinfo:
        train(tiny_cfg)
    one_line(excinfo, "in use by another run", str(run / LOCK_NAME), str(os.getpid()))
    assert not loaded  # refused before the model loads
    assert (run / LOCK_NAME).exists()  # someone else's lock stays


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    import socket
    import subprocess
    import sys

    from lmprobe.results.rundir import claim_run_dir

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    pid = int(dead.stdout)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    with claim_run_dir(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_loggers_config_alone_is_no_result(tmp_path):
    """A run stopped before any result (a full store, say) leaves only the config its
    loggers logged at the start: the next run may use the directory; a logged metric,
    or a figure's events file, is a result."""
    from lmprobe.results.rundir import claim_run_dir

    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "hparams.yaml").write_text("seed: 0\n")
    (tmp_path / "tensorboard" / "version_0").mkdir(parents=True)
    (tmp_path / "tensorboard" / "version_0" / "hparams.yaml").write_text("seed: 0\n")
    with claim_run_dir(tmp_path):
        pass
    (tmp_path / "csv" / "metrics.csv").write_text("step\n")
    with pytest.raises(LmProbeError, match=r"holds an earlier run's results \(csv\); set "):
        with claim_run_dir(tmp_path):
            pass
    (tmp_path / "csv" / "metrics.csv").unlink()
    (tmp_path / "tensorboard" / "events.out.tfevents.1").write_bytes(b"")
    with pytest.raises(LmProbeError, match=r"results \(tensorboard\); set "):
        with claim_run_dir(tmp_path):
            pass


def test_resume_in_the_runs_own_directory_is_allowed(tiny_cfg, tmp_path):
    from lmprobe.errors import RunInterrupted

    run = tmp_path / "run"
    shrink(tiny_cfg)
    with open_dict(tiny_cfg):
        tiny_cfg.trainer.max_epochs = 2
        tiny_cfg.probes.early_stopping = False
        tiny_cfg.probes.model_kwargs = {"alpha": 0.01}
        tiny_cfg.callbacks.interrupt = {"_target_": "conftest.InterruptAt", "batch": 3}
    with pytest.raises(RunInterrupted):
        train(tiny_cfg)
    assert (run / "last.ckpt").exists()
    with open_dict(tiny_cfg):
        del tiny_cfg.callbacks["interrupt"]
    with pytest.raises(LmProbeError, match="ckpt_path="):  # a fresh run: refused
        train(tiny_cfg)
    with open_dict(tiny_cfg):
        tiny_cfg.ckpt_path = str(run / "last.ckpt")
    table = train(tiny_cfg)
    assert len(table) == 12 and "partial" not in pd.read_csv(run / "metrics.csv").columns


def test_a_save_failure_keeps_the_probes_and_names_the_path(tiny_cfg, tmp_path, monkeypatch):
    """save_probes fails in the run directory (a full disk, say): the run ends with an error
    naming the path, and the probes, metrics and a checkpoint are in the rescue directory."""
    import lmprobe.app.job
    from lmprobe.probes.base import load_probe

    run = tmp_path / "run"
    shrink(tiny_cfg)
    real = lmprobe.app.job.save_probes

    def full_disk(probes, directory, label_names):
        if directory.parent == run:
            raise OSError(28, "No space left on device", str(directory))
        return real(probes, directory, label_names)

    monkeypatch.setattr(lmprobe.app.job, "save_probes", full_disk)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with pytest.raises(LmProbeError) as excinfo:
        train(tiny_cfg)
    message = one_line(excinfo, str(run / "probes"), "No space left on device")
    (rescue,) = (tmp_path / "tmp").glob("lmprobe-rescue-*")
    assert str(rescue) in message
    index = json.loads((rescue / "probes" / "index.json").read_text())
    assert len(index) == 12
    probe = load_probe(rescue / "probes" / index["transformer.h.3.output"])
    assert isinstance(probe, LinearProbe) and probe.is_fitted
    assert len(pd.read_csv(rescue / "metrics.csv")) == 12
    assert (rescue / "last.ckpt").stat().st_size > 0
    assert (run / "metrics.csv").exists()  # what could be written is where it belongs
    assert not (run / LOCK_NAME).exists()


def test_a_file_in_the_way_of_probes_is_refused_before_training(tiny_cfg, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "probes").write_text("in the way")
    monkeypatch.setattr("lmprobe.app.job.load_model", lambda *a: pytest.fail("model loaded"))
    with pytest.raises(LmProbeError) as excinfo:
        train(tiny_cfg)
    one_line(excinfo, str(run), "probes", "overwrite=true")


def test_dropped_rows_are_logged_and_recorded(tmp_path, tiny_model_dir, caplog):
    texts, labels = make_texts(60, seed=3)
    rows = [{"text": t, "label": lab, "source": "a"} for t, lab in zip(texts, labels, strict=True)]
    rows += [{"text": "", "label": 1, "source": "a"}] * 2  # empty text
    rows += [{"text": "   ", "label": 0, "source": "a"}]  # blank text
    rows += [{"text": "good day", "label": None, "source": "a"}] * 3  # no label
    rows += [{"text": "good day", "label": 1, "source": "b"}] * 4  # excluded
    path = tmp_path / "d.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    cfg = compose_cfg(
        tmp_path / "run",
        [
            "probes=gpt2_layers",
            "probes.submodules=[transformer.h.1.output]",
            f"model.name_or_path={tiny_model_dir}",
            "model.device=cpu",
            "data=csv",
            f"data.path={path}",
            "data.exclude={source: [b]}",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            "logger=none",
        ],
    )
    train(cfg)
    table = pd.read_csv(tmp_path / "run" / "dropped_rows.csv")
    assert list(table.columns) == ["split", "file", "reason", "rows"]
    by_reason = dict(zip(table["reason"], table["rows"], strict=True))
    assert by_reason == {
        "data.exclude: source in ['b']": 4,
        "no label (empty 'label')": 3,
        "no text (empty 'text')": 3,
    }
    assert "3 rows left out: no label" in caplog.text
