"""Training, early stopping and chunking against a straightforward reimplementation.

The reference below is written from the documented rules alone: scikit-learn's
``StandardScaler`` + ``SGDClassifier`` fed the same rows in the same chunks, the held-out
log loss after every update, and the patience rule. The bank must learn the same
coefficients, stop at the same step and end the run when its last probe stops.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import ONE_ALPHA, reference_sgd
from lightning.pytorch.callbacks import Callback
from sklearn.metrics import log_loss
from sklearn.preprocessing import StandardScaler

from lmprobe import LinearProbe, ProbeConfig, ProbeDataModule, ProbeDataset, ProbeRunner
from lmprobe.data.dataset import auto_window

SITE = "transformer.h.3.output"


class CountBatches(Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1


def replay(
    X: np.ndarray,
    y: np.ndarray,
    heldout: np.ndarray,
    config: ProbeConfig,
    *,
    lengths: np.ndarray,
    batch_size: int,
    chunk_rows: int | None,
    max_epochs: int,
    seed: int,
    window: int = 1,
) -> dict:
    """What one probe should do, from the rules in the docs: the training documents in one
    seeded random order, the held-out slice left out, cut into groups of ``chunk_rows``
    documents (whole batches; one batch when None). The model traces ``window`` groups at a
    time longest first in batches; the probe trains on each group's rows in the random
    order once they are traced, a step per batch of the group (every batch has rows the
    probe trains on: the held-out slice is in none), then scores its held-out slice. The
    run's batch count runs to the end of the window in which the probe stops."""
    keep = ~np.isin(np.arange(len(y)), heldout)
    order = np.random.default_rng(seed).permutation(len(y))
    kept = order[keep[order]]  # no training batch holds a held-out document
    size = batch_size * (1 if chunk_rows is None else math.ceil(chunk_rows / batch_size))
    groups = [kept[start : start + size] for start in range(0, len(kept), size)]
    scaler = StandardScaler()
    sgd = reference_sgd(config.model_kwargs["alpha"], seed)
    classes = np.unique(config.classes)
    best, best_step, steps, losses, batches_seen = math.inf, 0, 0, [], 0

    def update(rows: np.ndarray) -> None:
        scaler.partial_fit(X[rows])
        sgd.partial_fit(scaler.transform(X[rows]), y[rows], classes=classes)

    def stop_now() -> bool:
        nonlocal best, best_step
        loss = log_loss(y[heldout], sgd.predict_proba(scaler.transform(X[heldout])), labels=classes)
        losses.append((steps, loss))
        if loss < best - config.threshold:
            best, best_step = loss, steps
        waited = steps - max(best_step, config.warmup_steps)
        return steps > config.warmup_steps and waited >= config.patience

    for _epoch in range(max_epochs):
        for first in range(0, len(groups), window):
            traced = np.concatenate(groups[first : first + window])
            batches_seen += math.ceil(len(traced) / batch_size)  # traced sorted, together
            for group in groups[first : first + window]:
                steps += math.ceil(len(group) / batch_size)
                rows = group  # the random order, not the traced one
                update(rows)
                if stop_now():
                    return dict(steps=steps, losses=losses, coef=sgd.coef_, batches=batches_seen)
    return dict(steps=steps, losses=losses, coef=None, batches=batches_seen, sgd=sgd, order=order)


@pytest.fixture()
def train_features(gpt2, dataset):
    runner = ProbeRunner(gpt2, [ProbeConfig(SITE, [0, 1])])
    docs = dataset[:]
    X = runner.get_probe_features(docs["input_ids"], docs["attention_mask"])[SITE]
    return X, docs["labels"].numpy(), docs["attention_mask"].sum(1).numpy()


