"""The ``lmprobe`` console command, as a user gets it: the wheel installed in a fresh virtual
environment, run from an empty directory, with a config group of the user's own."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import write_reviews_csv

ROOT = Path(__file__).resolve().parents[1]

# What the user's own config folder adds: a data config of their own, built on a shipped one.
USER_DATA = """\
defaults:
  - csv
  - _self_

path: reviews.csv
batch_size: 8
"""


def quiet_env(**extra: str) -> dict[str, str]:
    """The environment without the repository on the path (no PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtual environment holding only the wheel built from this checkout (its
    dependencies are read from the running interpreter's site-packages); returns its bin/."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"  # a copy, so the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("src", "conf"):
        shutil.copytree(ROOT / name, source / name, ignore=skip)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"), "."],
        cwd=source,
        check=True,
        env=quiet_env(),
    )
    (wheel,) = (work / "dist").glob("lmprobe_lightning-*.whl")
    venv = work / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
        check=True,
    )
    # torch & co. from the running interpreter's site-packages: their .pth files (the
    # checkout's editable install among them) are not read from a path added this way
    (site_packages,) = venv.glob("lib/python*/site-packages")
    (site_packages / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run(
        [*pip, "--python", str(venv / "bin" / "python"), "install", "--no-deps", str(wheel)],
        check=True,
        env=quiet_env(),
    )
    return venv / "bin"


@pytest.mark.install
def test_lmprobe_command_runs_from_an_empty_directory(installed, tmp_path, tiny_model_dir):
    where = subprocess.run(
        [
            installed / "python",
            "-c",
            "import lmprobe.app.cli as c; print(c.__file__, c.config_dir())",
        ],
        cwd=tmp_path,
        env=quiet_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(Path(p).is_relative_to(installed.parent) for p in where), where  # not the checkout
    runs = {}
    for name, command, search in (
        ("lmprobe", [installed / "lmprobe"], ["--config-dir", "../my-conf"]),
        ("train.py", [sys.executable, ROOT / "train.py"], ["hydra.searchpath=[file://../my-conf]"]),
    ):
        cwd = tmp_path / name  # empty but for the user's data file
        cwd.mkdir()
        write_reviews_csv(cwd / "reviews.csv", 80)
        (tmp_path / "my-conf" / "data").mkdir(parents=True, exist_ok=True)
        (tmp_path / "my-conf" / "data" / "mine.yaml").write_text(USER_DATA)
        result = subprocess.run(
            [
                *command,
                *search,
                "probes=gpt2_layers",
                f"model.name_or_path={tiny_model_dir}",
                "data=mine",
                "trainer.max_epochs=1",
                "trainer.enable_progress_bar=false",
            ],
            cwd=cwd,
            env=quiet_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        (run,) = (cwd / "outputs" / "probe" / "runs").iterdir()
        assert (run / "train.log").is_file()
        runs[name] = pd.read_csv(run / "metrics.csv", index_col="probe")
    assert list(runs["lmprobe"].index) == [f"transformer.h.{i}.output" for i in range(12)]
    # the installed command and the checkout's train.py learn the same probes
    pd.testing.assert_frame_equal(runs["lmprobe"], runs["train.py"])
