"""torch internals lmprobe relies on: a tensor's private in-place version counter
(``Tensor._version``), which tells the mean pooling's weight cache that a mask it has seen
was changed in place. ``check()`` lists what an installed torch lacks."""

from __future__ import annotations

import torch

TESTED = ("2.13",)  # major.minor releases checked (tests/test_integrations.py)


def tensor_version(tensor: torch.Tensor) -> int:
    """How many times ``tensor`` was changed in place."""
    return tensor._version


def check() -> list[str]:
    """The internals lmprobe uses that the installed torch lacks (empty: all there)."""
    tensor = torch.zeros(1)
    before = getattr(tensor, "_version", None)
    if before is None:
        return ["Tensor._version"]
    tensor.add_(1)
    return [] if tensor._version == before + 1 else ["Tensor._version counts in-place changes"]