@pytest.mark.parametrize("chunk_rows", [None, 32, "default"])
def test_early_stopping_matches_a_replay_of_the_rules(gpt2, dataset, train_features, chunk_rows):
    """Patience resets after each improvement; each probe stops at the replayed step with the
    replayed coefficients; the run ends at the batch where its last probe stops."""
    X, y, lengths = train_features
    seed, batch_size, max_epochs = 5, 6, 40
    common = dict(test_size=0.25, threshold=1e-3, model_kwargs={"alpha": 0.1}, refit=False)
    configs = [
        ProbeConfig(SITE, [0, 1], patience=15, name="quick", **common),
        ProbeConfig(SITE, [0, 1], patience=45, warmup_steps=10, name="slow", **common),
    ]
    heldout = np.random.default_rng(seed).permutation(len(y))[: round(0.25 * len(y))]
    counter = CountBatches()
    kwargs = {} if chunk_rows == "default" else {"chunk_rows": chunk_rows}
    runner = ProbeRunner(gpt2, configs, seed=seed)
    runner.fit_probes(
        dataset, None, batch_size=batch_size, max_epochs=max_epochs, callbacks=[counter], **kwargs
    )
    chunk = 256 if chunk_rows == "default" else chunk_rows
    # the default length window: about 50 batches (9 groups of 36 here, all 90 documents)
    window = auto_window(batch_size, chunk)
    expected = {
        c.name: replay(
            X,
            y,
            heldout,
            c,
            lengths=lengths,
            batch_size=batch_size,
            chunk_rows=chunk,
            max_epochs=max_epochs,
            seed=seed,
            window=window,
        )
        for c in configs
    }
    for name, ref in expected.items():
        assert ref["coef"] is not None, f"{name} never stopped in the replay: lengthen the test"
        first_loss = ref["losses"][0][1]
        # patience was reset at least once: a later check improved on the first one
        assert any(loss < first_loss - 1e-3 for _, loss in ref["losses"][1:]), name
        assert runner.module.bank.steps[name] == ref["steps"], name
        assert runner.module.bank.stopped_early[name], name
        np.testing.assert_allclose(runner[name].classifier_.coef_, ref["coef"], atol=1e-4)
    # patience restarted after improvements: 'slow' stopped later than patience alone allows
    assert expected["slow"]["steps"] > 10 + 45
    # the run ended at the batch where the last probe stopped, well before max_epochs
    assert counter.batches == max(ref["batches"] for ref in expected.values())
    assert counter.batches < max_epochs * math.ceil(len(y) / batch_size)


