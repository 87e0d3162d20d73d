"""The Hydra app: compose the real config, shrink it, run it, check every output."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_texts, write_reviews_csv
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from lmprobe import LinearProbe, LmProbeError, ProbeConfig, ProbeRunner
from lmprobe.app.job import build, load_model, train

ROOT = Path(__file__).resolve().parents[1]
METRIC_COLUMNS = ["loss", "accuracy", "precision", "recall", "f1", "matthews"]


@pytest.fixture(scope="session")
def csv_file(tmp_path_factory):
    return write_reviews_csv(tmp_path_factory.mktemp("data") / "reviews.csv", 160)


def compose_cfg(run_dir: Path, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="train",
            return_hydra_config=True,
            overrides=[f"hydra.run.dir={run_dir}", *overrides],
        )
    OmegaConf.set_readonly(cfg.hydra, False)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


def run_sweep(tmp_path: Path, model_dir: Path, data_paths: str, *overrides: str):
    """``python train.py -m`` on the tiny model, as a user would run it."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "-m",
            "probes=gpt2_layers",
            f"model.name_or_path={model_dir}",
            "data=csv",
            f"data.path={data_paths}",
            f"hydra.sweep.dir={sweep}",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            *overrides,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep, result


@pytest.fixture()
def tiny_cfg(tmp_path, tiny_model_dir, csv_file):
    return compose_cfg(
        tmp_path / "run",
        [
            "probes=gpt2_layers",
            f"model.name_or_path={tiny_model_dir}",
            "model.device=cpu",
            "data=csv",
            f"data.path={csv_file}",
            "data.batch_size=8",
            "trainer.max_epochs=2",
            "trainer.enable_progress_bar=false",
        ],
    )


def test_train_writes_every_output(tiny_cfg, tmp_path):
    table = train(tiny_cfg)
    run = tmp_path / "run"
    metrics = pd.read_csv(run / "metrics.csv", index_col="probe")
    assert list(metrics.index) == [f"transformer.h.{i}.output" for i in range(12)]
    assert set(METRIC_COLUMNS + ["steps", "stopped_early"]) <= set(metrics.columns)
    pd.testing.assert_frame_equal(metrics, table, check_dtype=False, check_exact=False)
    index = json.loads((run / "probes" / "index.json").read_text())
    assert json.loads((run / "probes" / "labels.json").read_text()) == {
        "0": "negative",
        "1": "positive",
    }
    probe = LinearProbe.load(run / "probes" / index["transformer.h.3.output"])
    assert probe.predict(np.zeros((2, 64), dtype=np.float32)).shape == (2,)
    assert (run / "accuracy_by_layer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the figure is the run's own: pyplot does not keep it (a sweep would pile them up)
    import matplotlib.pyplot as plt

    from lmprobe.results.outputs import accuracy_by_layer

    figures = plt.get_fignums()
    configs = {name: ProbeConfig(name, [0, 1]) for name in table.index}
    figure = accuracy_by_layer(table, configs)
    assert plt.get_fignums() == figures
    assert len(figure.axes[0].lines) >= 2  # the probes' curve and the majority class

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0}).Reload()
    scalars = events.Tags()["scalars"]
    for metric in METRIC_COLUMNS:
        assert f"test/transformer.h.3.output/{metric}" in scalars
    assert any(tag.startswith("train/") and tag.endswith("heldout_loss") for tag in scalars)
    assert "accuracy_by_layer" in events.Tags()["images"]


def test_train_and_probe_runner_give_the_same_metrics(tiny_cfg):
    table = train(tiny_cfg)
    lm = load_model(tiny_cfg.model)
    datamodule = build(tiny_cfg.data, tokenizer=lm.tokenizer, model_max_length=128, _convert_="all")
    datamodule.setup("fit")
    probes = build(tiny_cfg.probes, model=lm, classes=[0, 1], _convert_="all")
    runner = ProbeRunner(lm, probes, seed=tiny_cfg.seed)
    runner.fit_probes(
        datamodule.train_set,
        datamodule.test_set,
        batch_size=tiny_cfg.data.batch_size,
        max_epochs=tiny_cfg.trainer.max_epochs,
        enable_progress_bar=False,
    )
    pd.testing.assert_frame_equal(runner.metrics, table)


