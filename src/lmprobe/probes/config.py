"""``ProbeConfig``: what one probe reads (submodule, pooling) and how it is trained."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lmprobe.errors import LmProbeError, plain
from lmprobe.probes.poolings import TOKEN_LEVEL, WORD_POOLINGS, pooling_names

SITE_SUFFIXES = ("output", "input")
# Rows handed to scikit-learn per call, and documents per length group (data.group_size).
DEFAULT_CHUNK_ROWS = 256


# The name of the probe on the embeddings (the first block's input) in a probe bank.
EMBEDDINGS = "embeddings"


@dataclass
class ProbeConfig:
    """One probe: an nnsight path such as ``transformer.h.5.mlp.output`` and its label set.

    The positional order and defaults up to ``model_kwargs`` are lm_probe's. ``test_size``
    (lm_probe's name; ``heldout_size`` is the clearer one) is the fraction of the *training*
    set held out (fixed and seeded) to decide early stopping, not a test split;
    ``patience`` / ``warmup_steps`` / ``max_steps`` count training batches and ``threshold``
    is the absolute improvement of the held-out loss that resets patience.
    ``pooling="none"`` trains a token-level probe (one label per token; padding and
    ``null_label`` positions are ignored); ``pool=False`` is lm_probe's spelling of that.
    On word-level data (CoNLL files, ``ProbeDataset(word_ids=...)``) such a probe gets one
    row per word instead, its subwords pooled by ``word_pooling``: ``first``, ``last`` or
    ``mean`` (``lmprobe.probes.poolings.WORD_POOLINGS``).
    ``model_kwargs`` go to the kind's scikit-learn estimator. ``kind`` names a registered
    probe kind (``lmprobe.probes.base.PROBE_KINDS``) or a class path. ``control`` adds a twin
    trained on control-task labels from the same features (Hewitt & Liang, 2019).
    ``refit``: once training ends, retrain the probe on every training row (its held-out
    slice included) with the alpha and the number of passes the slice chose.
    ``code_length``: once training ends, the online code length of a classifier's labels
    (MDL, ``metrics.csv``'s ``codelength_bits`` and ``compression``); ten more fits of the
    probe, so a large bank that does not read it can leave it out.
    """

    submodule: str
    classes: Sequence[Any] | None
    test_size: float = 0.1
    max_steps: int | None = None
    early_stopping: bool = True
    patience: int = 200
    threshold: float = 1e-4
    warmup_steps: int = 10
    pool: bool | None = None
    null_label: Any = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    pooling: str = "mean"
    name: str | None = None
    kind: str = "sgd_classifier"
    heldout_size: float | None = None
    control: bool = False
    refit: bool = True
    word_pooling: str = "first"
    code_length: bool = True

    def __post_init__(self) -> None:
        if self.pool is False:
            self.pooling = TOKEN_LEVEL
        if self.heldout_size is None:
            self.heldout_size = self.test_size
        elif self.test_size not in (self.heldout_size, 0.1):
            raise LmProbeError(
                f"probe {self.name or self.submodule!r}: test_size={self.test_size!r} and "
                f"heldout_size={self.heldout_size!r} name the same setting; give one"
            )
        self.test_size = self.heldout_size
        self.classes = list(self.classes) if self.classes is not None else None
        self.model_kwargs = dict(self.model_kwargs or {})
        if self.name is None:
            self.name = self.submodule
        self.validate()

    @property
    def site_kind(self) -> str:
        return self.submodule.rsplit(".", 1)[-1]

    @property
    def token_level(self) -> bool:
        return self.pooling == TOKEN_LEVEL

    def validate(self) -> None:
        where = f"probe {self.name!r}"
        if not isinstance(self.submodule, str) or "." not in self.submodule:
            raise LmProbeError(
                f"{where}: submodule {self.submodule!r} must be a dotted nnsight path ending in "
                f".output or .input, e.g. 'transformer.h.5.mlp.output'"
            )
        if self.site_kind not in SITE_SUFFIXES:
            raise LmProbeError(
                f"{where}: submodule {self.submodule!r} must end in .output or .input "
                f"(e.g. '{self.submodule}.output')"
            )
        if self.pooling not in pooling_names():
            raise LmProbeError(
                f"{where}: unknown pooling {self.pooling!r}; use one of "
                f"{', '.join(pooling_names())}"
            )
        if self.word_pooling not in WORD_POOLINGS:
            raise LmProbeError(
                f"{where}: unknown word_pooling {self.word_pooling!r}; use one of "
                f"{', '.join(WORD_POOLINGS)}"
            )
        from lmprobe.probes.base import resolve_probe_kind

        kind = resolve_probe_kind(self.kind)
        if not kind.needs_classes:
            if self.classes:
                raise LmProbeError(
                    f"{where}: kind {self.kind!r} predicts a number and takes no classes; "
                    f"pass classes=None"
                )
        elif not self.classes:
            raise LmProbeError(f"{where}: classes is empty; list the label values, e.g. [0, 1]")
        if kind.needs_classes and len(set(self.classes)) != len(self.classes):
            raise LmProbeError(
                f"{where}: classes {plain(self.classes)} has duplicates; list each once"
            )
        if kind.max_classes is not None and len(self.classes) > kind.max_classes:
            raise LmProbeError(
                f"{where}: kind {self.kind!r} takes at most {kind.max_classes} classes, not "
                f"{len(self.classes)}; use kind='sgd_classifier'"
            )
        if kind.needs_classes and len(self.classes) < 2:
            raise LmProbeError(
                f"{where}: classes {plain(self.classes)} has one class; a probe needs at least two"
            )
        if self.null_label is not None and self.null_label in (self.classes or []):
            raise LmProbeError(
                f"{where}: null_label={self.null_label!r} is also a class in {plain(self.classes)}; "
                f"pick a null_label outside the classes (e.g. -100)"
            )
        if not 0.0 <= float(self.heldout_size) < 1.0:
            raise LmProbeError(
                f"{where}: heldout_size (test_size)={self.heldout_size!r} must be a fraction "
                f"in [0, 1), e.g. 0.1"
            )
        for key in ("patience", "warmup_steps"):
            if int(getattr(self, key)) < 0:
                raise LmProbeError(f"{where}: {key}={getattr(self, key)!r} must be >= 0")
        if self.max_steps is not None and int(self.max_steps) < 1:
            raise LmProbeError(f"{where}: max_steps={self.max_steps!r} must be >= 1 or None")
        if "alpha" in self.model_kwargs and "model_kwargs" in kind._get_param_names():
            from lmprobe.probes.kinds import alpha_grid

            try:
                alpha_grid(self.model_kwargs)
            except LmProbeError as err:
                raise LmProbeError(f"{where}: {err}") from None
        if "C" in self.model_kwargs and hasattr(kind, "Cs"):  # the logistic kind's grid
            try:
                _ = kind(model_kwargs=dict(self.model_kwargs)).Cs
            except LmProbeError as err:
                raise LmProbeError(f"{where}: {err}") from None
        if (
            self.kind == "sgd_classifier"
            and "loss" in self.model_kwargs
            and self.model_kwargs["loss"] != "log_loss"
        ):
            raise LmProbeError(
                f"{where}: model_kwargs loss={self.model_kwargs['loss']!r} is not supported; "
                f"probes are logistic (loss='log_loss'); remove the key"
            )


def check_listed_once(key: str, values: Any) -> None:
    """A list option of the probe bank (``probes.pooling``, ...) names each value once: a
    value listed twice would make two probes of one name."""
    if values is None or isinstance(values, str):
        return
    values = list(values)
    twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
    if twice is not None:
        raise LmProbeError(
            f"config key {key}={values} lists {twice!r} twice, which would make two probes "
            f"of one name; list each once"
        )
