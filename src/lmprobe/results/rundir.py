"""The run directory is owned by one run: a lock file while it runs, no mixing with the
results of an earlier run, and a rescue directory when its outputs cannot be written.

``claim_run_dir`` takes the lock first and then looks for an earlier run's results, so two
runs started together cannot both pass the check. An earlier run's results are an error
unless the run resumes from a checkpoint in the same directory (``ckpt_path``) or says
``overwrite=true``, which removes only what lmprobe writes (``LMPROBE_OUTPUTS``): a run
directory may be a folder the user keeps other files in. A logger's folder holding only the
config a run logged when it started (a run stopped before any result) is no result.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lmprobe.errors import LmProbeError

log = logging.getLogger("lmprobe")

LOCK_NAME = ".lmprobe.lock"
#: What a run of lmprobe writes into its run directory (``overwrite=true`` removes these).
LMPROBE_OUTPUTS = (
    "metrics.csv",
    "per_class.csv",
    "dropped_rows.csv",
    "probes",
    "accuracy_by_layer.png",
    "last.ckpt",
    "error.txt",
    "tensorboard",
    "csv",
)
#: The loggers' folders, and the file in which a logger keeps the composed config: logged
#: when the run starts (``app.log_config``), before it has any result.
LOGGER_DIRS = ("tensorboard", "csv")
LOGGED_CONFIG = "hparams.yaml"


def _config_only(folder: Path) -> bool:
    """Whether a logger's ``folder`` holds no file but the logged config."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    return all(p.is_dir() or p.name == LOGGED_CONFIG for p in folder.rglob("*"))


def earlier_outputs(directory: Path, results: bool = False) -> list[str]:
    """The names of ``LMPROBE_OUTPUTS`` present in ``directory``; with ``results``, only
    those holding results (a logger's folder with only the logged config holds none)."""
    return [
        name
        for name in LMPROBE_OUTPUTS
        if os.path.lexists(directory / name)
        and not (results and name in LOGGER_DIRS and _config_only(directory / name))
    ]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def acquire_lock(directory: Path) -> Path:
    """Create ``directory/.lmprobe.lock`` exclusively (``O_EXCL``: atomic, even between
    machines sharing a file system). A lock left by a dead process of this host is taken
    over; any other held lock is a one-line error naming it."""
    lock = directory / LOCK_NAME
    owner = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            holder = _read_lock(lock)
            if holder.get("host") == owner["host"] and not _pid_alive(int(holder.get("pid", 0))):
                log.warning("removing a stale lock of a process that no longer runs: %s", lock)
                lock.unlink(missing_ok=True)
                continue
            raise LmProbeError(
                f"run directory {str(directory)!r} is in use by another run (lock file "
                f"{str(lock)!r}, pid {holder.get('pid', '?')} on {holder.get('host', '?')}); "
                f"use another hydra.run.dir, or delete the lock file if that run is dead"
            ) from None
        except OSError as err:
            raise LmProbeError(
                f"cannot write to run directory {str(directory)!r} ({err.strerror}); use a "
                f"writable hydra.run.dir"
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(owner, handle)
        return lock
    raise LmProbeError(f"could not take the lock {str(lock)!r}; delete it and run again")


def _read_lock(lock: Path) -> dict:
    try:
        holder = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # being written, or not ours: treat as held
    return holder if isinstance(holder, dict) else {}


def _resumes_here(directory: Path, ckpt_path: str | None) -> bool:
    if not ckpt_path:
        return False
    return Path(ckpt_path).resolve().parent == directory.resolve()


def clear_outputs(directory: Path) -> list[str]:
    """Remove what an earlier lmprobe run wrote to ``directory`` (nothing else)."""
    removed = earlier_outputs(directory)
    for name in removed:
        path = directory / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return removed


@contextmanager
def claim_run_dir(
    directory: Path, overwrite: bool = False, ckpt_path: str | None = None
) -> Iterator[Path]:
    """Hold ``directory`` for one run: locked, and free of an earlier run's results (see
    the module docstring); the lock is released however the run ends."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LmProbeError(
            f"cannot create run directory {str(directory)!r} ({err.strerror}); use a writable "
            f"hydra.run.dir"
        ) from None
    lock = acquire_lock(directory)
    try:
        found = earlier_outputs(directory, results=True)
        if found and overwrite:
            log.warning(
                "overwrite=true: removing an earlier run's %s from %s", ", ".join(found), directory
            )
            clear_outputs(directory)
        elif found and not _resumes_here(directory, ckpt_path):
            raise LmProbeError(
                f"run directory {str(directory)!r} holds an earlier run's results "
                f"({', '.join(found)}); set overwrite=true to replace them, choose another "
                f"hydra.run.dir, or resume with ckpt_path={directory / 'last.ckpt'}"
            )
        yield directory
    finally:
        lock.unlink(missing_ok=True)


def rescue_dir() -> Path:
    """A fresh directory for outputs the run directory could not take: in the system's
    temporary folder (another file system, often), named so that it is found."""
    return Path(tempfile.mkdtemp(prefix="lmprobe-rescue-"))
