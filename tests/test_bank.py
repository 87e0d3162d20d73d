"""The probe bank owns the probes' state; callbacks only say when; files never run code."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch

from lmprobe import LinearProbe, LmProbeError, ProbeBank, ProbeConfig, ProbeRunner
from lmprobe.data.datamodule import ProbeDataModule
from lmprobe.probes.base import load_probe, save_probe
from lmprobe.tracing.features import FeatureKey, PendingFeatures
from lmprobe.training.engine import fit_and_test, make_trainer, probe_callbacks

SITE = "transformer.h.3.output"


def pending(X: np.ndarray, y: np.ndarray, docs: np.ndarray) -> PendingFeatures:
    return PendingFeatures(torch.from_numpy(X), y, docs)


def test_bank_trains_stops_and_scores_without_lightning():
    """Driven by hand, as the callbacks drive it: the held-out loss after each update is
    sklearn's, patience retires the probe, and the scores equal sklearn's."""
    from sklearn.metrics import accuracy_score, log_loss

    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 5)).astype(np.float32)
    y = (X[:, 0] + 0.3 * rng.normal(size=400) > 0).astype(np.int64)
    config = ProbeConfig(
        "a.output", [0, 1], patience=2, warmup_steps=0, threshold=0.0, model_kwargs={"alpha": 0.1}
    )
    bank = ProbeBank([config], seed=0)
    key = bank.key(config.name)
    union = bank.heldout_plan(300)
    assert len(union) == 30
    heldout = pending(X[union], y[union], union).host()
    bank.set_heldout(union, 300, {key: heldout})
    train = np.setdiff1d(np.arange(300), union)
    for start in range(0, len(train), 30):
        rows = train[start : start + 30]
        trained = bank.update({key: pending(X[rows], y[rows], rows)}, chunk_rows=None)
        assert trained == [config.name]
        probe = bank.probes[config.name]
        expected = log_loss(y[union], probe.predict_proba(X[union]), labels=[0, 1])
        assert bank.history[config.name][-1][1] == pytest.approx(expected)
        if bank.done:
            break
    steps = [s for s, _ in bank.history[config.name]]
    losses = [loss for _, loss in bank.history[config.name]]
    best = int(np.argmin(losses))
    assert bank.done and bank.stopped_early[config.name]
    # retired exactly `patience` steps after its best held-out loss
    assert steps[-1] - steps[best] == config.patience
    test = np.arange(300, 400)
    for start in (300, 350):
        rows = np.arange(start, start + 50)
        bank.score("test", {key: pending(X[rows], y[rows], rows)}, chunk_rows=64)
    table = bank.finish_scoring("test")
    probe = bank.probes[config.name]
    row = table.loc[config.name]
    assert row["support"] == 100
    assert row["accuracy"] == pytest.approx(accuracy_score(y[test], probe.predict(X[test])))
    assert row["loss"] == pytest.approx(log_loss(y[test], probe.predict_proba(X[test])), 1e-6)


def test_callback_order_does_not_matter(gpt2, dataset):
    """The bank, not the callbacks' order, decides: any order learns the same coefficients,
    stops at the same steps and reports the same metrics."""
    train_set, test_set = dataset.tt_split(test_size=0.3, seed=1)
    configs = [
        ProbeConfig(
            SITE, [0, 1], patience=6, warmup_steps=0, threshold=0.01, model_kwargs={"alpha": 0.05}
        ),
        ProbeConfig("transformer.h.6.output", [0, 1], early_stopping=False, name="six"),
    ]
    results = []
    for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        runner = ProbeRunner(gpt2, configs, seed=4)
        callbacks = probe_callbacks(4, chunk_rows=16)
        trainer = make_trainer(
            runner.module,
            max_epochs=6,
            callbacks=[callbacks[i] for i in order],
            enable_progress_bar=False,
        )
        datamodule = ProbeDataModule(train_set=train_set, test_set=test_set, batch_size=8)
        table = fit_and_test(trainer, runner.module, datamodule)
        results.append((runner, table, trainer.fit_loop.epoch_loop.batch_progress.total.completed))
    first, table, batches = results[0]
    assert first.module.bank.stopped_early[SITE]  # the comparison covers a stop
    for runner, other, other_batches in results[1:]:
        assert runner.module.bank.steps == first.module.bank.steps
        assert other_batches == batches
        for config in configs:
            np.testing.assert_array_equal(
                runner[config.name].classifier_.coef_, first[config.name].classifier_.coef_
            )
        np.testing.assert_array_equal(other.to_numpy(), table.to_numpy())


def test_checkpoint_loads_without_pickle_and_restores_the_bank(gpt2, dataset, tmp_path):
    config = ProbeConfig(SITE, [0, 1], patience=50)
    runner = ProbeRunner(gpt2, [config]).fit_probes(dataset, None, num_epoch=2, batch_size=10)
    path = tmp_path / "probes.ckpt"
    runner.trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)  # tensors and plain values only
    assert checkpoint["state_dict"] == {}  # the LM's weights are not in it
    restored = ProbeRunner(gpt2, [config])
    restored.module.on_load_checkpoint(checkpoint)
    bank, other = runner.module.bank, restored.module.bank
    X = np.random.default_rng(0).normal(size=(5, 64)).astype(np.float32)
    np.testing.assert_array_equal(
        other.probes[SITE].predict_proba(X), bank.probes[SITE].predict_proba(X)
    )
    assert other.steps == bank.steps and other.live == bank.live
    np.testing.assert_array_equal(other.heldout_index, bank.heldout_index)
    np.testing.assert_array_equal(other.heldout[SITE].X, bank.heldout[SITE].X)
    assert other.history == bank.history and other.best_loss == bank.best_loss


def _fitted(kind_rows: int = 60) -> LinearProbe:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(kind_rows, 4)).astype(np.float32)
    y = np.where(X[:, 0] > 0, "pos", "neg")
    return LinearProbe(["pos", "neg"], model_kwargs={"average": True}, random_state=0).partial_fit(
        X, y
    )


def test_saved_probe_predicts_identically_and_keeps_training_the_same(tmp_path):
    probe = _fitted()
    loaded = load_probe(save_probe(probe, tmp_path / "p.safetensors"))
    X = np.random.default_rng(2).normal(size=(30, 4)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict_proba(X), probe.predict_proba(X))
    np.testing.assert_array_equal(loaded.predict(X), probe.predict(X))
    assert loaded.get_params() == probe.get_params()
    # every piece of SGD state came back: one more update learns exactly the same
    y = np.where(X[:, 1] > 0, "pos", "neg")
    np.testing.assert_array_equal(
        loaded.partial_fit(X, y).classifier_.coef_, probe.partial_fit(X, y).classifier_.coef_
    )


class _Trap:
    def __reduce__(self):
        return (open, ("/tmp/lmprobe-pickle-trap-ran", "w"))


@pytest.mark.parametrize("damage", ["truncate", "flip-header", "pickle", "other-kind", "shape"])
def test_damaged_or_foreign_files_give_a_clear_error_and_run_nothing(tmp_path, damage):
    import os

    trap = "/tmp/lmprobe-pickle-trap-ran"
    if os.path.exists(trap):
        os.remove(trap)
    path = save_probe(_fitted(), tmp_path / "p.safetensors")
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip-header":
        raw[12:20] = b"\x00\xff" * 4
    elif damage == "pickle":
        raw = bytearray(pickle.dumps(_Trap()))
    else:
        from safetensors.numpy import load, save

        size = int.from_bytes(raw[:8], "little")
        header = json.loads(json.loads(raw[8 : 8 + size])["__metadata__"]["lmprobe"])
        arrays = load(bytes(raw))
        if damage == "other-kind":
            header["kind"] = "os.system"
        else:
            arrays["estimator.0.coef_"] = np.zeros((1, 7))  # one of the alpha grid
        raw = bytearray(save(arrays, metadata={"lmprobe": json.dumps(header)}))
    path.write_bytes(bytes(raw))
    with pytest.raises(LmProbeError) as excinfo:
        LinearProbe.load(path)
    message = str(excinfo.value)
    assert "\n" not in message and "p.safetensors" in message
    assert not os.path.exists(trap)  # nothing in the file was executed


def test_probe_files_have_distinct_names(tmp_path):
    from lmprobe.results.outputs import save_probes

    probes = {"a/b": _fitted(), "a_b": _fitted(80)}
    save_probes(probes, tmp_path, None)
    index = json.loads((tmp_path / "index.json").read_text())
    assert len(set(index.values())) == 2
    assert LinearProbe.load(tmp_path / index["a_b"]).n_samples_seen_ == 80


def test_feature_key_is_shared_by_equal_sites():
    a = ProbeConfig(SITE, [0, 1], name="a")
    b = ProbeConfig(SITE, [0, 1], name="b", patience=3)
    bank = ProbeBank([a, b])
    assert bank.keys_for(["a", "b"]) == [FeatureKey(SITE, "mean", None)]


def test_kinds_without_a_heldout_criterion_hold_out_nothing():
    """A mean-difference probe never stops early, so it trains on every training row."""
    configs = [
        ProbeConfig("a.output", [0, 1], kind="mean_difference", name="md"),
        ProbeConfig("a.output", [0, 1], test_size=0.2, name="sgd"),
    ]
    assert len(ProbeBank(configs[:1]).heldout_plan(100)) == 0
    assert len(ProbeBank(configs).heldout_plan(100)) == 20


def test_model_kwargs_a_kind_does_not_take_are_ignored_with_a_warning(caplog):
    config = ProbeConfig("a.output", [0, 1], kind="mean_difference", model_kwargs={"alpha": 1})
    with caplog.at_level("WARNING", logger="lmprobe"):
        ProbeBank([config])
    assert "takes no model_kwargs; ignoring {'alpha': 1}" in caplog.text


def test_an_unregistered_probe_class_is_not_saved_under_its_parents_kind(tmp_path):
    class Unregistered(LinearProbe):
        pass

    X = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    probe = Unregistered([0, 1]).partial_fit(X, (X[:, 0] > 0).astype(int))
    with pytest.raises(LmProbeError, match="not registered"):
        save_probe(probe, tmp_path / "p.safetensors")


def test_background_training_by_hand_waits_and_reports_its_error(caplog):
    """``flush(background=True)`` trains on the worker what ``flush()`` trains in place
    (same coefficients); reading the bank waits for it. A failure on the worker is raised
    by ``wait()``, or logged by ``wait(raise_error=False)`` (another error on its way)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(96, 6)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    key_config = ProbeConfig(SITE, [0, 1], early_stopping=False)
    banks = []
    for background in (False, True):
        bank = ProbeBank([key_config], seed=0)
        bank.update({bank.key(SITE): pending(X, y, np.arange(96))}, chunk_rows=math.inf)
        if background:
            assert bank.flush(background=True) == [SITE]
            assert bank.training_pending and bank.trained_any()
        else:
            bank.flush()
        banks.append(bank)
    assert not banks[1].done  # waits, then reads
    assert not banks[1].training_pending
    for ours, theirs in zip(
        banks[1].probes[SITE].estimators_, banks[0].probes[SITE].estimators_, strict=True
    ):
        np.testing.assert_array_equal(ours.coef_, theirs.coef_)

    def failing(*args):
        raise RuntimeError("update failed")

    for raise_error in (True, False):
        bank = ProbeBank([key_config], seed=0)
        bank._train_on = failing
        bank.update({bank.key(SITE): pending(X, y, np.arange(96))}, chunk_rows=math.inf)
        bank.flush(background=True)
        if raise_error:
            with pytest.raises(RuntimeError, match="update failed"):
                bank.wait()
        else:
            bank.wait(raise_error=False)
            assert "update failed" in caplog.text
        assert not bank.training_pending

    # joined_after: an error of the block wins over the worker's, which is logged
    caplog.clear()
    bank = ProbeBank([key_config], seed=0)
    bank._train_on = failing
    bank.update({bank.key(SITE): pending(X, y, np.arange(96))}, chunk_rows=math.inf)
    bank.flush(background=True)
    with pytest.raises(KeyError, match="scoring failed"), bank.joined_after():
        raise KeyError("scoring failed")
    assert "update failed" in caplog.text and not bank.training_pending
