"""Poolings: how a document's token activations become one feature vector.

``POOLINGS`` is the registry: a name and a function ``(hidden, real) -> pooled`` where
``hidden`` is (documents, tokens, d) on the model's device and ``real`` (documents, tokens)
is true at real tokens. Adding a pooling is one function here, decorated with
``@register_pooling("name")``; ``pooling="name"`` / ``probes.pooling=name`` then selects it.
``"none"`` (one row per token, a token-level probe) is not a pooling of documents and is
handled by the trace itself.

Padding positions are excluded with ``where`` rather than multiplied by zero, so a NaN in a
padding position (fully masked attention rows can produce one) never leaks in (``mean``'s
CPU shortcut multiplies, and in a batch with padding falls back to ``where`` when the
result is not finite).
Results are float32, and sums accumulate in float32, so bf16/fp16 models pool as precisely
as fp32 ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lmprobe.integrations.torch import tensor_version

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
    if hidden.device.type == "cpu" and hidden.dtype == torch.float32:
        # On the CPU one batched product with each document's weights (1 / its length at
        # a real token, 0 at padding) reads the activations once and is the mean itself,
        # where `where` + `sum` write a masked copy and read it again: less than half the
        # time per site on the CPU benchmark's batches. The weights already divide, so no
        # op follows the product: inside a trace every extra small op per site cost far
        # more than it does on its own (see _last_weights). A NaN or inf at a padding
        # position would leak through the product (0 x NaN), so a sum that is not finite
        # is redone the masked way below (on the CPU, asking makes nothing wait). A batch
        # without padding (most length-sorted ones) has no such position: every weight is
        # > 0, so a product that is not finite comes from a real activation that is not,
        # as the masked way's would; it skips the check, two ops per site.
        weights, padded = _mean_weights(real)
        pooled = torch.bmm(weights, hidden).squeeze(1)
        if not padded or math.isfinite(pooled.sum()):
            return pooled
    total = torch.where(real.unsqueeze(-1), hidden, 0).sum(1, dtype=torch.float32)
    return total / real.sum(1, keepdim=True).to(torch.float32)


# The weights of the last mask ``mean`` saw: a trace pools every site with one mask, so
# they are made once per batch, which halved the shortcut's time per site (inside nnsight's
# trace the 12 poolings of a CPU-benchmark batch took 1.1 ms against 0.2 ms in a hot loop:
# in the middle of a forward every small op costs more, as the model's weights leave the
# CPU's cache with time; bench/README.md). Kept as (mask, its version, weights): the
# version changes when the mask is modified in place. Inference tensors (made under
# torch.inference_mode) have no version, so theirs are not kept (``trace_features`` makes
# its mask outside inference mode, so Lightning's test steps keep theirs too).
_last_weights: tuple[torch.Tensor, int, tuple[torch.Tensor, bool]] | None = None


def _mean_weights(real: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(documents, 1, tokens) float32: 1 / the document's length at its real tokens, else 0;
    and whether the mask has a padding position."""
    global _last_weights
    if real.is_inference():
        return _weights(real)
    cached = _last_weights  # read once: another thread may replace it meanwhile
    version = tensor_version(real)
    if cached is None or cached[0] is not real or cached[1] != version:
        cached = _last_weights = (real, version, _weights(real))
    return cached[2]


def _weights(real: torch.Tensor) -> tuple[torch.Tensor, bool]:
    mask = real.to(torch.float32)
    return (mask / mask.sum(1, keepdim=True)).unsqueeze(1), not bool(real.all())


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


# ------------------------------------------------------------------ words
# Word poolings: which subwords of a word make its feature (word-level data, one row per
# word; ``probes.word_pooling``). A word pooling is a function ``(word_ids) -> chosen`` on
# the host: ``word_ids`` (documents, tokens) holds each subword's word (-1 for none), and
# ``chosen`` (same shape, bool) marks the subwords to average for their word. The trace
# then averages the chosen subwords of each word (``lmprobe.tracing.features.pool_words``): one
# subword for first/last, all for mean.
WordPooling = Callable[[torch.Tensor], torch.Tensor]

WORD_POOLINGS: dict[str, WordPooling] = {}


def register_word_pooling(name: str) -> Callable[[WordPooling], WordPooling]:
    def register(fn: WordPooling) -> WordPooling:
        WORD_POOLINGS[name] = fn
        return fn

    return register


def _word_extreme(word_ids: torch.Tensor, reduce: str) -> torch.Tensor:
    """True at the first (``amin``) or last (``amax``) subword of each word."""
    n_docs, n_tokens = word_ids.shape
    positions = torch.arange(n_tokens).expand(n_docs, n_tokens)
    n_words = int(word_ids.max()) + 1 if word_ids.numel() else 0
    slot = torch.where(word_ids >= 0, word_ids, n_words)  # -1 goes to a spare last slot
    fill = n_tokens if reduce == "amin" else -1
    extreme = torch.full((n_docs, n_words + 1), fill, dtype=torch.long)
    extreme = extreme.scatter_reduce(1, slot, positions, reduce=reduce)
    return (word_ids >= 0) & (positions == extreme.gather(1, slot))


@register_word_pooling("first")
def first_subword(word_ids: torch.Tensor) -> torch.Tensor:
    return _word_extreme(word_ids, "amin")


@register_word_pooling("last")
def last_subword(word_ids: torch.Tensor) -> torch.Tensor:
    return _word_extreme(word_ids, "amax")


@register_word_pooling("mean")
def every_subword(word_ids: torch.Tensor) -> torch.Tensor:
    return word_ids >= 0