def test_model_is_loaded_once_per_process(tiny_cfg):
    assert load_model(tiny_cfg.model) is load_model(tiny_cfg.model)


def test_all_layers_finds_llama_blocks(tokenizer):
    from nnsight import TransformersModel
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmprobe.app.banks import probe_bank

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    lm = TransformersModel(LlamaForCausalLM(config), tokenizer=tokenizer, task="text-generation")
    bank = probe_bank(lm, [0, 1], pooling=["mean", "last"])
    assert [c.name for c in bank][:4] == [
        "embeddings/mean",  # the first block's input, layer -1
        "embeddings/last",
        "model.layers.0.output/mean",
        "model.layers.0.output/last",
    ]
    assert bank[0].submodule == "model.layers.0.input"
    assert len(bank) == 12
    assert len(probe_bank(lm, [0, 1], embeddings=False)) == 5


def test_cli_sweep_leaves_one_directory_per_job(tmp_path, tiny_model_dir, csv_file):
    sweep, result = run_sweep(tmp_path, tiny_model_dir, str(csv_file), "probes.pooling=mean,last")
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    for job in jobs:
        assert len(pd.read_csv(job / "metrics.csv")) == 12
        assert (job / ".hydra" / "overrides.yaml").exists()
    assert "Best probes by test accuracy" in result.stdout


def test_wrong_override_type_names_the_key(tmp_path, tiny_model_dir, csv_file):
    from hydra.errors import ConfigCompositionException

    from lmprobe import LmProbeError

    # typed schemas (lmprobe.app.schema): Hydra refuses a wrong type while composing, before any
    # model work, naming the key and the value
    for override, key in [
        ("data.batch_size=abc", "data.batch_size"),
        ("probes.patience=soon", "probes.patience"),
        ("trainer.max_epochs=1.5", "trainer.max_epochs"),
        ("probes.early_stopping=maybe", "probes.early_stopping"),
        ("seed=x", "seed"),
    ]:
        with pytest.raises(ConfigCompositionException) as excinfo:
            compose_cfg(tmp_path / "run", ["data=csv", f"data.path={csv_file}", override])
        message = f"{excinfo.value} {excinfo.value.__cause__}"
        assert key in message and override.split("=")[1] in message, message
    cfg = compose_cfg(tmp_path / "run", ["data=csv", f"data.path={csv_file}", "probes.pooling=avg"])
    with pytest.raises(LmProbeError, match=r"probes\.pooling='avg'.*mean, last"):
        train(cfg)
    cfg = compose_cfg(tmp_path / "run", ["data=csv"])
    with pytest.raises(LmProbeError, match=r"data\.path must be set"):
        train(cfg)


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupted_run_keeps_results_and_resumes(tiny_cfg, tmp_path, how):
    from lmprobe.errors import RunInterrupted

    run = tmp_path / "run"
    with open_dict(tiny_cfg):
        tiny_cfg.probes.early_stopping = False
        tiny_cfg.probes.model_kwargs = {"alpha": 0.01}  # no held-out rows
        tiny_cfg.callbacks.interrupt = {"_target_": "conftest.InterruptAt", "batch": 3, "how": how}
    with pytest.raises(RunInterrupted):
        train(tiny_cfg)
    partial = pd.read_csv(run / "metrics.csv", index_col="probe")
    assert partial["partial"].all()
    assert (run / "probes" / "index.json").exists()
    steps = partial["steps"]
    assert (steps == 4).all()  # batches 0..3, buffered rows included
    index = json.loads((run / "probes" / "index.json").read_text())
    saved = LinearProbe.load(run / "probes" / index["transformer.h.0.output"])
    assert saved.n_samples_seen_ == 32
    with open_dict(tiny_cfg):
        del tiny_cfg.callbacks["interrupt"]
        tiny_cfg.ckpt_path = str(run / "last.ckpt")
    table = train(tiny_cfg)
    final = pd.read_csv(run / "metrics.csv", index_col="probe")
    assert "partial" not in final.columns and len(final) == 12
    assert (table["steps"] > steps).all()


