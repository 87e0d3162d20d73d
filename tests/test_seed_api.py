"""A script written for lm_probe runs with only the import changed.

Every call the original tool's scripts make (t-shoemaker/lm_probe: README, ``ProbeConfig``,
``ProbeRunner``, ``LinearProbe``, ``FeatureExtractor``, ``ProbeDataset``), with its exact
signatures and positional orders, on the tiny GPT-2. Results are checked against
independent references: scikit-learn metrics computed here from the probes' own
``predict``/``predict_proba``, and a plain HF forward of each document alone for activations.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import reference_sgd
from sklearn import metrics as skm
from sklearn.preprocessing import StandardScaler

from lmprobe import FeatureExtractor, LinearProbe, ProbeConfig, ProbeDataset, ProbeRunner
from lmprobe.probes.kinds import DEFAULT_ALPHAS

SUB = "transformer.h.5.mlp.output"
METRICS = ["loss", "accuracy", "precision", "recall", "f1", "matthews"]
# lm_probe's ProbeConfig fields, in its positional order
SEED_FIELDS = [
    "submodule",
    "classes",
    "test_size",
    "max_steps",
    "early_stopping",
    "patience",
    "threshold",
    "warmup_steps",
    "pool",
    "null_label",
    "model_kwargs",
]


# ------------------------------------------------------------------ references
def seed_metrics(y, preds, probs, classes) -> dict[str, float]:
    """lm_probe's ``Metrics.compute``: scikit-learn, macro averages over ``classes``."""
    classes = list(classes)
    return {
        "loss": skm.log_loss(y, probs, labels=classes),
        "accuracy": skm.accuracy_score(y, preds),
        "precision": skm.precision_score(
            y, preds, labels=classes, average="macro", zero_division=0
        ),
        "recall": skm.recall_score(y, preds, labels=classes, average="macro", zero_division=0),
        "f1": skm.f1_score(y, preds, labels=classes, average="macro", zero_division=0),
        "matthews": skm.matthews_corrcoef(y, preds),
    }


def probe_reference(probe, X, y, classes) -> dict[str, float]:
    return seed_metrics(y, probe.predict(X), probe.predict_proba(X), classes)


def assert_row(row, expected: dict[str, float], what: str = "") -> None:
    for metric in METRICS:
        assert row[metric] == pytest.approx(expected[metric], rel=1e-6, abs=1e-6), (
            f"{what} {metric}"
        )


def unpadded_hidden(hf_model, ids: torch.Tensor, mask: torch.Tensor, layer: int) -> list:
    """``hidden_states[layer]`` of each document run alone, without padding (real tokens)."""
    out = []
    for row, real in zip(ids, mask.bool(), strict=True):
        with torch.no_grad():
            result = hf_model(input_ids=row[real][None], output_hidden_states=True)
        out.append(result.hidden_states[layer][0])
    return out


# -------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data(docs):
    """The toy texts as lm_probe's README builds them: a ProbeDataset and a tt_split."""
    _, enc, labels = docs
    labels = labels.tolist()
    ds = ProbeDataset(enc["input_ids"], enc["attention_mask"], labels)
    train_set, test_set = ds.tt_split(test_size=0.1)
    return ds, train_set, test_set, set(labels)


@pytest.fixture(scope="module")
def fitted(gpt2, data):
    """Three probes (one built positionally), fitted with lm_probe's keyword call and
    scored on the whole dataset (longer than the training set)."""
    ds, train_set, _, classes = data
    configs = [
        ProbeConfig("transformer.h.10.output", classes, 0.2, 500, True, 3, 1e-4, 2),
        ProbeConfig(SUB, classes),
        ProbeConfig("transformer.h.7.attn.output", classes),
    ]
    runner = ProbeRunner(gpt2, configs, False)
    out = runner.fit_probes(train_set, ds, num_epoch=3, batch_size=16, limit_eval_batches=True)
    assert out is runner
    return runner, configs


