"""Poolings: how a document's token activations become one feature vector.

``POOLINGS`` is the registry: a name and a function ``(hidden, real) -> pooled`` where
``hidden`` is (documents, tokens, d) on the model's device and ``real`` (documents, tokens)
is true at real tokens. Adding a pooling is one function here, decorated with
``@register_pooling("name")``; ``pooling="name"`` / ``probes.pooling=name`` then selects it.
``"none"`` (one row per token, a token-level probe) is not a pooling of documents and is
handled by the trace itself.

Padding positions are excluded with ``where`` rather than multiplied by zero, so a NaN in a
padding position (fully masked attention rows can produce one) never leaks in. Results are
float32, and sums accumulate in float32, so bf16/fp16 models pool as precisely as fp32 ones.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Pooling = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

POOLINGS: dict[str, Pooling] = {}
TOKEN_LEVEL = "none"


def register_pooling(name: str) -> Callable[[Pooling], Pooling]:
    def register(fn: Pooling) -> Pooling:
        POOLINGS[name] = fn
        return fn

    return register


def pooling_names() -> tuple[str, ...]:
    """Every value ``pooling`` accepts."""
    return (*POOLINGS, TOKEN_LEVEL)


@register_pooling("mean")
def mean(hidden: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    total = torch.where(real.unsqueeze(-1), hidden, 0).sum(1, dtype=torch.float32)
    return total / real.sum(1, keepdim=True).to(torch.float32)


@register_pooling("last")
def last(hidden: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(real.shape[1], device=real.device)
    return _at(hidden, torch.where(real, positions, -1).amax(1))


@register_pooling("first")
def first(hidden: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(real.shape[1], device=real.device)
    return _at(hidden, torch.where(real, positions, real.shape[1]).amin(1))


@register_pooling("max")
def max_(hidden: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    return torch.where(real.unsqueeze(-1), hidden, float("-inf")).amax(1).float()


def _at(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The vector at position ``index[i]`` of each document ``i``."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index].float()
