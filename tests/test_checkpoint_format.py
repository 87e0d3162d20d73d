"""The bank's checkpoint format stays loadable: a checkpoint written by an earlier lmprobe
(tests/checkpoints/bank_v1.ckpt, written by ``_bank`` below before the probe bank kept one
record per probe) resumes, and the bank writes the same checkpoint from the same training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmprobe import ProbeBank, ProbeConfig
from lmprobe.tracing.features import Features, PendingFeatures

OLD = Path(__file__).resolve().parent / "checkpoints" / "bank_v1.ckpt"
N = 250  # training rows


def _pending(X: np.ndarray, y: np.ndarray, docs: np.ndarray) -> PendingFeatures:
    return PendingFeatures(torch.from_numpy(X[docs]), y[docs], docs)


def _bank() -> ProbeBank:
    """Three probes trained by hand: one stops early and is refitted, one has a code
    length, one reaches max_steps; rows are left in the buffer (``chunk_rows``)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(N, 6)).astype(np.float32)
    y = (X[:, 0] + 0.5 * rng.normal(size=N) > 0).astype(np.int64)
    configs = [
        ProbeConfig("a.output", [0, 1], patience=3, warmup_steps=0, threshold=0.02),
        ProbeConfig("b.output", [0, 1], early_stopping=False, name="b"),
        ProbeConfig("c.output", [0, 1], early_stopping=False, max_steps=4, name="c"),
    ]
    bank = ProbeBank(configs, seed=3)
    keys = {name: bank.key(name) for name in bank.configs}
    union = bank.heldout_plan(N)
    held = {key: _pending(X, y, union).host() for key in keys.values()}
    bank.set_heldout(union, N, held)
    train = np.setdiff1d(np.arange(N), union)
    for epoch in range(3):
        bank.start_epoch(epoch)
        if epoch == 0:
            bank.drop_rows(["c"])
        for start in range(0, len(train), 20):
            rows = train[start : start + 20]
            bank.next_batch()
            bank.update({key: _pending(X, y, rows) for key in keys.values()}, chunk_rows=50)
    kept = Features(X[train], y[train], train)
    bank.code_length("b", Features(X, y, np.arange(N)), N)
    bank.refit("a.output", kept, N)
    return bank


def _plain(state: dict) -> dict:
    return json.loads(state["plain"])


def _assert_same_state(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    assert _plain(ours) == _plain(theirs)
    for section in ("probes", "heldout", "buffered"):
        assert sorted(ours[section]) == sorted(theirs[section]), section
        for name, part in theirs[section].items():
            if section == "probes":
                assert ours[section][name]["header"] == part["header"], name
                part, mine = part["arrays"], ours[section][name]["arrays"]
            else:
                mine = ours[section][name]
            assert sorted(mine) == sorted(part), (section, name)
            for key, tensor in part.items():
                assert torch.equal(mine[key], tensor), (section, name, key)
    assert torch.equal(ours["heldout_index"], theirs["heldout_index"])


def test_the_bank_writes_the_earlier_format():
    """Same training, same checkpoint: every key, plain value and tensor of the file."""
    old = torch.load(OLD, weights_only=True)
    state = _bank().state_dict(buffered=True)
    plain = _plain(old)
    # the file covers what it should: a stop, a refit, a code length, max_steps, buffered rows
    assert plain["stopped_early"]["a.output"] and plain["refitted"]["a.output"]
    assert plain["code_bits"]["b"] > 0 and plain["live"] == ["b"]
    assert plain["rows_dropped"] == ["c"] and old["buffered"]
    _assert_same_state(state, old)


def test_an_earlier_checkpoint_resumes():
    """Loaded into a fresh bank, the earlier file gives back its state: the coefficients,
    the counts, the held-out slices, the buffered rows (written again as they were)."""
    old = torch.load(OLD, weights_only=True)
    trained = _bank()
    bank = ProbeBank(list(trained.configs.values())[:3], seed=3)
    bank.load_state_dict(old)
    assert bank.resumed
    for name, probe in trained.probes.items():
        np.testing.assert_array_equal(bank.probes[name].classifier_.coef_, probe.classifier_.coef_)
    assert bank.steps == trained.steps and bank.live == trained.live == {"b"}
    assert bank.history == trained.history and bank.code_bits == trained.code_bits
    assert bank.rows_dropped == {"c"}
    _assert_same_state(bank.state_dict(buffered=True), old)


def test_every_record_field_is_checkpointed_synced_or_said_not_and_read_only():
    """What is derived from ``ProbeRecord``'s fields covers every field: each is in the
    checkpoint, the synced ones in ``probe_state``, and others read a view they cannot
    write into (one writer: the bank)."""
    from lmprobe.bank.record import FIELDS

    bank = _bank()
    state = bank.state_dict()
    plain = _plain(state)
    for field, how in FIELDS:
        assert how.key in (state if how.tensors else plain), field
    synced = bank.probe_state(["b"])
    assert sorted(synced) == sorted(field for field, how in FIELDS if how.sync)
    assert {"probe", "steps", "history", "refitted"} <= set(synced)
    assert {"live", "heldout", "steps_buffered", "rows_dropped"}.isdisjoint(synced)
    with pytest.raises(TypeError):
        bank.steps["b"] = 0
    with pytest.raises(AttributeError):
        bank.live.add("a.output")
    with pytest.raises(AttributeError):
        bank.history["a.output"].append((99, 0.0))
    with pytest.raises(ValueError):
        bank.class_counts["b"][0] = 0
    with pytest.raises(AttributeError):
        bank.steps = {}
    assert bank.steps == {"a.output": 13, "b": 36, "c": 4}
    assert bank.class_counts["b"].tolist() == [104, 76]


def test_a_reset_keeps_the_probe_objects_and_forgets_their_training():
    bank = _bank()
    before = dict(bank.probes)
    bank.reset()
    assert all(bank.probes[name] is probe for name, probe in before.items())
    assert not any(p.is_fitted for p in bank.probes.values())
    assert bank.live == set(bank.configs) and not bank.rows_dropped
    assert set(bank.steps.values()) == {0} and not any(bank.history.values())
    assert bank.heldout == {} and bank.state_dict()["probes"].keys() == before.keys()


def test_control_labels_are_given_to_the_dataset_by_its_owner():
    """The bank computes the control labels and writes nothing into the dataset; the
    dataset takes labels of its labels' shape only."""
    from lmprobe import LmProbeError, ProbeDataset

    ids = torch.arange(24).reshape(6, 4)
    data = ProbeDataset(ids, torch.ones_like(ids), torch.tensor([0, 1, 0, 1, 1, 0]))
    bank = ProbeBank([ProbeConfig("a.output", [0, 1], control=True)], seed=3)
    labels = bank.control_labels(data, "train")
    assert data.control_labels is None  # not written by the bank
    order = np.random.default_rng((3, 0)).permutation(6)  # a seeded permutation
    assert labels.tolist() == data.labels[torch.from_numpy(order)].tolist()
    data.set_control_labels(labels)
    assert data[2]["control"] == labels[2]
    with pytest.raises(LmProbeError, match="one control label per label"):
        data.set_control_labels(labels[:3])
