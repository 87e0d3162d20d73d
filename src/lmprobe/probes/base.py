"""The probe interface, the registry of probe kinds, and probe files.

A kind is a scikit-learn-style estimator (``__init__`` stores arguments, fitted state ends in
``_``, ``partial_fit`` returns self) with four more methods the bank relies on:
``heldout_loss`` (the early-stopping criterion, lower is better; ``None``: the kind does not
stop early), ``new_scores`` (an accumulator of its test metrics), and ``get_state`` /
``set_state`` (arrays and plain values, so probes are saved without pickle).

Adding a kind is one class (in ``lmprobe.probes.kinds`` or your own module) decorated with
``@register_probe_kind("name")``; ``ProbeConfig(kind="name")`` or ``probes.kind=name`` then
selects it.

A probe file is a safetensors file: its tensors are the probe's fitted arrays, and its
``__metadata__["lmprobe"]`` entry a JSON header with the kind (looked up in ``PROBE_KINDS``,
never imported from the file), the constructor parameters, the remaining fitted values and
the versions that wrote it. Reading it parses JSON and copies numbers: no code from the file
can run.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator

from lmprobe.errors import LmProbeError
from lmprobe.probes.files import (
    FORMAT,
    FORMAT_VERSION,
    atomic_write_bytes,
    json_default,
    read_safetensors,
)
from lmprobe.scoring.metrics import ClassificationScores, RegressionScores

log = logging.getLogger("lmprobe")

PROBE_KINDS: dict[str, type[Probe]] = {}


def register_probe_kind(name: str):
    """Class decorator: make a probe kind selectable as ``kind=name``."""

    def register(cls: type[Probe]) -> type[Probe]:
        cls.kind = name
        PROBE_KINDS[name] = cls
        return cls

    return register


def resolve_probe_kind(kind: str | type) -> type[Probe]:
    """A registered name, a probe class, or a dotted import path (``pkg.module.Class``, as a
    Hydra ``_target_``) given in code or config. Files never name code to import: loading
    a probe file looks kinds up in the registry only."""
    if isinstance(kind, type):
        if not issubclass(kind, Probe):
            raise LmProbeError(f"probe kind {kind.__name__} is not a lmprobe.probes.base.Probe")
        return kind
    if kind in PROBE_KINDS:
        return PROBE_KINDS[kind]
    if isinstance(kind, str) and "." in kind:
        module, _, name = kind.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            raise LmProbeError(f"probe kind {kind!r} could not be imported ({err})") from None
        return resolve_probe_kind(cls)
    raise LmProbeError(
        f"unknown probe kind {kind!r}; use one of {', '.join(PROBE_KINDS)} or a class path "
        f"such as mypackage.MyProbe"
    )


class Probe(BaseEstimator):
    """The interface every probe kind implements (see the module docstring)."""

    kind: ClassVar[str] = ""
    task: ClassVar[str] = "classification"  # or "regression"
    needs_classes: ClassVar[bool] = True
    max_classes: ClassVar[int | None] = None
    stops_early: ClassVar[bool] = True  # has a held-out criterion (``heldout_loss``)

    def partial_fit(self, X: np.ndarray, y: np.ndarray) -> Probe:
        raise NotImplementedError

    def fit(self, X: np.ndarray, y: np.ndarray) -> Probe:
        """One ``partial_fit`` from scratch (scikit-learn's ``fit`` contract; its
        ``check_is_fitted`` also wants the method to exist)."""
        for attr in [k for k in vars(self) if k.endswith("_") and not k.startswith("_")]:
            delattr(self, attr)
        return self.partial_fit(X, y)

    def predict(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def heldout_loss(self, X: np.ndarray, y: np.ndarray) -> float | None:
        return None

    @property
    def selects(self) -> bool:
        """The probe chooses among settings on held-out rows (so it needs them even when
        early stopping is off)."""
        return False

    def new_scores(self) -> ClassificationScores | RegressionScores:
        raise NotImplementedError

    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        raise NotImplementedError

    def set_state(self, arrays: dict[str, np.ndarray], values: dict[str, Any]) -> Probe:
        raise NotImplementedError

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "n_features_in_")

    # --------------------------------------------------------------- files
    def save(self, path: str | os.PathLike) -> Path:
        """Safetensors arrays + a JSON header (no pickle); written atomically."""
        return save_probe(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Probe:
        """Load a file written by ``save``; no code in the file is run."""
        probe = load_probe(path)
        if not isinstance(probe, cls):
            raise LmProbeError(f"{path} holds a {type(probe).__name__}, not a {cls.__name__}")
        return probe

    # ------------------------------------------------- lm_probe's spellings
    def _rows(self, X: np.ndarray, y: np.ndarray | None = None):
        """lm_probe passes token-level features as (documents, tokens, d): flatten them, and
        drop ``null_label`` positions when labels are given."""
        X = np.asarray(X, dtype=np.float32)
        if X.ndim == 3:
            X = X.reshape(-1, X.shape[-1])
            if y is not None:
                y = np.asarray(y).reshape(-1)
        if y is not None and getattr(self, "null_label", None) is not None:
            keep = np.asarray(y) != self.null_label
            X, y = X[keep], np.asarray(y)[keep]
        return X, y

    def take_step(self, X: np.ndarray, y: np.ndarray) -> Probe:
        """lm_probe's one online update: ``partial_fit`` on a batch (3-D token features are
        flattened, ``null_label`` rows dropped)."""
        return self.partial_fit(*self._rows(X, y))


# ---------------------------------------------------------------- sklearn state
def state_value(value: Any) -> Any:
    """A JSON-able copy of a scalar or a non-numeric array."""
    if isinstance(value, np.ndarray):
        return {"array": value.tolist(), "dtype": value.dtype.str}
    if isinstance(value, np.generic):
        return {"scalar": value.item(), "dtype": value.dtype.str}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise TypeError(f"cannot save a {type(value).__name__} without pickle")


def from_state_value(value: Any) -> Any:
    if isinstance(value, dict) and "array" in value:
        return np.asarray(value["array"], dtype=np.dtype(value["dtype"]))
    if isinstance(value, dict) and "scalar" in value:
        return np.dtype(value["dtype"]).type(value["scalar"])
    return value


# Recreated by scikit-learn on every partial_fit; not state worth saving.
_TRANSIENT = {"_loss_function_"}


def estimator_state(
    est: BaseEstimator, prefix: str, arrays: dict[str, np.ndarray], values: dict[str, Any]
) -> None:
    """Every fitted attribute of a scikit-learn estimator: numeric arrays into ``arrays``,
    the rest (scalars, string class labels) into ``values``; its parameters are not state."""
    params = est.get_params(deep=False)
    for name, value in vars(est).items():
        if name in params or name in _TRANSIENT:
            continue
        if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
            arrays[prefix + name] = value
        else:
            values[prefix + name] = state_value(value)


def restore_estimator(
    est: BaseEstimator, prefix: str, arrays: dict[str, np.ndarray], values: dict[str, Any]
) -> BaseEstimator:
    for name, value in arrays.items():
        if name.startswith(prefix):
            setattr(est, name[len(prefix) :], np.array(value))
    for name, value in values.items():
        if name.startswith(prefix):
            setattr(est, name[len(prefix) :], from_state_value(value))
    return est


def make_probe(config: Any, random_state: int | None) -> Probe:
    """A fresh probe of ``config.kind`` with the parameters the config gives it."""
    cls = resolve_probe_kind(config.kind)
    offered = {
        "classes": list(config.classes) if config.classes is not None else None,
        "model_kwargs": dict(config.model_kwargs),
        "random_state": random_state,
        "null_label": config.null_label,
    }
    accepted = cls._get_param_names()
    if offered["model_kwargs"] and "model_kwargs" not in accepted:
        # a warning, not an error: a config's default model_kwargs (e.g. the SGD alpha of
        # conf/probes) should not stop `probes.kind=mean_difference` from working
        log.warning(
            "probe %r: kind %r takes no model_kwargs; ignoring %s",
            config.name,
            config.kind,
            offered["model_kwargs"],
        )
    return cls(**{k: v for k, v in offered.items() if k in accepted})


# ------------------------------------------------------------------ files
def probe_header(probe: Any) -> dict[str, Any]:
    import sklearn

    from lmprobe.version import __version__

    _, values = probe.get_state()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": probe.kind,
        "params": probe.get_params(deep=False),
        "state": values,
        "versions": {"lmprobe": __version__, "scikit-learn": sklearn.__version__},
    }


def probe_to_tensors(probe: Any) -> tuple[dict[str, np.ndarray], str]:
    """The probe as (arrays, JSON header): what files and checkpoints hold."""
    arrays, _ = probe.get_state()
    header = json.dumps(probe_header(probe), default=json_default, sort_keys=True)
    return {k: np.ascontiguousarray(v) for k, v in arrays.items()}, header


def probe_from_tensors(arrays: dict[str, np.ndarray], header: str, source: str = "probe") -> Any:
    try:
        meta = json.loads(header)
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, not {FORMAT!r}")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"format version {meta['format_version']} is newer than this lmprobe")
        kind = meta["kind"]
        if kind not in PROBE_KINDS:
            raise ValueError(
                f"probe kind {kind!r} is not registered; import the module that registers it "
                f"before loading (kinds: {', '.join(PROBE_KINDS)})"
            )
        probe = PROBE_KINDS[kind](**meta["params"])
        probe.set_state({k: np.asarray(v) for k, v in arrays.items()}, meta["state"])
        if probe.is_fitted:  # a smoke test of the restored arrays' shapes
            probe.predict(np.zeros((1, probe.n_features_in_), dtype=np.float32))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise LmProbeError(
            f"{source} is not a valid lmprobe probe ({type(err).__name__}: {err}); "
            f"re-save it with Probe.save"
        ) from None
    return probe


def save_probe(probe: Any, path: str | os.PathLike) -> Path:
    from safetensors.numpy import save

    if PROBE_KINDS.get(probe.kind) is not type(probe):
        raise LmProbeError(
            f"{type(probe).__name__} is not registered as a probe kind, so its file could not "
            f'be loaded; decorate it with @register_probe_kind("name")'
        )
    arrays, header = probe_to_tensors(probe)
    path = Path(path)
    atomic_write_bytes(path, save(arrays, metadata={"lmprobe": header}))
    return path


def load_probe(path: str | os.PathLike) -> Any:
    arrays, metadata = read_safetensors(path)
    if "lmprobe" not in metadata:
        raise LmProbeError(f"{str(path)!r} has no lmprobe header; it was not written by lmprobe")
    return probe_from_tensors(arrays, metadata["lmprobe"], source=f"probe file {str(path)!r}")
