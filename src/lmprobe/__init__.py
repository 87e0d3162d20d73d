"""lmprobe: banks of linear probes on the activations of a frozen language model."""

from lmprobe.bank.bank import ProbeBank
from lmprobe.data.datamodule import ProbeDataModule
from lmprobe.data.dataset import ProbeDataset
from lmprobe.errors import LmProbeError, NonFiniteActivationError
from lmprobe.probes.base import PROBE_KINDS, Probe, register_probe_kind
from lmprobe.probes.config import ProbeConfig
from lmprobe.probes.kinds import LinearProbe, MeanDifferenceProbe, RegressionProbe
from lmprobe.tracing.extractor import FeatureExtractor
from lmprobe.training.module import ProbeModule
from lmprobe.training.runner import ProbeRunner
from lmprobe.version import __version__

__all__ = [
    "__version__",
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
    "config": "lmprobe.app.banks",
    "engine": "lmprobe.training.engine",
    "callbacks": "lmprobe.training.callbacks",
}


def __getattr__(name: str):
    if name in _OLD_TARGET_MODULES:
        import importlib

        return importlib.import_module(_OLD_TARGET_MODULES[name])
    raise AttributeError(f"module 'lmprobe' has no attribute {name!r}")