# ------------------------------------------------------------------ ProbeConfig
def test_probe_config_defaults_and_positional_order(data):
    classes = data[3]
    assert [f.name for f in dataclasses.fields(ProbeConfig)][: len(SEED_FIELDS)] == SEED_FIELDS
    config = ProbeConfig(SUB, classes)
    assert config.submodule == SUB and set(config.classes) == classes == {0, 1}
    assert config.test_size == 0.1
    # lm_probe's order; defaults that train to convergence (lm_probe: 1000, 5, 1e-5)
    assert config.max_steps is None
    assert config.early_stopping is True
    assert config.patience == 200
    assert config.threshold == 1e-4
    assert config.warmup_steps == 10
    assert config.null_label is None and config.model_kwargs == {}
    assert not config.token_level  # lm_probe's pool=True: mean-pooled

    config = ProbeConfig(SUB, classes, 0.2, 500, True, 3, 1e-4, 2)
    values = (0.2, 500, True, 3, 1e-4, 2)
    names = ("test_size", "max_steps", "early_stopping", "patience", "threshold", "warmup_steps")
    assert tuple(getattr(config, n) for n in names) == values
    assert ProbeConfig(SUB, classes, 0.2, 500, False).early_stopping is False
    token = ProbeConfig(SUB, classes, 0.1, 1000, True, 5, 1e-5, 10, False, -100, {"alpha": 1e-3})
    assert token.token_level and token.null_label == -100
    assert token.model_kwargs == {"alpha": 1e-3}


# ------------------------------------------------------------------ ProbeRunner
def test_runner_probes_submodules_getitem(gpt2, data):
    ds, train_set, test_set, classes = data
    subs = ["transformer.h.9.output", SUB, "transformer.h.2.attn.output"]
    configs = [ProbeConfig(s, classes, early_stopping=False, max_steps=3) for s in subs]
    runner = ProbeRunner(gpt2, configs, False)
    assert repr(runner) == "Probe runner for 3 probe(s)"
    assert runner.submodules == subs  # config order, not forward order
    assert isinstance(runner.probes, list) and len(runner.probes) == 3
    for sub, probe in zip(subs, runner.probes, strict=True):
        assert runner[sub] is probe
    with pytest.raises(KeyError):
        runner["transformer.h.3.output"]
    assert ProbeRunner(gpt2, [configs[0]], True).module.remote is True  # 3rd positional
    assert runner.module.remote is False

    # lm_probe trains runner.probes in place: a probe taken before fitting is the fitted one
    before = runner[SUB]
    runner.fit_probes(train_set, test_set, batch_size=16)
    assert runner[SUB] is before and runner.probes[1] is before
    X = runner.get_probe_features(test_set.input_ids, test_set.attention_mask, [SUB])[SUB]
    assert before.predict(X).shape == (len(test_set),)


