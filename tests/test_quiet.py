"""A normal run prints what it is doing and nothing else: no advertisement, no deprecation
warnings from dependencies; progress bars and lmprobe's own log lines stay."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import write_reviews_csv

ROOT = Path(__file__).resolve().parents[1]


def test_a_train_py_run_is_quiet(tmp_path, tiny_model_dir):
    write_reviews_csv(tmp_path / "reviews.csv", 48)
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "probes=gpt2_layers",
            f"model.name_or_path={tiny_model_dir}",
            "data=csv",
            "data.path=reviews.csv",
            "trainer.max_epochs=1",
        ],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout + result.stderr
    # Lightning prints its warnings without their category: look for the words too
    for noise in ("litlogger", "Tip:", "DeprecationWarning", "FutureWarning", "deprecated"):
        assert noise not in printed, printed
    assert "Epoch 0/0" in printed and "Testing" in printed  # the progress bars
    assert "[lmprobe][INFO] - feature store:" in result.stdout  # lmprobe's log lines
    assert "Best probes by test accuracy" in result.stdout
