"""Activations: pooled features equal a plain HF forward of each text alone (defects 2-4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import ONE_ALPHA

from lmprobe import ProbeConfig, ProbeRunner

SITES = ["transformer.h.2.output", "transformer.h.1.mlp.output", "transformer.h.3.attn.output"]
TEXTS = ["good movie", "the food was really quite awful and sad", "a", "so nice and fine day"]


def reference(hf_model, tokenizer, text: str, site: str) -> torch.Tensor:
    """The site's activation for ``text`` alone (no padding), from a hook on the HF model."""
    module_path = site.rsplit(".", 1)[0]
    captured = {}

    def hook(_module, _args, output):
        captured["value"] = output[0] if isinstance(output, tuple) else output

    handle = hf_model.get_submodule(module_path).register_forward_hook(hook)
    try:
        enc = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            hf_model(**enc)
    finally:
        handle.remove()
    return captured["value"][0]


def pooled_reference(tokens: torch.Tensor, pooling: str) -> torch.Tensor:
    return {
        "mean": lambda t: t.mean(0, keepdim=True),
        "last": lambda t: t[-1:],
        "first": lambda t: t[:1],
        "max": lambda t: t.amax(0, keepdim=True),
        "none": lambda t: t,
    }[pooling](tokens)


@pytest.mark.parametrize("side", ["left", "right"])
def test_features_equal_unpadded_forward_for_every_pooling(gpt2, hf_gpt2, tokenizer, side):
    configs = [
        ProbeConfig(site, [0, 1], pooling=pooling, name=f"{site}/{pooling}")
        for site in SITES
        for pooling in ("mean", "last", "first", "max", "none")
    ]
    runner = ProbeRunner(gpt2, configs)
    tokenizer.padding_side = side
    try:
        enc = tokenizer(TEXTS, padding="max_length", max_length=16, return_tensors="pt")
    finally:
        tokenizer.padding_side = "left"
    features = runner.get_probe_features(enc["input_ids"], enc["attention_mask"], batch_size=3)
    for config in configs:
        expected = torch.cat(
            [
                pooled_reference(reference(hf_gpt2, tokenizer, t, config.submodule), config.pooling)
                for t in TEXTS
            ]
        ).numpy()
        got = features[config.name]
        if config.token_level:  # lm_probe's (documents, tokens, d): keep the real tokens
            assert got.shape[:2] == tuple(enc["input_ids"].shape)
            got = got[enc["attention_mask"].bool().numpy()]
        assert got.dtype == np.float32
        assert got.shape == expected.shape, config.name
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0, err_msg=config.name)


def test_old_readme_feature_shape(gpt2, dataset):
    runner = ProbeRunner(gpt2, [ProbeConfig("transformer.h.5.mlp.output", [0, 1])])
    docs = dataset[0:5]
    features = runner.get_probe_features(docs["input_ids"], docs["attention_mask"])
    assert features["transformer.h.5.mlp.output"].shape == (5, 64)


def count_calls(hf_model, paths):
    calls = dict.fromkeys(paths, 0)
    handles = []
    for path in paths:

        def hook(*_args, path=path):
            calls[path] += 1

        handles.append(hf_model.get_submodule(path).register_forward_pre_hook(hook))
    return calls, handles