def test_fit_probes_positional_num_epoch_and_batch_size(gpt2, data):
    _, train_set, test_set, classes = data
    runner = ProbeRunner(gpt2, [ProbeConfig(SUB, classes, 0.1, 1000, False)], False)
    assert runner.fit_probes(train_set, test_set, 2, 16) is runner
    trainer = runner.trainer
    per_epoch = -(-len(train_set) // 16)
    assert trainer.max_epochs == 2 and trainer.current_epoch == 2  # epochs 0 and 1 ran
    # batches of 16 (7 per epoch), two epochs: 2 batches of 54 or 16 epochs would differ
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 2 * per_epoch
    assert runner.metrics.loc[SUB, "steps"] == 2 * per_epoch  # one step per training batch
    assert runner.metrics.loc[SUB, "support"] == len(test_set)


def test_runner_metrics_equal_sklearn(fitted, data):
    runner, configs = fitted
    ds, _, _, classes = data
    table = runner.metrics
    assert isinstance(table, pd.DataFrame)
    assert list(table.index) == runner.submodules
    assert set(METRICS) <= set(table.columns)
    assert list(table[METRICS].columns) == METRICS
    X = runner.get_probe_features(ds.input_ids, ds.attention_mask)
    y = ds.labels.numpy()
    for config in configs:
        sub = config.submodule
        # limit_eval_batches=True with more training batches than eval batches: all scored
        assert table.loc[sub, "support"] == len(ds)
        expected = probe_reference(runner[sub], X[sub], y, classes)
        assert_row(table.loc[sub], expected, sub)


def test_limit_eval_batches_scores_as_many_batches_as_training_ran(gpt2, docs):
    _, enc, labels = docs
    ids, mask, labels = enc["input_ids"], enc["attention_mask"], labels.tolist()
    train_set = ProbeDataset(ids[:16], mask[:16], labels[:16])  # one batch of 16 per epoch
    eval_set = ProbeDataset(ids[16:], mask[16:], labels[16:])  # 104 rows: 7 batches
    runner = ProbeRunner(gpt2, [ProbeConfig(SUB, set(labels))])
    runner.fit_probes(train_set, eval_set, num_epoch=3, batch_size=16, limit_eval_batches=True)
    assert runner.trainer.fit_loop.epoch_loop.batch_progress.total.completed == 3
    probe = runner[SUB]
    first = slice(0, 3 * 16)  # lm_probe: the first 3 eval batches, in the eval set's order
    X = runner.get_probe_features(ids[16:][first], mask[16:][first])[SUB]
    row = runner.metrics.loc[SUB]
    assert row["support"] == 48
    assert_row(row, probe_reference(probe, X, np.array(labels[16:][first]), {0, 1}), "limit")

    # default: the whole eval set (lm_probe's default limit_eval_batches=True would score 48)
    runner.fit_probes(train_set, eval_set, num_epoch=3, batch_size=16)
    X = runner.get_probe_features(ids[16:], mask[16:])[SUB]
    row = runner.metrics.loc[SUB]
    assert row["support"] == len(eval_set)
    assert_row(row, probe_reference(probe, X, np.array(labels[16:]), {0, 1}), "default")


def test_compute_metrics_batch_limit(fitted, data):
    runner, configs = fitted
    ds, _, _, classes = data
    X = runner.get_probe_features(ds.input_ids, ds.attention_mask)
    y = ds.labels.numpy()
    whole = runner.compute_metrics(ds, batch_size=32, batch_limit=None)
    limited = runner.compute_metrics(ds, batch_size=32, batch_limit=2)
    pd.testing.assert_frame_equal(runner.compute_metrics(ds, 32, 2), limited)
    assert list(whole.index) == list(limited.index) == runner.submodules
    for config in configs:
        sub = config.submodule
        assert whole.loc[sub, "support"] == len(ds)
        assert_row(whole.loc[sub], probe_reference(runner[sub], X[sub], y, classes), sub)
        # only the first 2 batches of 32, in the dataset's order
        assert limited.loc[sub, "support"] == 64
        expected = probe_reference(runner[sub], X[sub][:64], y[:64], classes)
        assert_row(limited.loc[sub], expected, f"{sub} batch_limit=2")


# ----------------------------------------------------------- get_probe_features
def test_get_probe_features_pooled_and_subset(fitted, data, hf_gpt2):
    runner, _ = fitted
    ds = data[0]
    ids, mask = ds.input_ids[:6], ds.attention_mask[:6]
    features = runner.get_probe_features(ids, mask)
    assert list(features) == runner.submodules
    for X in features.values():
        assert isinstance(X, np.ndarray) and X.dtype == np.float32 and X.shape == (6, 64)
    only = runner.get_probe_features(ids, mask, subset=[SUB])
    assert list(only) == [SUB]
    np.testing.assert_allclose(only[SUB], features[SUB], atol=1e-6, rtol=0)
    assert list(runner.get_probe_features(ids, mask, [SUB])) == [SUB]  # 3rd positional
    # transformer.h.10.output is hidden_states[11], mean-pooled over each text's real tokens
    expected = torch.stack([h.mean(0) for h in unpadded_hidden(hf_gpt2, ids, mask, 11)])
    np.testing.assert_allclose(
        features["transformer.h.10.output"], expected.numpy(), atol=1e-5, rtol=0
    )


def test_get_probe_features_token_level(gpt2, hf_gpt2, data):
    ds, _, _, classes = data
    ids, mask = ds.input_ids[:5], ds.attention_mask[:5]
    runner = ProbeRunner(gpt2, [ProbeConfig("transformer.h.2.output", classes, pool=False)])
    X = runner.get_probe_features(ids, mask)["transformer.h.2.output"]
    assert X.shape == (5, ids.shape[1], 64)  # (documents, tokens, d) like lm_probe
    for doc, expected in enumerate(unpadded_hidden(hf_gpt2, ids, mask, 3)):
        got = X[doc][mask[doc].bool().numpy()]
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ LinearProbe
def test_probe_predict_score_compute_metrics(fitted, data):
    runner, _ = fitted
    ds, _, _, classes = data
    probe = runner[SUB]
    X = runner.get_probe_features(ds.input_ids, ds.attention_mask, [SUB])[SUB]
    y = ds.labels.numpy()
    preds, probs = probe.predict(X), probe.predict_proba(X)
    assert preds.shape == (len(ds),) and set(np.unique(preds)) <= classes
    assert probs.shape == (len(ds), 2)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    # score: cross-entropy, as lm_probe (not scikit-learn's accuracy)
    expected_loss = skm.log_loss(y, probs.astype(np.float64), labels=list(classes))
    assert probe.score(X, y) == pytest.approx(expected_loss, rel=1e-9)
    metrics = probe.compute_metrics(X, y)
    assert list(metrics.to_dict()) == METRICS
    assert probe.metrics is metrics
    assert_row(metrics.to_dict(), seed_metrics(y, preds, probs, classes), "compute_metrics")


def test_take_step_is_one_partial_fit(gpt2, data):
    ds, _, _, classes = data
    runner = ProbeRunner(gpt2, [ProbeConfig(SUB, classes)])
    probe = runner[SUB]
    X = runner.get_probe_features(ds.input_ids[:64], ds.attention_mask[:64])[SUB]
    y = ds.labels.numpy()[:64]
    scaler = StandardScaler()
    # no held-out rows have chosen an alpha: the grid's middle one predicts
    sgd = reference_sgd(1e-2, probe.random_state)
    for rows in (slice(0, 32), slice(32, 64)):
        assert probe.take_step(X[rows], y[rows]) is probe
        scaler.partial_fit(X[rows])
        sgd.partial_fit(scaler.transform(X[rows]), y[rows], classes=sorted(classes))
        np.testing.assert_allclose(probe.predict_proba(X), sgd.predict_proba(scaler.transform(X)))
    assert probe.n_updates_ == 2 and probe.n_samples_seen_ == 64
    assert probe.alpha_ == 1e-2 and len(probe.estimators_) == len(DEFAULT_ALPHAS)


def test_take_step_token_level_flattens_and_drops_null_label(gpt2, data):
    ds, _, _, classes = data
    sub = "transformer.h.2.output"
    runner = ProbeRunner(gpt2, [ProbeConfig(sub, classes, pool=False, null_label=-100)])
    probe = runner[sub]
    ids, mask = ds.input_ids[:12], ds.attention_mask[:12]
    X = runner.get_probe_features(ids, mask)[sub]  # (12, tokens, d), padding included
    y = ds.labels[:12, None].expand_as(ids).clone()
    y[mask == 0] = -100
    y = y.numpy()
    assert probe.take_step(X, y) is probe
    keep = y.reshape(-1) != -100
    rows, labels = X.reshape(-1, X.shape[-1])[keep], y.reshape(-1)[keep]
    scaler = StandardScaler().partial_fit(rows)
    sgd = reference_sgd(1e-2, probe.random_state)
    sgd.partial_fit(scaler.transform(rows), labels, classes=sorted(classes))
    assert probe.n_samples_seen_ == int(mask.sum())
    np.testing.assert_allclose(probe.predict_proba(rows), sgd.predict_proba(scaler.transform(rows)))
    # predict on 3-D features flattens every position, as lm_probe does
    assert probe.predict(X).shape == (X.shape[0] * X.shape[1],)


# ------------------------------------------------------------- FeatureExtractor
# block outputs and their hidden_states index (the last block's output is before ln_f,
# hidden_states[12] after it, so it is left out here)
BLOCKS = {"transformer.h.0.output": 1, "transformer.h.5.output": 6, "transformer.h.10.output": 11}
SUB_BLOCK = "transformer.h.5.output"


def test_feature_extractor_equals_plain_hf_forward(gpt2, hf_gpt2, data):
    ds = data[0]
    ids, mask = ds.input_ids[:6], ds.attention_mask[:6]
    assert len(set(mask.sum(1).tolist())) > 1  # documents of different lengths
    extractor = FeatureExtractor(gpt2, remote=False)
    pooled = extractor(list(BLOCKS), ids, mask, pool=True, cache=False)
    tokens = extractor(list(BLOCKS), ids, mask, False, False)  # lm_probe's positional order
    assert list(pooled) == list(tokens) == list(BLOCKS)
    for name, layer in BLOCKS.items():
        assert pooled[name].shape == (6, 64)
        assert tokens[name].shape == (6, ids.shape[1], 64)
        for doc, expected in enumerate(unpadded_hidden(hf_gpt2, ids, mask, layer)):
            torch.testing.assert_close(pooled[name][doc], expected.mean(0), atol=1e-5, rtol=0)
            real = tokens[name][doc][mask[doc].bool()]
            torch.testing.assert_close(real, expected, atol=1e-5, rtol=0)
    # default arguments: pool=True, cache=False
    torch.testing.assert_close(extractor(list(BLOCKS), ids, mask)[SUB_BLOCK], pooled[SUB_BLOCK])


def test_feature_extractor_cache(gpt2, data):
    ds = data[0]
    ids, mask = ds.input_ids[:4], ds.attention_mask[:4]
    extractor = FeatureExtractor(gpt2)
    out = extractor([SUB_BLOCK, SUB], ids, mask, pool=True, cache=True)
    for name in (SUB_BLOCK, SUB):
        assert torch.equal(extractor.get_cached(name), out[name])
    assert repr(extractor) == "Extractor for gpt2"
    extractor([SUB], ids, mask, cache=True)  # cache=True replaces the cache, as in lm_probe
    assert torch.equal(extractor.get_cached(SUB), out[SUB])
    with pytest.raises(KeyError):
        extractor.get_cached(SUB_BLOCK)
    extractor.clear_cache()
    with pytest.raises(KeyError):
        extractor.get_cached(SUB)
    extractor([SUB], ids, mask, cache=True)
    extractor([SUB], ids, mask)  # cache=False empties the cache, as in lm_probe
    with pytest.raises(KeyError):
        extractor.get_cached(SUB)


def test_feature_extractor_pool_needs_attention_mask(gpt2, hf_gpt2, data):
    ds = data[0]
    real = ds.attention_mask[0].bool()
    ids = ds.input_ids[:1, real]  # one document, no padding
    with pytest.raises(ValueError):
        FeatureExtractor(gpt2)([SUB_BLOCK], ids)
    with pytest.raises(ValueError):
        FeatureExtractor(gpt2)([SUB_BLOCK], ids, None, True)
    padded, mask = ds.input_ids[:2], ds.attention_mask[:2].clone()
    mask[1] = 0  # an empty document: nothing to mean-pool (lm_probe returned zeros)
    with pytest.raises(ValueError, match="document 1 has no real token"):
        FeatureExtractor(gpt2)([SUB_BLOCK], padded, mask)
    out = FeatureExtractor(gpt2)([SUB_BLOCK], ids, pool=False)[SUB_BLOCK]
    expected = unpadded_hidden(hf_gpt2, ids, torch.ones_like(ids), 6)[0]
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ ProbeDataset
def test_probe_dataset_classes_and_tt_split(docs):
    _, enc, labels = docs
    labels = labels.tolist()
    ds = ProbeDataset(enc["input_ids"], enc["attention_mask"], labels)
    assert ds.classes == set(labels) == {0, 1}
    assert len(ds) == 120
    train_set, test_set = ds.tt_split(test_size=0.1)
    assert (len(train_set), len(test_set)) == (108, 12)
    rows = {tuple(r.tolist()) for r in ds.input_ids}
    split = [tuple(r.tolist()) for part in (train_set, test_set) for r in part.input_ids]
    assert len(split) == len(ds) and set(split) == rows
    batch = test_set[0:5]  # what the README feeds get_probe_features
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (5, 32)
    assert batch["labels"].shape == (5,)


# ---------------------------------------------------------------------- README
def test_seed_readme_script(gpt2, docs, capsys):
    """lm_probe's README, with the tiny GPT-2 for gpt2 and the toy texts for IMDB."""
    texts, _, toy_labels = docs
    df = pd.DataFrame(
        {
            "review": texts,
            "sentiment": ["positive" if t else "negative" for t in toy_labels.tolist()],
        }
    )
    df["label"] = df["sentiment"].map({"positive": 1, "negative": 0})
    df = df.sample(len(df), random_state=0)

    reviews, labels = df["review"].tolist(), df["label"].tolist()
    inputs = gpt2.tokenizer(
        reviews, padding="max_length", truncation=True, max_length=32, return_tensors="pt"
    )
    ds = ProbeDataset(inputs["input_ids"], inputs["attention_mask"], labels)
    train_set, test_set = ds.tt_split(test_size=0.1)

    classes = set(labels)
    submodule = "transformer.h.5.mlp.output"
    config = ProbeConfig(submodule, classes)
    runner = ProbeRunner(gpt2, [config])
    runner.fit_probes(train_set, test_set, batch_size=8)
    print(runner.metrics.to_string())

    docs_ = test_set[0:5]
    features = runner.get_probe_features(docs_["input_ids"], docs_["attention_mask"])
    assert features[submodule].shape == (5, 64)
    probe = runner[submodule]
    preds = probe.predict(features[submodule])
    assert preds.shape == (5,) and set(preds.tolist()) <= classes

    configs = [
        ProbeConfig(
            "transformer.h.11.output", classes, test_size=0.5, patience=10, warmup_steps=25
        ),
        ProbeConfig(
            "transformer.h.4.mlp.output", classes, test_size=0.5, patience=10, warmup_steps=25
        ),
        ProbeConfig(
            "transformer.h.7.attn.output", classes, test_size=0.5, patience=10, warmup_steps=25
        ),
    ]
    runner = ProbeRunner(gpt2, configs)
    runner.fit_probes(train_set, test_set, batch_size=8)
    print(runner.metrics.sort_values(["loss", "matthews"], ascending=[True, False]).to_string())

    out = capsys.readouterr().out
    for name in [submodule] + [c.submodule for c in configs]:
        assert name in out
    for metric in METRICS:
        assert metric in out
    assert runner.metrics[METRICS].notna().all().all()


# ------------------------------------------------- edge cases of the metrics
def test_matthews_of_constant_predictions_is_sklearns(fitted, data):
    runner, _ = fitted
    ds = data[0]
    probe = runner[SUB]
    X = runner.get_probe_features(ds.input_ids, ds.attention_mask, [SUB])[SUB]
    y = ds.labels.numpy()
    preds = probe.predict(X)
    majority = np.bincount(preds).argmax()
    rows = preds == majority  # every prediction is `majority`; some are wrong
    assert len(np.unique(y[rows])) == 2
    metrics = probe.compute_metrics(X[rows], y[rows]).to_dict()
    assert metrics["matthews"] == pytest.approx(skm.matthews_corrcoef(y[rows], preds[rows]))


def test_macro_average_over_the_classes_present(gpt2, data):
    """A documented difference: a class absent from both labels and predictions is left out
    of the macro average (scikit-learn's default), where lm_probe (labels=classes) counted it
    as 0 and so lowered precision, recall and F1 for a class that was never tested."""
    ds = data[0]
    runner = ProbeRunner(gpt2, [ProbeConfig(SUB, {0, 1, 2})])
    probe = runner[SUB]
    X = runner.get_probe_features(ds.input_ids, ds.attention_mask, [SUB])[SUB]
    y = ds.labels.numpy()
    probe.take_step(X, y)
    rows = probe.predict(X) != 2
    X, y = X[rows], y[rows]
    assert 2 not in set(y) and 2 not in set(probe.predict(X))
    got = probe.compute_metrics(X, y).to_dict()
    seed = probe_reference(probe, X, y, [0, 1, 2])
    pred = probe.predict(X)
    expected = dict(seed)
    for name, metric in (
        ("precision", skm.precision_score),
        ("recall", skm.recall_score),
        ("f1", skm.f1_score),
    ):  # scikit-learn's default labels: those present in y or the predictions
        expected[name] = metric(y, pred, average="macro", zero_division=0)
    assert_row(got, expected, "present classes")
    assert got["precision"] > seed["precision"]  # the seed's 0 for class 2 is not counted


def test_linear_probe_from_config(gpt2, data):
    ds, _, _, classes = data
    X = FeatureExtractor(gpt2)([SUB], ds.input_ids[:32], ds.attention_mask[:32])[SUB].numpy()
    probe = LinearProbe(ProbeConfig(SUB, classes))
    probe.take_step(X, ds.labels.numpy()[:32])
    assert probe.predict(X).shape == (32,)
