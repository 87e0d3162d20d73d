"""Baselines that need another model: the same architecture with re-initialised weights.

A probe on a randomly initialised network measures what the architecture and the input
tokens make decodable before any training; a property that is as decodable there is not
evidence of what the trained model learned (e.g. Hewitt & Liang 2019, Voita & Titov 2020).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from lmprobe.errors import LmProbeError
from lmprobe.integrations.transformers import mark_uninitialised
from lmprobe.tracing.models import torch_module

BASELINES = ("random_init",)


def random_init_copy(lm: Any, seed: int) -> Any:
    """A copy of ``lm`` (an nnsight model) with every weight re-initialised, seeded: the
    model's own initialisation (``init_weights``, as ``from_config`` would give)."""
    from nnsight import TransformersModel

    module = copy.deepcopy(torch_module(lm))
    if not hasattr(module, "init_weights"):
        raise LmProbeError(
            f"baseline=random_init needs a Hugging Face model with init_weights; "
            f"{type(module).__name__} has none"
        )
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(seed)
        mark_uninitialised(module)  # init_weights skips weights marked initialised
        module.init_weights()
    module.eval().requires_grad_(False)
    return TransformersModel(module, tokenizer=lm.tokenizer, task="text-generation")


def check_baseline(baseline: str | None) -> None:
    if baseline is not None and baseline not in BASELINES:
        raise LmProbeError(
            f"baseline={baseline!r} is not a baseline; use one of {', '.join(BASELINES)} or null"
        )


def merge_baseline(table: Any, baseline_table: Any, baseline: str) -> Any:
    """The baseline's accuracy (and interval) beside each probe's, as ``<baseline>_<metric>``."""
    table = table.copy()
    for metric in ("accuracy", "accuracy_low", "accuracy_high", "r2"):
        if metric in baseline_table.columns:
            table[f"{baseline}_{metric}"] = baseline_table[metric].reindex(table.index)
    return table
