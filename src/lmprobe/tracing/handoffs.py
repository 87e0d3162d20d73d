"""Handoffs: keep nnsight's per-module interception to the modules a trace reads.

nnsight 0.8 installs a controller as the ``forward`` of every module of a wrapped model. In
a trace each module call hands its input, a skip gate and its output to the interleaver
(three handoffs per call, ~150 module calls per GPT-2 forward), whether or not the trace
reads that module. Probing reads a few sites, so most of that work buys nothing. (What it
saves is small: on the ``cpu`` benchmark's tiny GPT-2, within run-to-run noise of the
whole run; on an H200, 1-3% of a run in three of four settings; bench/README.md.)

``handoffs_only_at`` leaves the handoffs on, for the duration of one trace, at the modules
a trace must still see: every probed module and its ancestors, and the siblings along those
paths. nnsight 0.8.1 stops the trace at the deepest site's own handoff (tested: neither
the next block nor ``lm_head`` runs); the siblings are kept so that a version stopping at
the next handoff instead still stops before the rest of the model. Every other module runs its plain body: nnsight's
controller finds no active trace for it and calls the forward directly, accelerate's
device hooks included (``nnsight.intervention.source.run_body``). The routes are put back
when the trace ends, so the user's own traces of the same model see every module.

This reads one nnsight internal (a module's ``State.routes``); with an nnsight that has no
such state the trace simply keeps every handoff, as before.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch

try:  # the key nnsight 0.8 keeps a module's controller state under
    from nnsight.intervention.source import STATE as _STATE
except ImportError:  # another nnsight: keep every handoff
    _STATE = None

# Modules without a needed handoff, per model and set of probed module paths (the module
# tree of a loaded model does not change; computing this walks every module).
_QUIET: weakref.WeakKeyDictionary[torch.nn.Module, dict[frozenset[str], list[Any]]] = (
    weakref.WeakKeyDictionary()
)


def quiet_modules(root: torch.nn.Module, module_paths: Iterable[str]) -> list[torch.nn.Module]:
    """The modules of ``root`` a trace reading ``module_paths`` has no handoff to make at."""
    paths = frozenset(module_paths)
    cached = _QUIET.setdefault(root, {})
    if paths in cached:
        return cached[paths]
    on_path: set[str] = {""}  # each probed module and its ancestors
    inner: set[str] = {""}  # strict ancestors: their children stay (siblings along a path)
    for path in paths:
        parts = path.split(".") if path else []
        for i in range(len(parts) + 1):
            on_path.add(".".join(parts[:i]))
        for i in range(len(parts)):
            inner.add(".".join(parts[:i]))
    names: dict[int, list[str]] = {}  # a module shared at several paths has them all
    modules: dict[int, torch.nn.Module] = {}
    for name, module in root.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
        modules[id(module)] = module

    def needed(name: str) -> bool:
        return name in on_path or name.rpartition(".")[0] in inner

    quiet = [modules[i] for i, ns in names.items() if not any(needed(n) for n in ns)]
    cached[paths] = quiet
    return quiet


@contextlib.contextmanager
def handoffs_only_at(root: torch.nn.Module, module_paths: Iterable[str]) -> Iterator[int]:
    """Within the block, only the modules a trace of ``module_paths`` reads (see the module
    docstring) hand off to nnsight; yields how many modules were quietened."""
    if _STATE is None:
        yield 0
        return
    saved = []
    for module in quiet_modules(root, module_paths):
        state = module.__dict__.get(_STATE)
        if state is not None and state.routes:
            saved.append((state, state.routes))
            state.routes = []
    try:
        yield len(saved)
    finally:
        for state, routes in saved:
            state.routes = routes