def test_grouped_tracing_feeds_the_random_order_and_learns_the_reference(
    gpt2, dataset, train_features, monkeypatch
):
    """Training batches are traced grouped by length, yet each probe is fed the documents
    in one seeded random order: per-batch updates and group updates feed the same rows in
    the same order, and the grouped probe's coefficients equal sklearn fed the random order
    in the same chunks (a straightforward implementation, no length grouping)."""
    X, y, lengths = train_features
    fed: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    partial_fit = LinearProbe.partial_fit

    def recording(self, X_, y_, classes=None):
        fed.setdefault(id(self), []).append((np.array(X_), np.array(y_)))
        return partial_fit(self, X_, y_, classes)

    monkeypatch.setattr(LinearProbe, "partial_fit", recording)
    # one alpha and no early stopping: no rows held out
    config = ProbeConfig(SITE, [0, 1], early_stopping=False, model_kwargs={"alpha": 1e-4})
    runs = {}
    for chunk in (None, 32):
        fed.clear()
        runner = ProbeRunner(gpt2, [config], seed=2)
        runner.fit_probes(dataset, None, batch_size=8, max_epochs=2, chunk_rows=chunk)
        # (the bank's own probe: the code length's block probes are fed too)
        runs[chunk] = (runner, fed[id(runner[config.name])])
    per_batch, chunked = runs[None][1], runs[32][1]
    assert [len(c[1]) for c in per_batch] == [8] * 15 * 2
    # (features of a document traced in batches of other lengths differ by float noise)
    np.testing.assert_allclose(
        np.concatenate([c[0] for c in per_batch]),
        np.concatenate([c[0] for c in chunked]),
        atol=1e-6,
    )
    np.testing.assert_array_equal(
        np.concatenate([c[1] for c in per_batch]), np.concatenate([c[1] for c in chunked])
    )
    # groups of 32 documents, each epoch
    assert [len(c[1]) for c in chunked] == [32, 32, 32, 24] * 2
    # the rows are the training set's features in one seeded random order, each epoch
    order = np.random.default_rng(2).permutation(len(y))
    np.testing.assert_allclose(np.concatenate([c[0] for c in chunked[:4]]), X[order], atol=1e-5)
    scaler = StandardScaler()
    sgd = reference_sgd(1e-4, 2)
    for _epoch in range(2):
        for start in range(0, len(y), 32):
            rows = order[start : start + 32]
            scaler.partial_fit(X[rows])
            sgd.partial_fit(scaler.transform(X[rows]), y[rows], classes=[0, 1])
    # (relative 2e-4: the features of the reference were traced in other batches; a wrong
    # order or chunking moves the coefficients by tens of percent)
    np.testing.assert_allclose(runs[32][0][config.name].classifier_.coef_, sgd.coef_, rtol=2e-4)

    # while the model saw batches sorted by length: by default in one length window of all
    # 120 documents (13 groups of 32 make about 50 batches), with length_window=1 in each
    # group on its own
    def traced(**window):
        module = ProbeDataModule(train_set=dataset, batch_size=8, seed=2, group_size=32, **window)
        return [b["index"].tolist() for b in module.train_dataloader()]

    together = traced()
    assert sorted(np.concatenate(together).tolist()) == sorted(order.tolist())
    assert (np.diff(lengths[np.concatenate(together)]) <= 0).all()
    alone = traced(length_window=1)
    assert sorted(alone[0] + alone[1] + alone[2] + alone[3]) == sorted(order[:32].tolist())
    assert (np.diff(lengths[np.concatenate(alone[:4])]) <= 0).all()


