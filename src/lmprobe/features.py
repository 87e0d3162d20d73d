"""Turning one batch into probe features: a single nnsight trace, reads in forward order,
pooling on the model's device, and an early stop after the deepest site needed."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, NamedTuple

import nnsight
import numpy as np
import torch

from lmprobe.config import ProbeConfig
from lmprobe.errors import NonFiniteActivationError
from lmprobe.models import envoy_at, input_device

log = logging.getLogger("lmprobe")


class FeatureKey(NamedTuple):
    """What a probe reads. Probes with equal keys share one feature matrix."""

    submodule: str
    pooling: str
    null_label: int | None

    @classmethod
    def of(cls, config: ProbeConfig) -> FeatureKey:
        return cls(config.submodule, config.pooling, config.null_label)


class Features(NamedTuple):
    """Rows of one feature matrix with their labels and the dataset row each came from."""

    X: np.ndarray
    y: np.ndarray
    doc: np.ndarray

    def select_docs(self, docs: np.ndarray) -> Features:
        keep = np.isin(self.doc, docs)
        return Features(self.X[keep], self.y[keep], self.doc[keep])

    @staticmethod
    def concat(parts: list[Features]) -> Features:
        return Features(
            np.concatenate([p.X for p in parts]),
            np.concatenate([p.y for p in parts]),
            np.concatenate([p.doc for p in parts]),
        )


def pool(hidden: torch.Tensor, keep: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool ``hidden`` (batch, tokens, d) over the positions where ``keep`` is true.

    Padding positions are excluded with ``where`` rather than multiplied by zero, so a NaN in
    a padding position (fully masked attention rows can produce one) never leaks in. Sums
    accumulate in float32 so bf16/fp16 models pool as precisely as fp32 ones.
    """
    if pooling == "none":
        return hidden[keep].float()
    mask = keep.unsqueeze(-1)
    if pooling == "mean":
        total = torch.where(mask, hidden, 0).sum(1, dtype=torch.float32)
        return total / keep.sum(1, keepdim=True).to(torch.float32)
    if pooling == "max":
        return torch.where(mask, hidden, float("-inf")).amax(1).float()
    positions = torch.arange(keep.shape[1], device=keep.device)
    if pooling == "first":
        index = torch.where(keep, positions, keep.shape[1]).amin(1)
    elif pooling == "last":
        index = torch.where(keep, positions, -1).amax(1)
    else:
        raise ValueError(f"unknown pooling {pooling!r}")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index].float()


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only, so a left-padded text sees the same positions
    as the text alone (HF models otherwise number padding positions too)."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def trace_features(
    lm: Any,
    batch: dict[str, torch.Tensor],
    keys: Iterable[FeatureKey],
    order: dict[str, int],
    *,
    accepts_position_ids: bool = True,
    remote: bool = False,
    batch_label: str = "",
    on_nonfinite: str = "error",
) -> dict[FeatureKey, Features]:
    """Run the LM once on ``batch`` and return the pooled features of every key."""
    keys = list(dict.fromkeys(keys))
    device = input_device(lm)
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    attention_mask = batch["attention_mask"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if accepts_position_ids:
        inputs["position_ids"] = position_ids_for(attention_mask)
    real = attention_mask.bool()
    token_keep = {
        key: real if key.null_label is None else real & (labels != key.null_label)
        for key in keys
        if key.pooling == "none"
    }
    by_site: dict[str, list[FeatureKey]] = {}
    for key in keys:
        by_site.setdefault(key.submodule, []).append(key)
    sites = sorted(by_site, key=order.__getitem__)
    saved: dict[FeatureKey, torch.Tensor] = {}
    trace_kwargs = {"remote": True} if remote else {}
    with torch.no_grad(), lm.trace(inputs, **trace_kwargs) as tracer:
        for site in sites:
            module_path, _, kind = site.rpartition(".")
            envoy = envoy_at(lm, module_path)
            value = envoy.output if kind == "output" else envoy.input
            if isinstance(value, (tuple, list)):  # e.g. attention returns (hidden, weights)
                value = value[0]
            for key in by_site[site]:
                keep = token_keep.get(key, real)
                saved[key] = nnsight.save(pool(value, keep, key.pooling))
        tracer.stop()  # nothing after the deepest site is needed: skip the rest, lm_head too
    doc_index = batch["index"].to(device)
    results: dict[FeatureKey, Features] = {}
    for key in keys:
        X = saved[key]
        if key.pooling == "none":
            keep = token_keep[key]
            y = labels[keep]
            doc = doc_index.unsqueeze(1).expand_as(keep)[keep]
        else:
            y = labels
            doc = doc_index
            if key.null_label is not None:
                rows = labels != key.null_label
                X, y, doc = X[rows], y[rows], doc[rows]
        finite = torch.isfinite(X).all(1)
        if not bool(finite.all()):
            bad_docs = doc[~finite].unique().tolist()
            if on_nonfinite == "error":
                raise NonFiniteActivationError(
                    f"non-finite activations (NaN/inf) at {key.submodule} in {batch_label} "
                    f"(documents {bad_docs[:5]}); use a wider dtype (e.g. model.dtype=float32) "
                    f"or set on_nonfinite=skip to drop such rows"
                )
            log.warning(
                "skipping %d rows with non-finite activations at %s in %s (documents %s)",
                int((~finite).sum()),
                key.submodule,
                batch_label,
                bad_docs[:5],
            )
            X, y, doc = X[finite], y[finite], doc[finite]
        results[key] = Features(
            X.to("cpu", non_blocking=True), y.to("cpu", non_blocking=True), doc.to("cpu")
        )
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    return {key: Features(f.X.numpy(), f.y.numpy(), f.doc.numpy()) for key, f in results.items()}