def test_trace_stops_after_deepest_live_probe(gpt2, hf_gpt2, dataset):
    """Defect 4: lm_head and blocks past the deepest live probe never run."""
    train_set, test_set = dataset.tt_split(test_size=0.25)
    configs = [
        ProbeConfig("transformer.h.1.output", [0, 1], early_stopping=False, **ONE_ALPHA),
        # stops after 2 updates; block 6 must then no longer run for training batches
        ProbeConfig(
            "transformer.h.6.output", [0, 1], early_stopping=False, max_steps=2, **ONE_ALPHA
        ),
    ]
    runner = ProbeRunner(gpt2, configs)
    calls, handles = count_calls(
        hf_gpt2, ["lm_head", "transformer.h.1", "transformer.h.2", "transformer.h.6"]
    )
    try:
        runner.fit_probes(train_set, test_set, batch_size=10, enable_progress_bar=False)
    finally:
        for handle in handles:
            handle.remove()
    n_train_batches = -(-len(train_set) // 10)
    n_test_batches = -(-len(test_set) // 10)
    assert calls["lm_head"] == 0
    assert calls["transformer.h.6"] == 2 + n_test_batches
    # after h.6's probe stops, training traces end at h.1: h.2 runs only while h.6 is live
    assert calls["transformer.h.2"] == 2 + n_test_batches
    assert calls["transformer.h.1"] == n_train_batches + n_test_batches


def test_reads_in_any_config_order(gpt2, dataset):
    """Defect 1: submodules listed against forward order (the old three-probe example)."""
    train_set, test_set = dataset.tt_split(test_size=0.5)
    configs = [
        ProbeConfig(s, [0, 1], test_size=0.5, patience=10, warmup_steps=25)
        for s in [
            "transformer.h.11.output",
            "transformer.h.4.mlp.output",
            "transformer.h.7.attn.output",
        ]
    ]
    runner = ProbeRunner(gpt2, configs).fit_probes(train_set, test_set, batch_size=8)
    table = runner.metrics.sort_values(["loss", "matthews"], ascending=[True, False])
    assert sorted(table.index) == sorted(c.submodule for c in configs)
    assert table[["loss", "accuracy", "precision", "recall", "f1", "matthews"]].notna().all().all()


def test_bf16_model_gives_float32_features(tokenizer):
    from conftest import build_gpt2
    from nnsight import TransformersModel

    model = build_gpt2(tokenizer, n_layer=2).to(torch.bfloat16)
    lm = TransformersModel(model, tokenizer=tokenizer, task="text-generation")
    runner = ProbeRunner(lm, [ProbeConfig("transformer.h.1.output", [0, 1])])
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    got = runner.get_probe_features(enc["input_ids"], enc["attention_mask"])
    assert got["transformer.h.1.output"].dtype == np.float32
    assert np.isfinite(got["transformer.h.1.output"]).all()


def test_embeddings_probe_reads_the_first_blocks_input(gpt2, hf_gpt2, tokenizer):
    """probes=all_layers adds layer -1: the embeddings, as the HF forward's hidden_states[0]."""
    from lmprobe.app.banks import probe_bank
    from lmprobe.results.outputs import layer_index

    bank = probe_bank(gpt2, [0, 1])
    assert bank[0].name == "embeddings" and layer_index(bank[0].submodule) == -1
    runner = ProbeRunner(gpt2, bank[:1])
    enc = tokenizer(TEXTS, padding="max_length", max_length=16, return_tensors="pt")
    got = runner.get_probe_features(enc["input_ids"], enc["attention_mask"])["embeddings"]
    expected = []
    for text in TEXTS:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hidden = hf_gpt2(input_ids=ids, output_hidden_states=True).hidden_states[0]
        expected.append(hidden[0].mean(0))
    np.testing.assert_allclose(got, torch.stack(expected).numpy(), atol=1e-5)


def test_a_trace_hands_off_only_on_the_probed_paths_and_puts_the_rest_back(gpt2, hf_gpt2):
    """lmprobe.integrations.nnsight: inside lmprobe's trace a module off every probed path runs without
    nnsight's handoffs, the probed module and the siblings along its path keep them, and
    the trace still stops at the deepest site; afterwards a user's own trace reads any
    module again. The features still equal a plain HF forward (the tests above)."""
    from nnsight.intervention.source import STATE

    watched = {
        "transformer.h.2": True,  # the probed module
        "transformer.h.1": True,  # a sibling along its path
        "transformer.h.3": True,  # the trace stops before this one runs at all
        "transformer.ln_f": True,  # a sibling of an ancestor (nor this one)
        "transformer.h.1.mlp": False,  # inside another block
        "transformer.h.2.attn": False,  # inside the probed module
        "transformer.h.2.mlp.c_fc": False,
    }
    runner = ProbeRunner(gpt2, [ProbeConfig("transformer.h.2.output", [0, 1])])
    active: dict[str, list[bool]] = {name: [] for name in watched}
    handles = []
    for name in watched:

        def hook(module, _args, name=name):
            active[name].append(module.__dict__[STATE].active()[0] is not None)

        handles.append(hf_gpt2.get_submodule(name).register_forward_pre_hook(hook))
    enc = gpt2.tokenizer(TEXTS, padding=True, return_tensors="pt")
    try:
        runner.get_probe_features(enc["input_ids"], enc["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()
    calls = len(active["transformer.h.2"])
    assert calls >= 1
    for name, hands_off in watched.items():
        if name not in ("transformer.h.3", "transformer.ln_f"):
            assert active[name] == [hands_off] * calls, name
    # the trace stopped at the deepest site: nothing after it ran (lm_head: see above)
    assert active["transformer.h.3"] == active["transformer.ln_f"] == []
    # the user's own trace of a module lmprobe quietened reads it as before
    with torch.no_grad(), gpt2.trace(enc["input_ids"]):
        inner = gpt2.transformer.h[1].mlp.output.save()
    expected = reference(hf_gpt2, gpt2.tokenizer, TEXTS[1], "transformer.h.1.mlp.output")
    real = enc["attention_mask"][1].bool()
    torch.testing.assert_close(inner[1][real], expected, atol=1e-5, rtol=0)


def test_a_trace_builds_no_cache_where_the_forward_takes_use_cache(gpt2, hf_gpt2):
    """A probing trace passes ``use_cache=False`` (the cache's copies of every layer's keys
    and values buy nothing there), only where the forward takes it; the features stay those
    of the default forward (the tests above)."""
    from lmprobe.tracing.features import FeatureKey, trace_features
    from lmprobe.tracing.models import forward_parameters

    key = FeatureKey("transformer.h.1.output", "mean", None)
    runner = ProbeRunner(gpt2, [ProbeConfig(key.submodule, [0, 1])])
    given: list[dict] = []
    handle = hf_gpt2.register_forward_pre_hook(
        lambda _module, _args, kwargs: given.append(dict(kwargs)), with_kwargs=True
    )
    enc = gpt2.tokenizer(TEXTS, padding=True, return_tensors="pt")
    batch = {**enc, "labels": torch.zeros(len(TEXTS), dtype=torch.long)}
    batch["index"] = torch.arange(len(TEXTS))
    try:
        runner.get_probe_features(enc["input_ids"], enc["attention_mask"])
        for takes in (forward_parameters(gpt2), {"position_ids"}, set()):
            trace_features(gpt2, batch, [key], {key.submodule: 0}, forward_takes=takes)
    finally:
        handle.remove()
    assert {"use_cache", "position_ids"} <= forward_parameters(gpt2)
    assert [k.get("use_cache", "absent") for k in given] == [False, False, "absent", "absent"]


def test_sites_are_pooled_as_the_forward_passes_them_and_the_fallback_reads_the_same(
    gpt2, monkeypatch
):
    """lmprobe.integrations.nnsight: every site (outputs, an attention tuple, a first input) is pooled
    in the forward's own greenlet, not in a worker the forward hands off to; where nnsight
    has no observers the trace's body reads each site instead, and the features are the
    same bit for bit (that they equal a plain HF forward: the tests above)."""
    import greenlet

    from lmprobe.tracing import features
    from lmprobe.tracing.features import FeatureKey, trace_features
    from lmprobe.tracing.models import forward_order

    sites = [*SITES, "transformer.h.1.input"]
    keys = [FeatureKey(site, pooling, None) for site in sites for pooling in ("mean", "last")]
    keys.append(FeatureKey("transformer.h.2.output", "mean", None, control=True))
    order = forward_order(gpt2, sites)
    enc = gpt2.tokenizer(TEXTS, padding=True, return_tensors="pt")
    batch = {**enc, "labels": torch.tensor([0, 1, 0, 1]), "control": torch.tensor([1, 1, 0, 0])}
    batch["index"] = torch.arange(len(TEXTS))
    in_worker: list[bool] = []
    pool = features.pool

    def recording(*args, **kwargs):
        in_worker.append(getattr(greenlet.getcurrent(), "mediator", None) is not None)
        return pool(*args, **kwargs)

    monkeypatch.setattr(features, "pool", recording)
    observed = {k: v.host() for k, v in trace_features(gpt2, batch, keys, order).items()}
    assert in_worker == [False] * (len(keys) - 1)  # the control twin shares its features
    in_worker.clear()
    monkeypatch.setattr(features.SiteObserver, "attach", lambda _self: False)
    read = {k: v.host() for k, v in trace_features(gpt2, batch, keys, order).items()}
    assert in_worker == [True] * (len(keys) - 1)
    for key in keys:
        for got, expected in zip(observed[key], read[key], strict=True):
            np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(observed[keys[-1]].y, [1, 1, 0, 0])


def test_a_site_the_forward_does_not_reach_before_the_deepest_is_named(gpt2):
    from lmprobe.errors import LmProbeError
    from lmprobe.tracing.features import FeatureKey, trace_features

    keys = [FeatureKey(site, "mean", None) for site in ("transformer.h.3.output", SITES[0])]
    enc = gpt2.tokenizer(TEXTS, padding=True, return_tensors="pt")
    batch = {**enc, "labels": torch.zeros(len(TEXTS), dtype=torch.long)}
    batch["index"] = torch.arange(len(TEXTS))
    wrong_order = {"transformer.h.3.output": 0, SITES[0]: 1}  # h.3 runs after h.2
    with pytest.raises(LmProbeError, match=r"'transformer.h.3.output' did not run before"):
        trace_features(gpt2, batch, keys, wrong_order)


def test_an_nnsight_that_does_not_call_the_observer_is_named(gpt2, monkeypatch):
    """Should a later nnsight keep the cache list but stop handing it values, the trace says
    so instead of returning features it never pooled."""
    from lmprobe.errors import LmProbeError
    from lmprobe.integrations.nnsight import SiteObserver
    from lmprobe.tracing.features import FeatureKey, trace_features

    monkeypatch.setattr(SiteObserver, "subscriptions", lambda _self: {})
    key = FeatureKey(SITES[0], "mean", None)
    enc = gpt2.tokenizer(TEXTS, padding=True, return_tensors="pt")
    batch = {**enc, "labels": torch.zeros(len(TEXTS), dtype=torch.long)}
    batch["index"] = torch.arange(len(TEXTS))
    with pytest.raises(LmProbeError, match=r"did not hand lmprobe's observer"):
        trace_features(gpt2, batch, [key], {key.submodule: 0})


def _masked_mean_by_hand(hidden: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """float64 mean of each document's real positions, one document at a time."""
    return torch.stack([hidden[i][real[i]].double().mean(0) for i in range(len(hidden))])


def test_mean_pooling_on_the_cpu_equals_the_mean_of_real_positions_padding_nan_or_not():
    """The CPU float32 fast path (one batched product with the mask) against the mean of
    each document's real positions; a NaN at a padding position (which the product would
    spread) must not reach the features, a NaN at a real position must."""
    from lmprobe.probes.poolings import POOLINGS

    mean = POOLINGS["mean"]
    torch.manual_seed(0)
    hidden = torch.randn(5, 9, 16)
    real = torch.ones(5, 9, dtype=torch.bool)
    real[1, :3] = False  # left padding
    real[2, -4:] = False  # right padding
    real[3, 1:8] = False  # one real token at each end
    expected = _masked_mean_by_hand(hidden, real)
    pooled = mean(hidden, real)
    assert pooled.dtype == torch.float32
    torch.testing.assert_close(pooled.double(), expected, rtol=1e-6, atol=1e-6)

    padded_nan = hidden.clone()
    padded_nan[1, 0] = float("nan")
    padded_nan[2, -1, 3] = float("inf")
    pooled = mean(padded_nan, real)
    assert torch.isfinite(pooled).all()
    torch.testing.assert_close(pooled.double(), expected, rtol=1e-6, atol=1e-6)

    real_nan = hidden.clone()
    real_nan[4, 5, 0] = float("nan")
    pooled = mean(real_nan, real)
    assert torch.isnan(pooled[4, 0]) and torch.isfinite(pooled[:4]).all()

    # bf16 activations take the masked path, summed in float32
    pooled = mean(hidden.bfloat16(), real)
    assert pooled.dtype == torch.float32
    torch.testing.assert_close(
        pooled.double(), _masked_mean_by_hand(hidden.bfloat16().float(), real), rtol=0, atol=1e-5
    )


def test_mean_pooling_follows_its_mask_when_the_mask_changes_between_calls():
    """The CPU shortcut keeps the weights of the last mask it saw: another mask, or the
    same mask modified in place, must give that mask's mean."""
    from lmprobe.probes.poolings import POOLINGS

    mean = POOLINGS["mean"]
    torch.manual_seed(1)
    hidden = torch.randn(3, 6, 8)
    first = torch.ones(3, 6, dtype=torch.bool)
    second = first.clone()
    second[:, 4:] = False
    for real in (first, second, first):
        torch.testing.assert_close(
            mean(hidden, real).double(), _masked_mean_by_hand(hidden, real), rtol=1e-6, atol=1e-6
        )
    first[0, :2] = False  # in place: same tensor, new version
    torch.testing.assert_close(
        mean(hidden, first).double(), _masked_mean_by_hand(hidden, first), rtol=1e-6, atol=1e-6
    )
    with torch.inference_mode():  # Lightning's test steps: tensors without a version
        real = second.clone()
        mean(hidden, real)
        real[1, :3] = False
        pooled = mean(hidden, real)
    torch.testing.assert_close(
        pooled.double(), _masked_mean_by_hand(hidden, real), rtol=1e-6, atol=1e-6
    )


def test_a_trace_in_inference_mode_makes_the_mean_weights_once_per_batch(gpt2, monkeypatch):
    """Lightning's test steps run under torch.inference_mode, whose tensors have no version
    for the mean's weights to be kept by: ``trace_features`` makes its mask outside it, so
    one batch's weights are made once for all its mean-pooled sites, as in training steps,
    and the features are the same as outside inference mode."""
    from lmprobe.probes import poolings
    from lmprobe.tracing.features import FeatureKey, trace_features
    from lmprobe.tracing.models import forward_order

    sites = [f"transformer.h.{i}.output" for i in range(4)]
    keys = [FeatureKey(site, "mean", None) for site in sites]
    order = forward_order(gpt2, sites)
    enc = gpt2.tokenizer(TEXTS, padding=True, return_tensors="pt")
    batch = {**enc, "labels": torch.tensor([0, 1, 0, 1]), "index": torch.arange(len(TEXTS))}
    made: list[torch.Tensor] = []
    weights = poolings._weights

    def counting(real: torch.Tensor) -> torch.Tensor:
        made.append(real)
        return weights(real)

    monkeypatch.setattr(poolings, "_weights", counting)
    plain = {k: v.host() for k, v in trace_features(gpt2, batch, keys, order).items()}
    assert len(made) == 1
    made.clear()
    with torch.inference_mode():
        inference_batch = {k: v.clone() for k, v in batch.items()}
        assert inference_batch["attention_mask"].is_inference()
        tested = {
            k: v.host() for k, v in trace_features(gpt2, inference_batch, keys, order).items()
        }
    assert len(made) == 1
    for key in keys:
        np.testing.assert_array_equal(tested[key].X, plain[key].X)


def test_mean_pooling_without_padding_skips_the_finiteness_check_and_keeps_nan_and_inf(
    monkeypatch,
):
    """A batch with no padding position has no 0 x NaN to guard against: the CPU shortcut
    returns the product unchecked (no sum, no isfinite), and a NaN or inf at a real
    position still reaches its own document's features and no other's."""
    from types import SimpleNamespace

    from lmprobe.probes import poolings

    checks: list[float] = []

    def isfinite(value: float) -> bool:
        checks.append(value)
        return math.isfinite(value)

    monkeypatch.setattr(poolings, "math", SimpleNamespace(isfinite=isfinite))
    mean = poolings.POOLINGS["mean"]
    torch.manual_seed(0)
    hidden = torch.randn(4, 7, 16)
    full = torch.ones(4, 7, dtype=torch.bool)
    pooled = mean(hidden, full)
    torch.testing.assert_close(
        pooled.double(), _masked_mean_by_hand(hidden, full), rtol=1e-6, atol=1e-6
    )
    assert checks == []

    bad = hidden.clone()
    bad[1, 3, 2] = float("nan")
    bad[2, 0, 5] = float("inf")
    pooled = mean(bad, full.clone())  # another mask: its weights are made again
    assert torch.isnan(pooled[1, 2]) and torch.isposinf(pooled[2, 5])
    finite = torch.ones_like(pooled, dtype=torch.bool)
    finite[1, 2] = finite[2, 5] = False
    assert torch.isfinite(pooled[finite]).all()
    assert checks == []

    padded = full.clone()
    padded[0, :2] = False  # a padding position: the product is checked once
    padded_bad = hidden.clone()
    padded_bad[0, 0] = float("nan")
    pooled = mean(padded_bad, padded)
    assert len(checks) == 1 and torch.isfinite(pooled).all()
    torch.testing.assert_close(
        pooled.double(), _masked_mean_by_hand(hidden, padded), rtol=1e-6, atol=1e-6
    )


def test_the_trace_loop_gives_each_batch_its_own_trace_named_by_its_number(gpt2, dataset):
    """``trace_batches``: each batch, in order, with what one ``trace_features`` call on it
    gives (the same rows, bit for bit), named ``label`` with its number in errors."""
    from lmprobe.data.dataset import batches
    from lmprobe.tracing.features import FeatureKey, trace_features
    from lmprobe.tracing.loop import Tracer, gathered, trace_batches

    keys = [
        FeatureKey("transformer.h.1.output", "mean", None),
        FeatureKey("transformer.h.3.output", "last", None),
    ]
    tracer = Tracer(gpt2, [k.submodule for k in keys])
    loader = list(batches(dataset.subset(np.arange(10)), 3, by_length=True))
    traced = list(trace_batches(tracer.of(keys), loader, "part {}", offload_every=2))
    assert len(traced) == len(loader) > 2
    for i, ((batch, features), given) in enumerate(zip(traced, loader, strict=True)):
        assert batch is given
        assert [f.label for f in features.values()] == [f"part {i}"] * len(keys)
        alone = trace_features(gpt2, batch, keys, tracer.order)
        for key in keys:
            np.testing.assert_array_equal(features[key].host().X, alone[key].host().X)
            np.testing.assert_array_equal(features[key].doc, batch["index"].numpy())
    whole = gathered(trace_batches(tracer.of(keys), loader))
    for key in keys:
        parts = [features[key].host() for _, features in traced]
        np.testing.assert_array_equal(whole[key].X, np.concatenate([p.X for p in parts]))
