"""``FeatureExtractor``: lm_probe's direct access to a model's activations, one trace per call."""

from __future__ import annotations

from typing import Any

import torch

from lmprobe.errors import LmProbeError
from lmprobe.probes.config import ProbeConfig
from lmprobe.tracing.features import FeatureKey
from lmprobe.tracing.loop import Tracer, gathered, trace_batches
from lmprobe.tracing.models import check_submodules, load_language_model


class FeatureExtractor:
    """``FeatureExtractor(model)(submodules, input_ids, attention_mask)``: the activations of
    each submodule (a dotted nnsight path ending in ``.output``/``.input``), mean-pooled over
    real tokens to (documents, d) with ``pool=True``, else (documents, tokens, d). Tensors
    come back on the CPU in float32. ``cache=True`` keeps the result for ``get_cached``."""

    def __init__(self, model: Any, remote: bool = False) -> None:
        self.model = load_language_model(model)
        self.remote = remote
        self._cache: dict[str, torch.Tensor] = {}

    def __repr__(self) -> str:
        config = getattr(self.model, "config", None)
        return f"Extractor for {getattr(config, 'model_type', type(self.model).__name__)}"

    def __call__(
        self,
        submodules: list[str],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pool: bool = True,
        cache: bool = False,
    ) -> dict[str, torch.Tensor]:
        if pool and attention_mask is None:
            raise ValueError("Attention mask required for mean pooling")
        if not cache:
            self._cache.clear()
        submodules = list(submodules)
        for path in submodules:
            ProbeConfig(path, [0, 1])  # the same one-line errors as a probe's submodule
        check_submodules(self.model, submodules)
        ids = torch.as_tensor(input_ids).long()
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask)
        mask = mask.long().reshape(ids.shape)
        empty = (mask.sum(1) == 0).nonzero()
        if pool and len(empty):
            raise LmProbeError(
                f"document {int(empty[0, 0])} has no real token (attention_mask all 0): "
                f"nothing to mean-pool; drop empty texts"
            )
        pooling = "mean" if pool else "none"
        keys = [FeatureKey(path, pooling, None) for path in submodules]
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": torch.zeros(ids.shape if not pool else ids.shape[:1], dtype=torch.long),
            "index": torch.arange(len(ids)),
        }
        tracer = Tracer(self.model, submodules, remote=self.remote)
        label = f"documents 0-{len(ids)}"
        features = gathered(trace_batches(tracer.of(keys, all_positions=True), [batch], label))
        output = {}
        for key in keys:
            X = torch.from_numpy(features[key].X)
            output[key.submodule] = X if pool else X.reshape(*ids.shape, -1)
        if cache:
            self._cache = dict(output)
        return output

    def get_cached(self, name: str) -> torch.Tensor:
        try:
            return self._cache[name]
        except KeyError:
            raise KeyError(f"No cached features for {name}") from None

    def clear_cache(self) -> None:
        self._cache.clear()