def test_grouping_by_length_cuts_padding_on_a_long_tailed_set(gpt2, hf_gpt2, base_tokenizer):
    """Most documents short, a few long (as real data is): tracing groups of similar length
    pads far less than batches of the random order, and a length window of several groups
    sorted together pads less again, with the same probes learned."""
    rng = np.random.default_rng(0)
    lengths = np.minimum(np.round(rng.pareto(1.2, 400) * 3 + 2), 120).astype(int)
    ids = torch.full((400, 120), base_tokenizer.pad_token_id)
    mask = torch.zeros((400, 120), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.as_tensor(rng.integers(3, 300, n))
        mask[i, :n] = 1
    ds = ProbeDataset(ids, mask, torch.as_tensor(rng.integers(0, 2, 400)))
    traced: dict = {}
    handle = hf_gpt2.transformer.h[0].register_forward_pre_hook(
        lambda _m, args, kwargs: traced.__setitem__("n", traced["n"] + args[0].shape[:2].numel()),
        with_kwargs=True,
    )
    runs = {}
    try:
        for case, group, window in (("plain", None, None), ("groups", 64, 1), ("window", 64, 7)):
            traced["n"] = 0
            config = ProbeConfig(SITE, [0, 1], early_stopping=False, name=case, **ONE_ALPHA)
            runner = ProbeRunner(gpt2, [config], seed=1)
            runner.fit_probes(
                ds, None, num_epoch=1, batch_size=8, chunk_rows=group, length_window=window
            )
            probe = runner[config.name]
            runs[case] = (traced["n"], probe.n_samples_seen_, probe.n_updates_, probe)
    finally:
        handle.remove()
    real = int(lengths.sum())
    plain, groups, window = runs["plain"], runs["groups"], runs["window"]
    assert plain[1] == groups[1] == window[1] == 400
    # tokens traced, padding included (measured: 4,429 real; 16,066 in the random order,
    # 8,178 in groups of 64, 4,770 with all 400 documents sorted in one window)
    assert groups[0] < 0.55 * plain[0]
    # the window sorts all 400 documents together: padding falls again, close to a sort
    assert window[0] < 0.6 * groups[0]
    assert window[0] < 1.1 * real
    # and the probes train on the same groups of 64 in the same random order
    assert groups[2] == window[2] == 7
    np.testing.assert_allclose(window[3].classifier_.coef_, groups[3].classifier_.coef_, rtol=2e-4)


def test_the_heldout_slice_is_traced_with_the_first_window(gpt2, hf_gpt2, base_tokenizer):
    """On a long-tailed set, the early-stopping slice (a tenth of the documents, of every
    length) is traced sorted by length together with the first length window, as one sort
    of both: fewer padded tokens than the slice on its own plus the window, and the probe
    learns and stops as the replayed rules say (lmprobe.tracing.ahead)."""
    rng = np.random.default_rng(1)
    n = 400
    lengths = np.minimum(np.round(rng.pareto(1.2, n) * 3 + 2), 120).astype(int)
    ids = torch.full((n, 120), base_tokenizer.pad_token_id)
    mask = torch.zeros((n, 120), dtype=torch.long)
    for i, length in enumerate(lengths):
        ids[i, :length] = torch.as_tensor(rng.integers(3, 300, length))
        mask[i, :length] = 1
    labels = rng.integers(0, 2, n)
    ds = ProbeDataset(ids, mask, torch.as_tensor(labels))
    # (refit=False: the online training the replay replays)
    config = ProbeConfig(
        SITE, [0, 1], test_size=0.1, patience=6, threshold=1e-3, refit=False, **ONE_ALPHA
    )
    runner = ProbeRunner(gpt2, [config], seed=4)
    tokens = {"n": 0}
    handle = hf_gpt2.transformer.h[0].register_forward_pre_hook(
        lambda _m, args, kwargs: tokens.__setitem__("n", tokens["n"] + args[0].shape[:2].numel()),
        with_kwargs=True,
    )
    try:
        # groups of 64, windows of 2 groups: the first window is 128 of the 360 documents
        runner.fit_probes(ds, None, batch_size=8, max_epochs=1, chunk_rows=64, length_window=2)
    finally:
        handle.remove()
    heldout = np.random.default_rng(4).permutation(n)[: round(0.1 * n)]
    order = np.random.default_rng(4).permutation(n)
    kept = order[~np.isin(order, heldout)]

    def padded(docs: np.ndarray) -> int:  # tokens of length-sorted batches of 8
        sorted_ = np.sort(lengths[docs])[::-1]
        return sum(
            int(sorted_[i : i + 8].max()) * len(sorted_[i : i + 8]) for i in range(0, len(docs), 8)
        )

    windows = [kept[i : i + 128] for i in range(0, len(kept), 128)]
    later = sum(padded(w) for w in windows[1:])
    together = padded(np.concatenate([heldout, windows[0]])) + later
    alone = padded(heldout) + padded(windows[0]) + later  # the slice on its own (before)
    bank = runner.module.bank
    assert not bank.stopped_early[config.name]  # (else the run ends in its window)
    assert tokens["n"] == together
    # measured: 5,352 tokens traced, against 6,016 with the slice on its own (11% fewer)
    assert together < 0.92 * alone
    docs = ds[:]
    X = runner.get_probe_features(docs["input_ids"], docs["attention_mask"])[config.name]
    ref = replay(
        X,
        labels,
        heldout,
        config,
        lengths=lengths,
        batch_size=8,
        chunk_rows=64,
        max_epochs=1,
        seed=4,
        window=2,
    )
    assert bank.steps[config.name] == ref["steps"]
    np.testing.assert_allclose(
        [loss for _, loss in bank.history[config.name]],
        [loss for _, loss in ref["losses"]],
        rtol=1e-4,
    )
    np.testing.assert_allclose(runner[config.name].classifier_.coef_, ref["sgd"].coef_, rtol=2e-4)


def test_a_length_window_trains_group_by_group_and_stops_where_one_group_would(
    gpt2, dataset, monkeypatch
):
    """Several groups traced sorted together (a length window): the bank trains each group
    on its own, in the random order, with the step count it would have had tracing group by
    group, so early stopping retires the probe at the same step, mid-window, with the same
    coefficients and the same held-out curve; later groups of the window are not trained on."""
    fed: dict[int, list[np.ndarray]] = {}
    partial_fit = LinearProbe.partial_fit
    window = 1

    def recording(self, X_, y_, classes=None):
        fed.setdefault(window, []).append(np.array(y_))
        return partial_fit(self, X_, y_, classes)

    monkeypatch.setattr(LinearProbe, "partial_fit", recording)
    runs = {}
    for window in (1, 4):
        config = ProbeConfig(
            SITE, [0, 1], test_size=0.2, patience=4, warmup_steps=2, threshold=0.5, **ONE_ALPHA
        )
        runner = ProbeRunner(gpt2, [config], seed=5)
        runner.fit_probes(
            dataset, None, batch_size=8, max_epochs=3, chunk_rows=16, length_window=window
        )
        runs[window] = runner
    bank1, bank4 = (runs[w].module.bank for w in (1, 4))
    name = next(iter(bank1.configs))
    assert bank1.stopped_early[name] and bank4.stopped_early[name]
    steps = bank1.steps[name]
    assert steps == bank4.steps[name]
    # groups of 2 batches, windows of 8: it stopped inside a window, not at its end
    assert steps % 8 != 0
    assert [s for s, _ in bank1.history[name]] == [s for s, _ in bank4.history[name]]
    np.testing.assert_allclose(
        [loss for _, loss in bank4.history[name]],
        [loss for _, loss in bank1.history[name]],
        rtol=1e-4,
    )
    assert [len(y) for y in fed[4]] == [len(y) for y in fed[1]]
    for y4, y1 in zip(fed[4], fed[1], strict=True):
        np.testing.assert_array_equal(y4, y1)
    np.testing.assert_allclose(
        runs[4][name].classifier_.coef_, runs[1][name].classifier_.coef_, rtol=2e-4
    )


def test_validation_split_is_scored_like_sklearn_and_traced_once(gpt2, hf_gpt2, docs):
    """``val_set``: validation_step runs every epoch on features traced once, and the final
    "val" metrics equal sklearn's on the final probes."""
    from sklearn import metrics as skm

    from lmprobe.data.datamodule import ProbeDataModule
    from lmprobe.training.engine import fit_and_test

    _, enc, labels = docs
    ds = ProbeDataset(enc["input_ids"], enc["attention_mask"], labels)
    rest, test_set = ds.tt_split(test_size=0.25, seed=0)
    train_set, val_set = rest.tt_split(test_size=0.3, seed=0)
    config = ProbeConfig(SITE, [0, 1], early_stopping=False, **ONE_ALPHA)
    runner = ProbeRunner(gpt2, [config], seed=0)
    calls = {"n": 0}
    handle = hf_gpt2.transformer.h[0].register_forward_pre_hook(
        lambda *_: calls.__setitem__("n", calls["n"] + 1)
    )
    import lightning as L

    from lmprobe.training.engine import probe_callbacks

    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=probe_callbacks(0),
    )
    datamodule = ProbeDataModule(
        train_set=train_set, val_set=val_set, test_set=test_set, batch_size=8
    )
    try:
        fit_and_test(trainer, runner.module, datamodule)
    finally:
        handle.remove()
    n_batches = sum(math.ceil(len(s) / 8) for s in (train_set, val_set, test_set))
    assert calls["n"] == n_batches  # training and validation traced once, in epoch 1
    table = runner.module.bank.tables["val"]
    docs_ = val_set[:]
    X = runner.get_probe_features(docs_["input_ids"], docs_["attention_mask"])[config.name]
    y = docs_["labels"].numpy()
    probe = runner[config.name]
    pred, proba = probe.predict(X), probe.predict_proba(X)
    row = table.loc[config.name]
    assert row["support"] == len(val_set)
    assert row["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-6)
    assert row["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=1e-6)
    assert row["loss"] == pytest.approx(skm.log_loss(y, proba, labels=[0, 1]), abs=1e-5)


def test_a_different_seed_changes_what_is_learned(gpt2, dataset):
    """The seed is used: a different one holds out other rows and learns other weights."""
    configs = [ProbeConfig(SITE, [0, 1], test_size=0.2, patience=2)]
    a = ProbeRunner(gpt2, configs, seed=11).fit_probes(dataset, None, batch_size=8)
    b = ProbeRunner(gpt2, configs, seed=12).fit_probes(dataset, None, batch_size=8)
    c = ProbeRunner(gpt2, configs, seed=11).fit_probes(dataset, None, batch_size=8)
    assert not np.array_equal(a.module.bank.heldout_index, b.module.bank.heldout_index)
    assert not np.allclose(a[SITE].classifier_.coef_, b[SITE].classifier_.coef_)
    np.testing.assert_array_equal(a[SITE].classifier_.coef_, c[SITE].classifier_.coef_)


def test_token_metrics_accumulate_over_several_default_chunks(gpt2, docs):
    """A token-level test set of several default chunks (256 rows): every metric equals
    sklearn's on all of its rows at once."""
    from test_class_order import METRICS, reference_metrics

    _, enc, _ = docs
    ids, mask = enc["input_ids"], enc["attention_mask"]
    ds = ProbeDataset(ids, mask, ids % 3)  # three classes, decodable from the token itself
    train_set, test_set = ds.tt_split(test_size=0.5, seed=0)
    config = ProbeConfig("transformer.h.0.output", [2, 0, 1], pooling="none")
    runner = ProbeRunner(gpt2, [config]).fit_probes(train_set, test_set, batch_size=8)
    docs_ = test_set[:]
    real = docs_["attention_mask"].bool()
    X = runner.get_probe_features(docs_["input_ids"], docs_["attention_mask"])[config.name]
    X, y = X[real.numpy()], docs_["labels"][real].numpy()
    row = runner.metrics.loc[config.name]
    assert row["support"] == len(y) > 2 * 256
    expected = reference_metrics(runner[config.name], X, y)
    for metric in METRICS:
        assert row[metric] == pytest.approx(expected[metric], abs=1e-5), metric


def test_fixtures_do_not_share_a_tokenizer(tokenizer, gpt2, docs):
    """A test that changes its tokenizer cannot change how the shared model or data pad."""
    tokenizer.padding_side = "right"
    assert gpt2.tokenizer.padding_side == "left"
    assert (docs[1]["attention_mask"][:, -1] == 1).all()  # left-padded, whatever ran first


class RecordBatches(Callback):
    def __init__(self) -> None:
        self.indices: list[list[int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 0:
            self.indices.append(batch["index"].tolist())


@pytest.mark.parametrize("batch_size", [5, 12])
def test_training_batches_leave_the_heldout_slice_out_and_stay_full(
    gpt2, dataset, monkeypatch, batch_size
):
    """The held-out slice is traced before training and no training batch holds one of its
    documents: the model traces whole batches of the run's batch size (the slice too: not a
    fixed 8), as many as the documents need (not the training set's batch count plus the
    slice's, trimmed). Here the first length window holds every training document, so the
    slice and the training set are traced as one sort by length (``lmprobe.tracing.ahead``)."""
    from lmprobe.training.module import ProbeModule

    traced: list[int] = []
    extract = ProbeModule.extract

    def counting(self, batch, names, *args, **kwargs):
        traced.append(len(batch["index"]))
        return extract(self, batch, names, *args, **kwargs)

    monkeypatch.setattr(ProbeModule, "extract", counting)
    n, seed = len(dataset), 3
    config = ProbeConfig(SITE, [0, 1], test_size=0.2, patience=10_000, **ONE_ALPHA)
    recorder = RecordBatches()
    runner = ProbeRunner(gpt2, [config], seed=seed)
    runner.fit_probes(dataset, None, batch_size=batch_size, max_epochs=2, callbacks=[recorder])
    heldout = np.random.default_rng(seed).permutation(n)[: round(0.2 * n)]
    np.testing.assert_array_equal(runner.module.bank.heldout_index, heldout)
    seen = np.concatenate(recorder.indices)
    assert not np.isin(seen, heldout).any()
    np.testing.assert_array_equal(np.sort(seen), np.setdiff1d(np.arange(n), heldout))
    # the slice with the first window, before training: the first epoch's training batches
    # take their rows from there (later epochs replay them)
    assert len(traced) == math.ceil(n / batch_size)
    assert sum(size < batch_size for size in traced) <= 1  # the last batch
    assert sum(traced) == n


def test_windows_trained_on_the_worker_learn_what_windows_trained_in_place_learn(
    gpt2, dataset, monkeypatch
):
    """A length window that ends inside an epoch trains on the worker thread while the next
    one is traced, the batches traced meanwhile waiting for it (made slow here, so they
    do): every probe learns exactly what it learns with each window trained in place (same
    coefficients, steps, held-out curve, stop), a probe that stops there ignores the rows
    traced for it meanwhile, and the run traces as many batches."""
    import threading

    from lmprobe.bank.bank import ProbeBank
    from lmprobe.training.callbacks import ProbeUpdater

    train_on, wait = ProbeBank._train_on, ProbeBank.wait
    on_worker: list[int] = []
    waited_for: list[int] = []  # batches waiting for the worker's training when it is joined

    def slow_train_on(self, name, rows, buffered):
        if threading.current_thread().name == "lmprobe-bank" and rows is not None:
            on_worker.append(len(rows.y))
            threading.Event().wait(0.05)  # the next batches are traced (and wait) meanwhile
        return train_on(self, name, rows, buffered)

    def counting_wait(self, raise_error=True):
        if self._pending is not None:
            waited_for.append(len(self._deferred))
        return wait(self, raise_error)

    monkeypatch.setattr(ProbeBank, "_train_on", slow_train_on)
    monkeypatch.setattr(ProbeBank, "wait", counting_wait)
    configs = [  # one stops early (mid-run), one never does (so the run goes on)
        ProbeConfig(
            "transformer.h.1.output",
            [0, 1],
            patience=3,
            warmup_steps=2,
            threshold=0.5,
            name="stops",
            **ONE_ALPHA,
        ),
        ProbeConfig(SITE, [0, 1], early_stopping=False, name="goes on", **ONE_ALPHA),
    ]
    train_set, test_set = dataset.tt_split(test_size=0.25, seed=3)
    runs, counts = {}, {}
    for while_tracing in (False, True):
        monkeypatch.setattr(ProbeUpdater, "train_while_tracing", while_tracing)
        on_worker.clear()
        counter = CountBatches()
        runner = ProbeRunner(gpt2, configs, seed=5)
        runner.fit_probes(
            train_set,
            test_set,
            batch_size=4,
            max_epochs=2,
            chunk_rows=8,
            length_window=1,
            callbacks=[counter],
        )
        runs[while_tracing], counts[while_tracing] = runner, (counter.batches, len(on_worker))
    in_place, on_thread = runs[False].module.bank, runs[True].module.bank
    # windows of 2 batches: in place, only the last window's training left the main thread
    # (while the test set is traced); on the worker, those inside the epochs too, and
    # batches waited for them
    assert counts[True][1] > counts[False][1] + 4
    assert max(waited_for) >= 1
    assert counts[True][0] == counts[False][0]
    assert in_place.stopped_early["stops"] and on_thread.stopped_early["stops"]
    assert in_place.steps["stops"] < in_place.steps["goes on"]  # it stopped mid-run
    for name in configs[0].name, configs[1].name:
        assert on_thread.steps[name] == in_place.steps[name], name
        assert on_thread.history[name] == in_place.history[name], name
        for attribute in ("coef_", "intercept_"):
            np.testing.assert_array_equal(
                getattr(runs[True][name].classifier_, attribute),
                getattr(runs[False][name].classifier_, attribute),
            )
    assert runs[True].metrics.equals(runs[False].metrics)
