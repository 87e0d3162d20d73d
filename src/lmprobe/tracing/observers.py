"""Observers: read the probed sites' values where the forward passes them, without a handoff.

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

from collections.abc import Callable
from typing import Any

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
