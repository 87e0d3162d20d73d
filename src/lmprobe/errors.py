"""Errors that lmprobe raises itself, so a user sees one line naming the bad value and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class LmProbeError(ValueError):
    """A bad input or setting, found before (or instead of) a long computation."""


class NonFiniteActivationError(LmProbeError):
    """A probed activation held NaN or inf (e.g. fp16 overflow)."""


class RunInterrupted(RuntimeError):
    """A run was stopped by Ctrl-C or SIGTERM; what was computed so far has been written."""


def closest(value: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` candidates that look most like ``value`` (for 'did you mean' hints)."""
    candidates = list(candidates)
    found = difflib.get_close_matches(value, candidates, n=n, cutoff=0.5)
    if not found:
        found = difflib.get_close_matches(value, candidates, n=n, cutoff=0.0)
    return found


def did_you_mean(value: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` with the closest candidate, for the end of a message."""
    hint = closest(value, candidates, n=1)
    return f" (did you mean {hint[0]!r}?)" if hint else ""


def plain(values: Iterable[Any]) -> list[Any]:
    """``values`` as a list of Python scalars, for messages: numpy's own print as
    ``np.int64(1)`` (numpy 2), where a user wrote ``1``."""
    return [
        value.item() if hasattr(value, "item") and hasattr(value, "dtype") else value
        for value in values
    ]
