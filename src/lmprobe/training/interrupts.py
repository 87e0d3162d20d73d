"""Ctrl-C and SIGTERM stop a run the same way in every phase (``stop_signals``).

Inside Lightning's loops, SIGTERM sets a flag that Lightning checks at each batch (it then
raises ``SIGTERMException``, a ``SystemExit`` without a code) and Ctrl-C becomes
``sys.exit(1)``. Elsewhere (loading, filling the feature store, setting up the baseline,
the figure, the outputs) SIGTERM would kill the process at once, writing nothing. Within
``stop_signals``, SIGTERM raises ``Terminated`` there, and one that reached a Lightning loop
after its last check is raised by ``check_stop`` when the loop returns.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: What a stopped run raises: KeyboardInterrupt (Ctrl-C outside Lightning), SystemExit
#: (Lightning's ``sys.exit(1)`` on Ctrl-C, its ``SIGTERMException``, ``Terminated``).
INTERRUPTS = (KeyboardInterrupt, SystemExit)

_received = False  # a SIGTERM came within stop_signals


class Terminated(SystemExit):
    """SIGTERM, raised where Lightning does not handle it (exit status 143 if uncaught)."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def _on_sigterm(signum: int, frame: Any) -> None:
    global _received
    _received = True
    if signal.getsignal(signal.SIGTERM) is _on_sigterm:  # not inside a Lightning loop
        raise Terminated
    # else Lightning's handler called this one: its loop stops at the next batch


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def stop_signals() -> Iterator[None]:
    """SIGTERM stops the block wherever it runs (see the module docstring). The handlers of
    Ctrl-C and SIGTERM are restored afterwards (Lightning leaves Ctrl-C ignored after one).
    A no-op outside the main thread, where no signal handler can be set."""
    global _received
    if not _in_main_thread():
        yield
        return
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    _received = False
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        _received = False
        for signum, handler in before.items():
            if handler is not None:  # (None: set outside Python, cannot be restored)
                signal.signal(signum, handler)


def check_stop() -> None:
    """Raise ``Terminated`` if a SIGTERM came within ``stop_signals`` that no Lightning
    loop acted on (it came after the loop's last check)."""
    global _received
    if _received:
        _received = False
        raise Terminated


@contextmanager
def signals_held(then_raise: bool = True) -> Iterator[None]:
    """Ctrl-C and SIGTERM wait for the block to end, so that it (writing a run's outputs)
    is not cut short; then the first of them is raised (``then_raise=False``: dropped, for
    a block that saves what a run already stopping computed). A no-op outside the main
    thread."""
    if not _in_main_thread():
        yield
        return
    received: list[int] = []
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for signum in before:
        signal.signal(signum, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for signum, handler in before.items():
            if handler is not None:
                signal.signal(signum, handler)
    if received and then_raise:
        if received[0] == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated
