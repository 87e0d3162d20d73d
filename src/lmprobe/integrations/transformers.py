"""transformers internals lmprobe relies on: the private ``_is_hf_initialized`` mark with
which ``PreTrainedModel.init_weights`` skips modules loaded from a checkpoint. The random
initialisation baseline clears it so that every weight is drawn anew. ``check()`` lists what
an installed transformers lacks."""

from __future__ import annotations

import inspect

import torch

TESTED = ("5.25",)  # major.minor releases checked (tests/test_integrations.py)


def mark_uninitialised(module: torch.nn.Module) -> None:
    """Every submodule of ``module`` is initialised again by its next ``init_weights``."""
    for submodule in module.modules():
        if hasattr(submodule, "_is_hf_initialized"):
            submodule._is_hf_initialized = False


def check() -> list[str]:
    """The internals lmprobe uses that the installed transformers lacks (empty: all there)."""
    from transformers import modeling_utils

    return (
        []
        if "_is_hf_initialized" in inspect.getsource(modeling_utils)
        else ["modeling_utils: _is_hf_initialized"]
    )
