"""Files: atomic writes, and probes as safetensors arrays plus a JSON header (never pickle).

A probe file is a safetensors file: its tensors are the probe's fitted arrays (coefficients,
intercepts, scaler statistics), and its ``__metadata__["lmprobe"]`` entry is a JSON object
with the kind (looked up in ``lmprobe.probes.kinds.PROBE_KINDS``, never imported from the file),
the constructor parameters, the remaining fitted values and the versions that wrote it.
Reading it parses JSON and copies numbers: no code from the file can run.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from lmprobe.errors import LmProbeError

FORMAT = "lmprobe-probe"
FORMAT_VERSION = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); results get the mode any new file would
        # get under the user's umask, so colleagues and a TensorBoard server can read them
        os.chmod(tmp, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"cannot write a {type(value).__name__} to a probe header")


def probe_header(probe: Any) -> dict[str, Any]:
    import sklearn

    import lmprobe

    _, values = probe.get_state()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": probe.kind,
        "params": probe.get_params(deep=False),
        "state": values,
        "versions": {"lmprobe": lmprobe.__version__, "scikit-learn": sklearn.__version__},
    }


def probe_to_tensors(probe: Any) -> tuple[dict[str, np.ndarray], str]:
    """The probe as (arrays, JSON header): what files and checkpoints hold."""
    arrays, _ = probe.get_state()
    header = json.dumps(probe_header(probe), default=_json_default, sort_keys=True)
    return {k: np.ascontiguousarray(v) for k, v in arrays.items()}, header


def probe_from_tensors(arrays: dict[str, np.ndarray], header: str, source: str = "probe") -> Any:
    from lmprobe.probes.kinds import PROBE_KINDS

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

    from lmprobe.probes.kinds import PROBE_KINDS

    if PROBE_KINDS.get(probe.kind) is not type(probe):
        raise LmProbeError(
            f"{type(probe).__name__} is not registered as a probe kind, so its file could not "
            f'be loaded; decorate it with @register_probe_kind("name")'
        )
    arrays, header = probe_to_tensors(probe)
    path = Path(path)
    atomic_write_bytes(path, save(arrays, metadata={"lmprobe": header}))
    return path


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Arrays and metadata of a safetensors file; a damaged file is a one-line error."""
    from safetensors.numpy import load

    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise LmProbeError(f"probe file {str(path)!r} does not exist") from None
    try:
        (size,) = struct.unpack("<Q", raw[:8])
        metadata = json.loads(raw[8 : 8 + size]).get("__metadata__") or {}
        arrays = load(raw)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise LmProbeError(
            f"{str(path)!r} is not a readable safetensors probe file ({type(err).__name__}); "
            f"it may be damaged or not a probe: re-save it with Probe.save"
        ) from None
    return arrays, metadata


def load_probe(path: str | os.PathLike) -> Any:
    arrays, metadata = read_safetensors(path)
    if "lmprobe" not in metadata:
        raise LmProbeError(f"{str(path)!r} has no lmprobe header; it was not written by lmprobe")
    return probe_from_tensors(arrays, metadata["lmprobe"], source=f"probe file {str(path)!r}")
