"""lmprobe: banks of linear probes on the activations of a frozen language model."""

from lmprobe.config import ProbeConfig
from lmprobe.data import ProbeDataModule, ProbeDataset
from lmprobe.errors import LmProbeError, NonFiniteActivationError
from lmprobe.module import ProbeModule
from lmprobe.probes import LinearProbe
from lmprobe.runner import ProbeRunner

__all__ = [
    "LinearProbe",
    "LmProbeError",
    "NonFiniteActivationError",
    "ProbeConfig",
    "ProbeDataModule",
    "ProbeDataset",
    "ProbeModule",
    "ProbeRunner",
]