@pytest.mark.parametrize("kind", ["sgd_classifier", "sgd_regressor", "logistic"])
def test_same_seed_identical_metrics_csv(tmp_path, tiny_model_dir, csv_file, kind):
    """Byte for byte, the classifiers with control twins (MDL code lengths of both) and the
    regressor (issue 35's step rule)."""
    extra = ["control=true", f"probes.kind={kind}"]
    if kind == "logistic":  # three Cs: the default grid's 5-fold path is most of the time
        extra.append("probes.model_kwargs.C=[0.1,1.0,10.0]")
    if kind == "sgd_regressor":
        texts, _ = make_texts(120, seed=5)
        csv_file = tmp_path / "numeric.csv"
        frame = {"text": texts, "label": [len(t) / 7 for t in texts]}
        pd.DataFrame(frame).to_csv(csv_file, index=False)
        extra = ["probes.kind=sgd_regressor"]
    outputs = []
    for name in ("a", "b"):
        cfg = compose_cfg(
            tmp_path / name,
            [
                "probes=gpt2_layers",
                f"model.name_or_path={tiny_model_dir}",
                "data=csv",
                f"data.path={csv_file}",
                "trainer.max_epochs=2",
                "trainer.enable_progress_bar=false",
                "logger=none",
                *extra,
            ],
        )
        train(cfg)
        outputs.append((tmp_path / name / "metrics.csv").read_bytes())
    assert outputs[0] == outputs[1]
    columns = pd.read_csv(tmp_path / "a" / "metrics.csv", index_col="probe")
    if kind == "sgd_regressor":
        assert np.isfinite(columns["r2"]).all()
    else:
        assert np.isfinite(columns[["compression", "control_compression"]]).all(axis=None)


def test_results_are_written_atomically(tmp_path, monkeypatch):
    from lmprobe.results.outputs import write_metrics

    path = tmp_path / "metrics.csv"
    table = pd.DataFrame({"accuracy": [0.5]}, index=pd.Index(["p"], name="probe"))
    write_metrics(table, path)
    before = path.read_bytes()

    def crash(_fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError):
        write_metrics(table.assign(accuracy=0.9), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


def test_sweep_with_a_failing_job_keeps_the_others(tmp_path, tiny_model_dir, csv_file):
    sweep, _ = run_sweep(
        tmp_path, tiny_model_dir, f"{tmp_path / 'missing.csv'},{csv_file}", "logger=none"
    )
    assert "missing.csv" in (sweep / "0" / "error.txt").read_text()
    assert not (sweep / "0" / "metrics.csv").exists()
    assert len(pd.read_csv(sweep / "1" / "metrics.csv")) == 12


def test_all_layers_is_not_fooled_by_a_longer_expert_list(tokenizer):
    import torch
    from conftest import build_gpt2
    from nnsight import TransformersModel

    from lmprobe.tracing.models import decoder_block_paths

    model = build_gpt2(tokenizer, n_layer=3)
    model.transformer.h[0].experts = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(8))
    lm = TransformersModel(model, tokenizer=tokenizer, task="text-generation")
    assert decoder_block_paths(lm) == ["transformer.h.0", "transformer.h.1", "transformer.h.2"]


