"""The worker thread: training (and the refit, the bootstrap's draws) handed to one
background thread. The rule: every method of the bank that reads or changes a probe's state
calls ``wait()`` first; the worker's results are visible once ``wait()`` has returned, never
before."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("lmprobe")


class BackgroundJob:
    """One job on a worker thread; ``result()`` joins it and raises what it raised."""

    def __init__(self, job: Callable[[], Any]) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(job,), name="lmprobe-bank")
        self._thread.daemon = True  # an abandoned job never keeps the interpreter alive
        self._thread.start()

    def _run(self, job: Callable[[], Any]) -> None:
        try:
            job()
        except BaseException as error:  # noqa: BLE001 - handed to whoever waits
            self._error = error

    def result(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error

    def join(self) -> None:
        """Wait for the job without raising what it raised (whoever waits with ``result``
        sees that)."""
        self._thread.join()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()


class Worker:
    """A part of ``ProbeBank`` (``lmprobe.bank.bank``): its methods use the bank's state."""

    def wait(self, raise_error: bool = True) -> None:
        """Join the training running in the background (``flush(background=True)``), if
        any, and raise what it raised (``raise_error=False``: log it instead, when another
        error is on its way). A no-op otherwise."""
        pending = self._pending
        if pending is None:
            return
        self._pending, self._pending_rows, self._live_before = None, False, None
        deferred, self._deferred = self._deferred, []
        try:
            pending.result()
        except Exception as error:
            if raise_error:
                raise
            log.error("the probes' training on the worker thread failed too: %r", error)
            return  # (the run is failing: its later batches are not trained on)
        for features, chunk_rows in deferred:  # as if they had come after it, in order
            self.update(features, chunk_rows)

    @property
    def training_pending(self) -> bool:
        """Training handed to the worker thread has not been waited for yet."""
        return self._pending is not None

    @property
    def batches_waiting(self) -> bool:
        """Training batches wait for the worker's training to end (``update``)."""
        return bool(self._deferred)

    @property
    def training_running(self) -> bool:
        """Training handed to the worker thread is still running (waiting would block)."""
        return self._pending is not None and self._pending.running

    @contextlib.contextmanager
    def joined_after(self) -> Iterator[None]:
        """Wait for the worker thread when the block ends. If the block raised, its error
        is the one to see: the worker's, if any, is logged (``wait(raise_error=False)``)."""
        try:
            yield
        except BaseException:
            self.wait(raise_error=False)
            raise
        self.wait()

    def trained_any(self) -> bool:
        """Some probe is fitted, or will be once the background training is done."""
        return self._pending_rows or any(r.probe.is_fitted for r in self._records.values())
