"""Train a bank of linear probes on a frozen LM: ``python train.py [overrides]``.

Examples: ``python train.py`` (SmolLM2 on tweets, offline), ``python train.py probes=gpt2_layers``,
``python train.py -m probes.pooling=mean,last``. See conf/, the README and docs/running.md.
"""

import hydra
from omegaconf import DictConfig

from lmprobe.app.job import run_job


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_job(cfg)


if __name__ == "__main__":
    main()