@pytest.mark.parametrize("kind", ["sgd_regressor", "mean_difference"])
def test_probe_kind_from_the_command_line(tmp_path, tiny_model_dir, kind):
    """`probes.kind=...` selects the kind for the whole bank; a regressor reads numeric
    labels as they are and reports r2 (also the figure's metric)."""
    texts, labels = make_texts(120, seed=5)
    path = tmp_path / "data.csv"
    target = [
        len(t.split()) + 0.5 if kind == "sgd_regressor" else lab
        for t, lab in zip(texts, labels, strict=True)
    ]
    pd.DataFrame({"text": texts, "label": target}).to_csv(path, index=False)
    cfg = compose_cfg(
        tmp_path / "run",
        [
            "probes=gpt2_layers",
            f"probes.kind={kind}",
            f"model.name_or_path={tiny_model_dir}",
            "model.device=cpu",
            "data=csv",
            f"data.path={path}",
            "data.batch_size=8",
            "trainer.max_epochs=2",
            "trainer.enable_progress_bar=false",
        ],
    )
    table = train(cfg)
    written = pd.read_csv(tmp_path / "run" / "metrics.csv", index_col="probe")
    assert len(written) == 12 and (written["support"] == 24).all()
    if kind == "sgd_regressor":
        assert {"mse", "r2", "pearson", "spearman"} <= set(written.columns)
        assert table["r2"].max() > 0.3  # the word count is decodable from the activations
    else:
        assert written["loss"].isna().all() and table["accuracy"].max() > 0.7
    assert (tmp_path / "run" / "accuracy_by_layer.png").exists()


def test_random_init_baseline_from_the_command_line(tiny_cfg, tmp_path):
    from lmprobe import LmProbeError

    with open_dict(tiny_cfg):
        tiny_cfg.baseline = "random_init"
        tiny_cfg.trainer.max_epochs = 1
    table = train(tiny_cfg)
    written = pd.read_csv(tmp_path / "run" / "metrics.csv", index_col="probe")
    assert written["random_init_accuracy"].notna().all()
    assert (table["accuracy"] != table["random_init_accuracy"]).any()
    with open_dict(tiny_cfg):
        tiny_cfg.baseline = "untrained"
    with pytest.raises(LmProbeError, match="baseline='untrained' is not a baseline"):
        train(tiny_cfg)


def _final_probes(run: Path) -> dict[str, LinearProbe]:
    index = json.loads((run / "probes" / "index.json").read_text())
    return {name: LinearProbe.load(run / "probes" / file) for name, file in index.items()}


# Early stopping that retires every probe on the second group of 4 batches (no later check
# improves by 0.5): inside the first length window, which holds the whole epoch here.
STOPS_IN_THE_WINDOW = ["probes.patience=4", "probes.threshold=0.5", "probes.warmup_steps=2"]


