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
from lightning.pytorch.callbacks import Callback
from sklearn.linear_model import SGDClassifier
from sklearn.metrics import log_loss
from sklearn.preprocessing import StandardScaler

from lmprobe import LinearProbe, ProbeConfig, ProbeDataset, ProbeRunner

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
    batch_size: int,
    chunk_rows: int | None,
    max_epochs: int,
    seed: int,
) -> dict:
    """What one probe should do, batch by batch, from the rules in the docs."""
    keep = ~np.isin(np.arange(len(y)), heldout)
    scaler = StandardScaler()
    sgd = SGDClassifier(loss="log_loss", random_state=seed, **config.model_kwargs)
    classes = np.unique(config.classes)
    best, best_step, steps, losses, batches_seen = math.inf, 0, 0, [], 0
    buffer: list[np.ndarray] = []

    def update() -> None:
        rows = np.concatenate(buffer)
        buffer.clear()
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
        for start in range(0, len(y), batch_size):
            batches_seen += 1
            docs = np.arange(start, min(start + batch_size, len(y)))
            docs = docs[keep[docs]]
            if not len(docs):
                continue
            steps += 1
            buffer.append(docs)
            if chunk_rows is None or sum(map(len, buffer)) >= chunk_rows:
                update()
                if stop_now():
                    return dict(steps=steps, losses=losses, coef=sgd.coef_, batches=batches_seen)
        if buffer:
            update()
            if stop_now():
                return dict(steps=steps, losses=losses, coef=sgd.coef_, batches=batches_seen)
    return dict(steps=steps, losses=losses, coef=None, batches=batches_seen, sgd=sgd)


@pytest.fixture()
def train_features(gpt2, dataset):
    runner = ProbeRunner(gpt2, [ProbeConfig(SITE, [0, 1])])
    docs = dataset[:]
    X = runner.get_probe_features(docs["input_ids"], docs["attention_mask"])[SITE]
    return X, docs["labels"].numpy()


@pytest.mark.parametrize("chunk_rows", [None, 32, "default"])
def test_early_stopping_matches_a_replay_of_the_rules(gpt2, dataset, train_features, chunk_rows):
    """Patience resets after each improvement; each probe stops at the replayed step with the
    replayed coefficients; the run ends at the batch where its last probe stops."""
    X, y = train_features
    seed, batch_size, max_epochs = 5, 6, 40
    common = dict(test_size=0.25, threshold=1e-3, model_kwargs={"alpha": 0.1})
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
    expected = {
        c.name: replay(
            X,
            y,
            heldout,
            c,
            batch_size=batch_size,
            chunk_rows=chunk,
            max_epochs=max_epochs,
            seed=seed,
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


def test_chunked_updates_feed_the_same_rows_and_learn_the_reference(
    gpt2, dataset, train_features, monkeypatch
):
    """Per-batch and chunked updates feed each probe the same rows in the same order; the
    chunked probe's coefficients equal sklearn fed the same chunks."""
    X, y = train_features
    fed: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    partial_fit = LinearProbe.partial_fit

    def recording(self, X_, y_, classes=None):
        fed.setdefault(id(self), []).append((np.array(X_), np.array(y_)))
        return partial_fit(self, X_, y_, classes)

    monkeypatch.setattr(LinearProbe, "partial_fit", recording)
    config = ProbeConfig(SITE, [0, 1], early_stopping=False)
    runs = {}
    for chunk in (None, 32):
        fed.clear()
        runner = ProbeRunner(gpt2, [config], seed=2)
        runner.fit_probes(dataset, None, batch_size=8, max_epochs=2, chunk_rows=chunk)
        (calls,) = fed.values()
        runs[chunk] = (runner, calls)
    per_batch, chunked = runs[None][1], runs[32][1]
    assert [len(c[1]) for c in per_batch] == [8] * 15 * 2
    np.testing.assert_array_equal(
        np.concatenate([c[0] for c in per_batch]), np.concatenate([c[0] for c in chunked])
    )
    np.testing.assert_array_equal(
        np.concatenate([c[1] for c in per_batch]), np.concatenate([c[1] for c in chunked])
    )
    # chunks of at least 32 rows, the remainder at each epoch's end
    assert [len(c[1]) for c in chunked] == [32, 32, 32, 24] * 2
    # the rows are the training set's features, in the dataset's order, each epoch
    np.testing.assert_allclose(np.concatenate([c[0] for c in chunked[:4]]), X, atol=1e-5)
    scaler, sgd = StandardScaler(), SGDClassifier(loss="log_loss", random_state=2)
    for X_, y_ in chunked:
        scaler.partial_fit(X_)
        sgd.partial_fit(scaler.transform(X_), y_, classes=[0, 1])
    np.testing.assert_allclose(runs[32][0][config.name].classifier_.coef_, sgd.coef_, atol=1e-6)


def test_validation_split_is_scored_like_sklearn_and_traced_once(gpt2, hf_gpt2, docs):
    """``val_set``: validation_step runs every epoch on features traced once, and the final
    "val" metrics equal sklearn's on the final probes."""
    from sklearn import metrics as skm

    from lmprobe.datamodule import ProbeDataModule
    from lmprobe.engine import fit_and_test

    _, enc, labels = docs
    ds = ProbeDataset(enc["input_ids"], enc["attention_mask"], labels)
    rest, test_set = ds.tt_split(test_size=0.25, seed=0)
    train_set, val_set = rest.tt_split(test_size=0.3, seed=0)
    config = ProbeConfig(SITE, [0, 1], early_stopping=False)
    runner = ProbeRunner(gpt2, [config], seed=0)
    calls = {"n": 0}
    handle = hf_gpt2.transformer.h[0].register_forward_pre_hook(
        lambda *_: calls.__setitem__("n", calls["n"] + 1)
    )
    import lightning as L

    from lmprobe.engine import probe_callbacks

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
