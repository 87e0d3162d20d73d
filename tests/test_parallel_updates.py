"""Probes trained on several threads at once (``ProbeBank._each``) learn exactly what they
learn one at a time."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from lmprobe import LmProbeError, ProbeBank, ProbeConfig
from lmprobe.tracing.features import Features, PendingFeatures
from lmprobe.training.callbacks import ProbeUpdater


def _configs() -> list[ProbeConfig]:
    """Probes on three sites (several alphas) that stop early at different steps, and one
    that trains to the end."""
    configs = []
    for site in ("a.output", "b.output", "c.output"):
        for alpha in (1e-1, 1e-2, 1e-4):
            configs.append(
                ProbeConfig(
                    site,
                    [0, 1, 2],
                    patience=3,
                    warmup_steps=2,
                    threshold=1e-3,
                    model_kwargs={"alpha": alpha},
                    name=f"{site}/{alpha}",
                )
            )
    configs.append(ProbeConfig("a.output", [0, 1, 2], early_stopping=False, name="a/all"))
    return configs


def _run(threads: int, seen: set[str]) -> ProbeBank:
    """A bank driven by hand as the callbacks drive it: held-out slice, chunked updates,
    a background flush, refits in the background, a scored test set."""
    rng = np.random.default_rng(0)
    n, width = 640, 8
    sites = ("a.output", "b.output", "c.output")
    X = {s: rng.normal(size=(n, width)).astype(np.float32) for s in sites}
    y = (X["a.output"][:, 0] + X["b.output"][:, 1] > 0).astype(np.int64)
    y = y + (X["c.output"][:, 2] > 1.0)
    bank = ProbeBank(_configs(), seed=0)
    bank.update_threads = threads
    train_on = bank._train_on

    def recorded(*args):
        seen.add(threading.current_thread().name.split("_")[0])
        return train_on(*args)

    bank._train_on = recorded
    keys = {s: bank.key(f"{s}/0.1") for s in sites}

    def batch(docs: np.ndarray) -> dict:
        return {
            keys[s]: PendingFeatures(torch.from_numpy(X[s][docs]), y[docs], docs) for s in sites
        }

    n_train = 512
    union = bank.heldout_plan(n_train)
    bank.set_heldout(union, n_train, {k: v.host() for k, v in batch(union).items()})
    train = np.setdiff1d(np.arange(n_train), union)
    for start in range(0, len(train), 16):
        bank.update(batch(train[start : start + 16]), chunk_rows=48)
    bank.flush(background=True)
    kept = {keys[s]: Features(X[s][:n_train], y[:n_train], np.arange(n_train)) for s in sites}
    rows = [(name, kept[bank.key(name)]) for name in bank.configs]
    bank.refit_all(rows, n_train, background=True)
    test = np.arange(n_train, n)
    bank.score("test", batch(test), chunk_rows=None)
    bank.table = bank.finish_scoring("test")
    return bank


def _coefficients(probe) -> list[np.ndarray]:
    arrays = [getattr(e, "coef_", None) for e in getattr(probe, "estimators_", [])]
    arrays += [getattr(probe, a) for a in ("coef_", "intercept_", "means_") if hasattr(probe, a)]
    return [np.asarray(a) for a in arrays if a is not None]


def test_probes_trained_on_threads_learn_what_they_learn_one_by_one():
    one_seen, many_seen = set(), set()
    one, many = _run(1, one_seen), _run(4, many_seen)
    assert one_seen == {"MainThread", "lmprobe-bank"}  # in place, and the background flush
    assert "lmprobe-probes" in many_seen  # the parallel path ran
    assert any(one.stopped_early.values()) and not all(one.stopped_early.values())
    assert any(one.refitted.values())
    for name in one.configs:
        ours, theirs = _coefficients(many.probes[name]), _coefficients(one.probes[name])
        assert ours and len(ours) == len(theirs), name
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_array_equal(a, b)
        assert many.steps[name] == one.steps[name]
        assert many.stopped_early[name] == one.stopped_early[name]
        assert many.history[name] == one.history[name]
        assert many.best_step[name] == one.best_step[name]
        assert many.refitted[name] == one.refitted[name]
        assert many.code_bits[name] == one.code_bits[name]
    assert many.live == one.live
    assert many.table.equals(one.table)


@pytest.mark.parametrize("threads", [1, 3])
def test_a_failing_probe_fails_the_update_after_the_others_trained(threads):
    """Every probe's job runs, on one thread or several; the first error (in probe order)
    is raised afterwards."""
    sites = [f"{s}.output" for s in "abc"]
    bank = ProbeBank([ProbeConfig(s, [0, 1], early_stopping=False) for s in sites], seed=0)
    bank.update_threads = threads
    ran = []

    def train_on(name, rows, buffered):
        ran.append(name)
        if name != "b.output":
            raise RuntimeError(f"probe {name} failed")
        return True

    bank._train_on = train_on
    X = np.ones((4, 2), dtype=np.float32)
    features = {
        bank.key(s): PendingFeatures(torch.from_numpy(X), np.array([0, 1, 0, 1]), np.arange(4))
        for s in sites
    }
    with pytest.raises(RuntimeError, match="probe a.output failed"):
        bank.update(features, chunk_rows=None)
    assert sorted(ran) == sites


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_a_bad_thread_count_is_refused_naming_it(value):
    with pytest.raises(LmProbeError, match=f"update_threads={value!r}: use a whole number"):
        ProbeUpdater(update_threads=value)
