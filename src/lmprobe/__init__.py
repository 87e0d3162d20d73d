"""lmprobe: banks of linear probes on the activations of a frozen language model."""

__version__ = "0.2.0"

from lmprobe.data.datamodule import ProbeDataModule  # noqa: E402
from lmprobe.data.dataset import ProbeDataset  # noqa: E402
from lmprobe.errors import LmProbeError, NonFiniteActivationError  # noqa: E402
from lmprobe.probes.bank import ProbeBank  # noqa: E402
from lmprobe.probes.kinds import (  # noqa: E402
    PROBE_KINDS,
    LinearProbe,
    MeanDifferenceProbe,
    Probe,
    RegressionProbe,
    register_probe_kind,
)
from lmprobe.spec.config import ProbeConfig  # noqa: E402
from lmprobe.tracing.extractor import FeatureExtractor  # noqa: E402
from lmprobe.training.module import ProbeModule  # noqa: E402
from lmprobe.training.runner import ProbeRunner  # noqa: E402

__all__ = [
    "PROBE_KINDS",
    "FeatureExtractor",
    "LinearProbe",
    "LmProbeError",
    "MeanDifferenceProbe",
    "NonFiniteActivationError",
    "Probe",
    "ProbeBank",
    "ProbeConfig",
    "ProbeDataModule",
    "ProbeDataset",
    "ProbeModule",
    "ProbeRunner",
    "RegressionProbe",
    "register_probe_kind",
]

# Dotted names of lmprobe 0.2's flat layout that a user's Hydra config may name as a
# ``_target_`` (conf/model, conf/data, conf/probes, conf/trainer, conf/callbacks): Hydra
# resolves ``lmprobe.datamodule.ProbeDataModule`` by attribute, so each old module name
# resolves to its new module. Python imports of the old names are not kept.
_OLD_TARGET_MODULES = {
    "models": "lmprobe.tracing.models",
    "datamodule": "lmprobe.data.datamodule",
    "hfdata": "lmprobe.data.hf",
    "config": "lmprobe.spec.config",
    "engine": "lmprobe.training.engine",
    "callbacks": "lmprobe.training.callbacks",
}


def __getattr__(name: str):
    if name in _OLD_TARGET_MODULES:
        import importlib

        return importlib.import_module(_OLD_TARGET_MODULES[name])
    raise AttributeError(f"module 'lmprobe' has no attribute {name!r}")