@pytest.mark.parametrize(
    ("where", "extra"),
    [
        ({"batch": 3, "epoch": 0}, []),  # mid-group in the first epoch (features being kept)
        ({"batch": -1, "epoch": 0}, []),  # the last batch of the first epoch
        ({"batch": 5, "epoch": 1}, []),  # mid-group in a later epoch (kept features replayed)
        ({"batch": 1, "stage": "test"}, []),  # after training, during the test pass
        # mid-window, before the bank's first training: the resumed bank must know how many
        # steps its buffered rows count to stop at the same step
        ({"batch": 2, "epoch": 0}, STOPS_IN_THE_WINDOW),
        # mid-window with the model traced in the steps (no feature store): the held-out
        # slice and the first window were traced together before training (lmprobe.tracing.ahead)
        ({"batch": 2, "epoch": 0}, ["feature_store=false"]),
        # the exact multinomial kind (issue 35): its final fit and its code length
        (
            {"batch": 5, "epoch": 1},
            ["probes.kind=logistic", "probes.model_kwargs.C=[0.1,1.0,10.0]"],
        ),
    ],
    ids=[
        "epoch0-mid",
        "epoch0-last",
        "epoch1-mid",
        "test",
        "window-mid-stopping",
        "traced",
        "logistic",
    ],
)
def test_a_resumed_run_learns_exactly_what_an_uninterrupted_run_learns(
    tiny_model_dir, csv_file, tmp_path, monkeypatch, where, extra
):
    """Interrupted (SIGTERM) and resumed from its last.ckpt, a run ends with the probes of
    an uninterrupted run with the same seed: every coefficient equal, the same metrics. The
    model sees the same batches: a run resumed within its first length window traces the
    window with the held-out slice again, as the uninterrupted run did (lmprobe.tracing.ahead),
    since a document's activations can differ in their last bits from batch to batch."""
    from lmprobe.errors import RunInterrupted
    from lmprobe.training.module import ProbeModule

    # each batch traced for training or testing, as the set of its documents' tokens (not
    # those a resumed run's refit traces: the documents it kept no features of)
    traced: list[frozenset] = []
    extract = ProbeModule.extract

    def recording(self, batch, names, label="batch", *args, **kwargs):
        real = batch["attention_mask"].bool()
        if not re.fullmatch(r"batch \d+", label):
            rows = zip(batch["input_ids"], real, strict=True)
            traced.append(frozenset(tuple(ids[m].tolist()) for ids, m in rows))
        return extract(self, batch, names, label, *args, **kwargs)

    monkeypatch.setattr(ProbeModule, "extract", recording)

    overrides = [
        "probes=gpt2_layers",
        f"model.name_or_path={tiny_model_dir}",
        "model.device=cpu",
        "data=csv",
        f"data.path={csv_file}",
        "data.batch_size=8",
        "data.group_size=32",
        "trainer.max_epochs=3",
        "trainer.enable_progress_bar=false",
        "logger=none",
        *extra,
    ]
    train(compose_cfg(tmp_path / "whole", overrides))
    uninterrupted = set(traced)
    cfg = compose_cfg(tmp_path / "resumed", overrides)
    with open_dict(cfg):
        cfg.callbacks.interrupt = {"_target_": "conftest.InterruptAt", "how": "sigterm", **where}
    with pytest.raises(RunInterrupted):
        train(cfg)
    cfg = compose_cfg(tmp_path / "resumed", overrides)
    with open_dict(cfg):
        cfg.ckpt_path = str(tmp_path / "resumed" / "last.ckpt")
    del traced[:]
    train(cfg)
    assert traced and set(traced) <= uninterrupted
    whole, resumed = _final_probes(tmp_path / "whole"), _final_probes(tmp_path / "resumed")
    assert whole.keys() == resumed.keys()
    for name, probe in whole.items():
        other = resumed[name]
        assert other.alpha_ == probe.alpha_ and other.n_samples_seen_ == probe.n_samples_seen_
        np.testing.assert_array_equal(other.classifier_.coef_, probe.classifier_.coef_, name)
    columns = ["accuracy", "loss", "steps", "alpha", "refit", "codelength_bits"]
    a = pd.read_csv(tmp_path / "whole" / "metrics.csv", index_col="probe")[columns]
    b = pd.read_csv(tmp_path / "resumed" / "metrics.csv", index_col="probe")[columns]
    pd.testing.assert_frame_equal(a, b)
    if extra == STOPS_IN_THE_WINDOW:  # every probe stopped inside the window, as one group
        # at a time would
        assert (a["steps"] == 8).all(), a["steps"]


def test_a_checkpoint_of_another_run_is_refused_before_any_work(tiny_cfg, tmp_path, csv_file):
    from lmprobe.errors import RunInterrupted

    with open_dict(tiny_cfg):
        tiny_cfg.callbacks.interrupt = {"_target_": "conftest.InterruptAt", "batch": 2}
    with pytest.raises(RunInterrupted):
        train(tiny_cfg)
    ckpt = str(tmp_path / "run" / "last.ckpt")
    other_data = tmp_path / "other.csv"
    other_data.write_text(csv_file.read_text().replace("movie", "film"))
    for change, what in [
        (("data.path", str(other_data)), "data"),
        (("probes.patience", 7), "probes"),
    ]:
        cfg = tiny_cfg.copy()
        with open_dict(cfg):
            del cfg.callbacks["interrupt"]
            OmegaConf.update(cfg, change[0], change[1])
            cfg.ckpt_path = ckpt
        with pytest.raises(LmProbeError, match=rf"another run \({what} differ") as info:
            train(cfg)
        assert "\n" not in str(info.value)
