"""Lightning internals lmprobe relies on: the fit loop's batch progress
(``trainer.fit_loop.epoch_loop.batch_progress``), read by ``ProbeRunner`` to score as many
evaluation batches as were trained. ``check()`` lists what an installed Lightning lacks."""

from __future__ import annotations

from typing import Any

TESTED = ("2.6",)  # major.minor releases checked (tests/test_integrations.py)


def batches_completed(trainer: Any) -> int:
    """Training batches the trainer's fit loop completed, over every epoch."""
    return trainer.fit_loop.epoch_loop.batch_progress.total.completed


def check() -> list[str]:
    """The internals lmprobe uses that the installed Lightning lacks (empty: all there)."""
    import lightning as L

    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    try:
        assert isinstance(batches_completed(trainer), int)
    except (AttributeError, AssertionError):
        return ["trainer.fit_loop.epoch_loop.batch_progress.total.completed"]
    return []
