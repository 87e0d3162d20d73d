"""Ctrl-C (SIGINT) and SIGTERM in every phase of a run: what is kept on disk, the error, the
exit status, and a resume that ends as an uninterrupted run.

Each phase is stopped by a real signal sent to the process when the phase starts (a
Lightning callback's hook, or a wrapper around the function that begins the phase), never
by a timer. ``main`` runs ``train.py`` with the same hooks in a subprocess (real exit codes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lightning.pytorch.callbacks import Callback
from test_app import compose_cfg

from lmprobe import LinearProbe
from lmprobe.errors import RunInterrupted

ROOT = Path(__file__).resolve().parents[1]
SIGNALS = {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM}

# phase -> the overrides it needs (a validation split, the baseline, small scoring chunks)
PHASE_OVERRIDES = {
    "store": [],
    "train": [],
    "validation": ["data.val_size=0.2"],
    "test": [],
    # late in the test pass: some rows were scored (a chunk of 16) inside Lightning's
    # inference mode, some wait in the buffer
    "test-late": ["callbacks.probe_metrics.chunk_rows=16"],
    "baseline": ["baseline=random_init"],
    "figure": [],
    "outputs": [],
}


class SignalAt(Callback):
    """Sends ``signum`` to this process once, when Lightning enters ``phase``: the start of
    the second training epoch (``train``: the first one trained the probes), the first
    validation pass, the test pass, the test pass's last batch (``test-late``), or the
    start of training (``baseline``: given to the baseline's Trainer only)."""

    def __init__(self, phase: str, signum: int) -> None:
        self.phase, self.signum, self.sent = phase, signum, False

    def _send(self, phase: str) -> None:
        if phase == self.phase and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_train_start(self, trainer, pl_module) -> None:
        self._send("baseline")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1:
            self._send("train")

    def on_validation_start(self, trainer, pl_module) -> None:
        self._send("validation")

    def on_test_start(self, trainer, pl_module) -> None:
        self._send("test")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == len(trainer.test_dataloaders) - 1:
            self._send("test-late")


def signal_once(function, signum: int, at_call: int = 1):
    """``function``, sending ``signum`` to this process as its ``at_call``-th call begins."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            os.kill(os.getpid(), signum)
        return function(*args, **kwargs)

    return wrapper


def phase_hooks(phase: str, signum: int) -> list[tuple[object, str, object]]:
    """(object, attribute, replacement) that send ``signum`` when ``phase`` starts."""
    import lmprobe.app.job
    import lmprobe.tracing.store

    if phase == "store":  # the feature store's fill, after its first batch was written
        tracer = lmprobe.tracing.store.Tracer
        signalling = type(
            "Signalling", (tracer,), {"__call__": signal_once(tracer.__call__, signum, 2)}
        )
        return [(lmprobe.tracing.store, "Tracer", signalling)]
    if phase == "figure":
        return [
            (
                lmprobe.app.job,
                "accuracy_by_layer",
                signal_once(lmprobe.app.job.accuracy_by_layer, signum),
            )
        ]
    if phase == "outputs":
        return [(lmprobe.app.job, "save_probes", signal_once(lmprobe.app.job.save_probes, signum))]
    # a Lightning phase: the main run's callbacks, or (baseline) the baseline run's, whose
    # training start is the baseline's first Lightning phase
    build_callbacks, built = lmprobe.app.job.build_callbacks, []

    def with_signal(cfg):
        callbacks = build_callbacks(cfg)
        built.append(1)
        if len(built) == (2 if phase == "baseline" else 1):
            callbacks.append(SignalAt(phase, signum))
        return callbacks

    return [(lmprobe.app.job, "build_callbacks", with_signal)]


def overrides(model_dir: Path, data: Path, phase: str, *extra: str) -> list[str]:
    return [
        "probes=gpt2_layers",
        "probes.submodules=[transformer.h.0.output,transformer.h.3.output]",
        f"model.name_or_path={model_dir}",
        "model.device=cpu",
        "data=csv",
        f"data.path={data}",
        "data.batch_size=8",
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
        "logger=none",
        *PHASE_OVERRIDES[phase],
        *extra,
    ]


def check_kept(run: Path, phase: str, how: str, message: str, store: Path | None = None) -> None:
    """What ``phase``'s interruption by ``how`` leaves in ``run`` and says (``message``)."""
    assert "\n" not in message, message
    kept = {p.name for p in run.iterdir()}
    assert ".lmprobe.lock" not in kept
    if phase == "store":  # nothing was trained: nothing kept, no checkpoint named
        assert not kept & {"metrics.csv", "probes", "last.ckpt"}, kept
        assert "before any probe was trained" in message and "ckpt_path" not in message
        assert store is not None and not list(store.glob(".*.tmp")), list(store.iterdir())
        return
    metrics = pd.read_csv(run / "metrics.csv", index_col="probe")
    assert list(metrics.index) == ["transformer.h.0.output", "transformer.h.3.output"]
    assert (metrics["steps"] > 0).all()
    index = json.loads((run / "probes" / "index.json").read_text())
    for name in metrics.index:
        assert LinearProbe.load(run / "probes" / index[name]).is_fitted
    if phase == "outputs":  # every output written, then stopped: nothing to resume
        assert "partial" not in metrics.columns and metrics["accuracy"].notna().all()
        assert {"per_class.csv", "accuracy_by_layer.png"} <= kept and "last.ckpt" not in kept
        assert "after it wrote every output" in message
        return
    assert "last.ckpt" in kept
    assert f"ckpt_path={run / 'last.ckpt'}" in message
    # the test pass had ended: its metrics are whole (SIGTERM at the test's last batch:
    # Lightning checks for it before each batch but the last, the pass ends first)
    if phase in ("baseline", "figure") or (phase, how) == ("test-late", "sigterm"):
        assert "partial" not in metrics.columns and metrics["accuracy"].notna().all()
        assert "per_class.csv" in kept and "accuracy_by_layer.png" not in kept
        assert not any(c.startswith("random_init") for c in metrics.columns)
        assert f"(no {'random_init baseline' if phase == 'baseline' else 'figure'} yet)" in message
    else:
        assert metrics["partial"].all() and "partial" in message
    if phase == "test-late":  # the rows scored before the signal, in the partial metrics
        assert (metrics["support"] > 0).all() and metrics["accuracy"].notna().all()


@pytest.fixture()
def phase_data(tmp_path_factory):
    from conftest import write_reviews_csv

    return write_reviews_csv(tmp_path_factory.mktemp("data") / "reviews.csv", 160)


@pytest.mark.parametrize("how", ["sigint", "sigterm"])
@pytest.mark.parametrize("phase", list(PHASE_OVERRIDES))
def test_a_signal_in_any_phase_keeps_what_was_computed(
    tiny_model_dir, phase_data, tmp_path, monkeypatch, feature_store_dir, phase, how
):
    from lmprobe.app.job import train

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    before = signal.getsignal(signal.SIGTERM)
    for target, name, value in phase_hooks(phase, SIGNALS[how]):
        monkeypatch.setattr(target, name, value)
    run = tmp_path / "run"
    with pytest.raises(RunInterrupted) as info:
        train(compose_cfg(run, overrides(tiny_model_dir, phase_data, phase)))
    check_kept(run, phase, how, str(info.value), feature_store_dir)
    # the process's own handlers are back (Lightning leaves Ctrl-C ignored after one)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) == before


def _probes(run: Path) -> dict[str, LinearProbe]:
    index = json.loads((run / "probes" / "index.json").read_text())
    return {name: LinearProbe.load(run / "probes" / f) for name, f in index.items()}


@pytest.mark.parametrize("phase", ["baseline", "figure"])
def test_a_run_stopped_after_its_test_pass_resumes_to_the_uninterrupted_results(
    tiny_model_dir, phase_data, tmp_path, monkeypatch, phase
):
    """Stopped (SIGTERM) in the baseline or the figure and resumed from its last.ckpt, a run
    ends with the probes (every coefficient) and metrics of an uninterrupted one, the
    baseline's included, and leaves no checkpoint (a finished run's last.ckpt is stale)."""
    from lmprobe.app.job import train

    args = overrides(tiny_model_dir, phase_data, "baseline")
    whole = tmp_path / "whole"
    train(compose_cfg(whole, args))
    assert not (whole / "last.ckpt").exists()
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        for target, name, value in phase_hooks(phase, signal.SIGTERM):
            patch.setattr(target, name, value)
        with pytest.raises(RunInterrupted):
            train(compose_cfg(run, args))
    train(compose_cfg(run, [*args, f"ckpt_path={run / 'last.ckpt'}"]))
    assert not (run / "last.ckpt").exists()
    assert (run / "accuracy_by_layer.png").exists()
    a, b = _probes(whole), _probes(run)
    assert a.keys() == b.keys()
    for name, probe in a.items():
        np.testing.assert_array_equal(b[name].classifier_.coef_, probe.classifier_.coef_, name)
        np.testing.assert_array_equal(
            b[name].classifier_.intercept_, probe.classifier_.intercept_, name
        )
    columns = ["accuracy", "loss", "steps", "random_init_accuracy"]
    pd.testing.assert_frame_equal(
        pd.read_csv(whole / "metrics.csv", index_col="probe")[columns],
        pd.read_csv(run / "metrics.csv", index_col="probe")[columns],
    )


def test_a_resumed_run_leaves_no_stale_checkpoint(
    tiny_model_dir, phase_data, tmp_path, monkeypatch
):
    """A run stopped in training and resumed ends like a fresh one: no last.ckpt (a second
    resume from it would start from the interruption again)."""
    from lmprobe.app.job import train

    args = overrides(tiny_model_dir, phase_data, "train")
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        for target, name, value in phase_hooks("train", signal.SIGTERM):
            patch.setattr(target, name, value)
        with pytest.raises(RunInterrupted):
            train(compose_cfg(run, args))
    assert (run / "last.ckpt").exists()
    train(compose_cfg(run, [*args, f"ckpt_path={run / 'last.ckpt'}"]))
    assert not (run / "last.ckpt").exists()
    assert "partial" not in pd.read_csv(run / "metrics.csv").columns


def main() -> None:
    """``python -c 'import test_interruptions as t; t.main()' PHASE SIGNAL OVERRIDES...``:
    ``train.py`` with ``PHASE``'s hook sending ``SIGNAL`` (sigint, sigterm)."""
    import runpy

    phase, how, *args = sys.argv[1:]
    for target, name, value in phase_hooks(phase, SIGNALS[how]):
        setattr(target, name, value)
    sys.argv = [str(ROOT / "train.py"), *args]
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")


def _train_py(phase: str, how: str, *args: str) -> subprocess.CompletedProcess:
    """``train.py *args`` in a subprocess, ``phase`` stopped by ``how`` (``main``)."""
    code = "import sys; sys.path.insert(0, 'tests'); import test_interruptions as t; t.main()"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", code, phase, how, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


@pytest.mark.parametrize(
    "phase,how",
    [("baseline", "sigterm"), ("baseline", "sigint"), ("figure", "sigint"), ("store", "sigterm")],
)
def test_train_py_exits_non_zero_with_its_message(
    tiny_model_dir, phase_data, tmp_path, feature_store_dir, phase, how
):
    """Through train.py: SIGTERM in the baseline exited 0 with nothing written (Lightning's
    SIGTERM is a SystemExit without a code), SIGTERM while the store filled killed the
    process (its temporary files left): now status 1, lmprobe's line, what was computed."""
    run = tmp_path / "run"
    result = _train_py(
        phase, how, f"hydra.run.dir={run}", *overrides(tiny_model_dir, phase_data, phase)
    )
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    lines = [line for line in result.stderr.splitlines() if "RunInterrupted: " in line]
    assert len(lines) == 1, result.stderr[-3000:]
    check_kept(run, phase, how, lines[0].split("RunInterrupted: ", 1)[1], feature_store_dir)


def test_a_signal_stops_a_sweep(tiny_model_dir, phase_data, tmp_path):
    """Ctrl-C in a sweep's first job stops the sweep with status 1 and lmprobe's line (it
    was recorded in the job's error.txt and the next job ran)."""
    sweep = tmp_path / "sweep"
    result = _train_py(
        "figure",
        "sigint",
        "-m",
        "seed=0,1",
        f"hydra.sweep.dir={sweep}",
        *overrides(tiny_model_dir, phase_data, "figure"),
    )
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0"]
    lines = [line for line in result.stderr.splitlines() if "RunInterrupted: " in line]
    assert len(lines) == 1, result.stderr[-3000:]
    check_kept(sweep / "0", "figure", "sigint", lines[0].split("RunInterrupted: ", 1)[1])
    assert not (sweep / "0" / "error.txt").exists()
