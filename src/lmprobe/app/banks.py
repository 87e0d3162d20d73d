"""``probe_bank``: the probes of a Hydra ``probes`` config, found from the loaded model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lmprobe.errors import LmProbeError
from lmprobe.probes.config import EMBEDDINGS, ProbeConfig, check_listed_once
from lmprobe.probes.poolings import TOKEN_LEVEL
from lmprobe.tracing.models import decoder_block_paths


def probe_bank(
    model: Any,
    classes: Sequence[Any],
    submodules: str | Sequence[str] = "all_layers",
    site: str = "output",
    pooling: str | Sequence[str] = "mean",
    names: Sequence[str] | None = None,
    embeddings: bool = True,
    word_pooling: str | Sequence[str] = "first",
    words: bool = False,
    **options: Any,
) -> list[ProbeConfig]:
    """The probes of a Hydra ``probes`` config: one per submodule (and per pooling).

    ``submodules="all_layers"`` means one probe on every decoder block of whatever model is
    loaded (found from the model), and with ``embeddings`` (and ``site="output"``) one on
    the input of the first block, the embeddings: layer -1, named ``embeddings``, a baseline
    for what the blocks add. Otherwise ``submodules`` is a list of nnsight paths. Every other
    option (pooling, heldout_size, patience, kind, model_kwargs, ...) applies to the whole bank.
    """
    for key, values in (("submodules", submodules), ("pooling", pooling), ("names", names)):
        check_listed_once(f"probes.{key}", values)
    if words:
        check_listed_once("probes.word_pooling", word_pooling)
    test_size = options.pop("test_size", None)  # lm_probe's name for heldout_size
    if test_size is not None:
        options["heldout_size"] = test_size
    if isinstance(submodules, str):
        if submodules != "all_layers":
            raise LmProbeError(
                f"probes.submodules={submodules!r}: use 'all_layers' or a list of paths such "
                f"as [transformer.h.0.output]"
            )
        blocks = decoder_block_paths(model)
        if not blocks:
            raise LmProbeError(
                "could not find the decoder blocks of this model; list probes.submodules"
            )
        paths = {f"{block}.{site}": f"{block}.{site}" for block in blocks}
        if embeddings and site == "output":
            paths = {f"{blocks[0]}.input": EMBEDDINGS, **paths}
    else:
        paths = {path: path for path in submodules}
    poolings = [pooling] if isinstance(pooling, str) else list(pooling)
    # (pooling, word pooling) of each probe per site; the name shows the one that varies
    variants = [(pool, "first") for pool in poolings]
    if words:
        word_poolings = [word_pooling] if isinstance(word_pooling, str) else list(word_pooling)
        variants = [(TOKEN_LEVEL, pool) for pool in word_poolings]
    configs = []
    for path, label in paths.items():
        for pool, word_pool in variants:
            suffix = word_pool if words else pool
            name = label if len(variants) == 1 else f"{label}/{suffix}"
            configs.append(
                ProbeConfig(
                    path, classes, pooling=pool, name=name, word_pooling=word_pool, **options
                )
            )
    if names is not None:
        if len(names) != len(configs):
            raise LmProbeError(
                f"probes.names has {len(names)} entries for {len(configs)} probes; give one each"
            )
        for config, name in zip(configs, names, strict=True):
            config.name = name
    return configs
