"""nnsight internals lmprobe relies on (nnsight 0.8): a module's controller state
(``nnsight.intervention.source.STATE`` and its ``routes``), and the cache protocol of a
running worker (``Mediator.caches``, ``subscriptions()``, ``observe_selected``). Without
them lmprobe's traces fall back to nnsight's public API (every handoff kept, each site read
in the trace's body). ``check()`` lists what an installed nnsight lacks
(tests/test_integrations.py).

Handoffs: keep nnsight's per-module interception to the modules a trace reads.
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

Observers: read the probed sites' values where the forward passes them, without a handoff.

A read of ``envoy.output`` in a trace's body parks the body's worker on that site, and the
forward hands the value to the worker and waits for it to come back: on the ``cpu``
benchmark's tiny GPT-2, 1.5-2 ms a trace for 12 sites (bench/README.md). nnsight 0.8's own
``tracer.cache()`` reads values another way: the interleaver hands each value it passes
to the caches subscribed to its location, in the forward's own greenlet, with no worker to
wake. A ``SiteObserver`` is registered the same way, so the trace's body only reads
the deepest site (to stop there) and every site is pooled as the forward passes it, its
full activation freed as soon as the next layer has used it (a ``tracer.cache()`` would
keep every probed layer's full output until the trace ends).

This follows nnsight's cache protocol, which is not public: the running worker's
``Mediator.caches`` list, each entry's ``subscriptions()`` (``{location: selected}``) and
``observe_selected(selected, value)``. With an nnsight that has no such protocol,
``SiteObserver.attach`` says so and the trace reads each site in its body instead.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator
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


# --------------------------------------------------------------------- observers
try:  # the worker handle nnsight 0.8 registers a trace's caches on, and what envoy.input reads
    from nnsight.intervention.interleaver import Mediator as _Mediator
    from nnsight.intervention.util import first_input
except ImportError:  # another nnsight: read each site in the trace's body
    _Mediator = None


class SiteObserver:
    """Calls ``on_value(site, value)`` once per site, with the first value the forward
    passes there: a module's output, or for an ``.input`` site its first input (what
    ``envoy.input`` reads). ``locations`` maps nnsight's name of each place
    (``"model.transformer.h.0.output"``) to the site."""

    def __init__(self, locations: dict[str, str], on_value: Callable[[str, Any], None]) -> None:
        self.locations = locations
        self.on_value = on_value
        self.attached = False
        self.seen: set[str] = set()

    def attach(self) -> bool:
        """Inside a trace's body, before its first read: observe this trace. False where
        this nnsight cannot (then nothing is observed).

        (Kept on the observer, not only returned: nnsight runs a trace's body in its own
        frame, and a plain local assigned there need not reach the caller's.)"""
        if _Mediator is None:
            return False
        try:
            caches = _Mediator.current("lmprobe's site observer").caches
        except (AttributeError, ValueError):
            return False
        caches.append(self)
        self.attached = True
        return True

    # nnsight's cache protocol

    def subscriptions(self) -> dict[str, str]:
        return dict(self.locations)

    def observe_selected(self, site: str, value: Any) -> None:
        if site in self.seen:  # a module run twice in one forward: its first value, as a read
            return
        self.seen.add(site)
        if site.endswith(".input"):
            value = first_input(*value)  # value: the module's (args, kwargs)
        self.on_value(site, value)


TESTED = ("0.8",)  # major.minor releases checked (tests/test_integrations.py)


def check() -> list[str]:
    """The internals lmprobe uses that the installed nnsight lacks (empty: all there)."""
    import inspect

    missing = []
    if _STATE is None:
        missing.append("nnsight.intervention.source.STATE")
    if _Mediator is None:
        missing.append("nnsight.intervention.interleaver.Mediator")
    else:
        if not callable(getattr(_Mediator, "current", None)):
            missing.append("Mediator.current")
        if "self.caches" not in inspect.getsource(_Mediator.__init__):
            missing.append("Mediator.caches")
    return missing
