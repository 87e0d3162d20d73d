"""The ``lmprobe`` console command: ``train.py``'s Hydra app with the configs in the package.

``lmprobe [overrides]`` runs from any directory; ``lmprobe --config-dir DIR`` (or
``hydra.searchpath=[file://DIR]``) adds a folder of one's own groups (models, data,
experiments) beside the shipped ones.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from lmprobe.app.job import run_job


def config_dir() -> Path:
    """The shipped ``conf/``: inside the installed package (the wheel maps the repository's
    top-level ``conf/`` to ``lmprobe/conf``), else the source checkout's own."""
    package = Path(__file__).resolve().parents[1]  # src/lmprobe (or site-packages/lmprobe)
    packaged = package / "conf"
    return packaged if packaged.is_dir() else package.parents[1] / "conf"


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_job(cfg)


if __name__ == "__main__":
    main()
