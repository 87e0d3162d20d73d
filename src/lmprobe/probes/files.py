"""Files: atomic writes, and reading safetensors files (the probe file format itself:
``lmprobe.probes.base``)."""

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


def json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"cannot write a {type(value).__name__} to a probe header")


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
