"""lmprobe: banks of linear probes on the activations of a frozen language model."""

__version__ = "0.2.0"

from lmprobe.bank import ProbeBank  # noqa: E402
from lmprobe.config import ProbeConfig  # noqa: E402
from lmprobe.datamodule import ProbeDataModule  # noqa: E402
from lmprobe.dataset import ProbeDataset  # noqa: E402
from lmprobe.errors import LmProbeError, NonFiniteActivationError  # noqa: E402
from lmprobe.extractor import FeatureExtractor  # noqa: E402
from lmprobe.module import ProbeModule  # noqa: E402
from lmprobe.probes import (  # noqa: E402
    PROBE_KINDS,
    LinearProbe,
    MeanDifferenceProbe,
    Probe,
    RegressionProbe,
    register_probe_kind,
)
from lmprobe.runner import ProbeRunner  # noqa: E402

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
