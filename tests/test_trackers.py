"""Experiment trackers, offline: W&B in offline mode (its run directory read back) and MLflow
with a local store (read back through its client), beside TensorBoard and CSV in one run."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import write_reviews_csv
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from lmprobe.app.job import train

ROOT = Path(__file__).resolve().parents[1]
PROBE = "transformer.h.3.output"


def wandb_records(path: Path):
    """The records of an offline W&B run file (``run-ID.wandb``): LevelDB's log format (32 KiB
    blocks of pieces with a 7-byte header: checksum, length, type) after a 7-byte file header,
    each record one protobuf ``Record`` (read here as a W&B sync would, without a server)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    block, pos, payload = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            yield record
            payload = b""


def test_every_tracker_gets_config_metrics_and_figure(tmp_path, tiny_model_dir, monkeypatch):
    pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # the default MLflow store: mlflow.db where the run starts
    write_reviews_csv(tmp_path / "reviews.csv", 64)
    run = tmp_path / "run"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="train",
            return_hydra_config=True,
            overrides=[
                f"hydra.run.dir={run}",
                "logger=[many_loggers,wandb,mlflow]",
                "logger.wandb.offline=true",
                "probes=gpt2_layers",
                f"model.name_or_path={tiny_model_dir}",
                "data=csv",
                "data.path=reviews.csv",
                "data.batch_size=8",
                "trainer.max_epochs=1",
                "trainer.enable_progress_bar=false",
                "probes.model_kwargs.alpha=0.01",
            ],
        )
    OmegaConf.set_readonly(cfg.hydra, False)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run)
    HydraConfig.instance().set_config(cfg)
    table = train(cfg)
    accuracy = table.loc[PROBE, "accuracy"]
    assert accuracy == pd.read_csv(run / "metrics.csv", index_col="probe").loc[PROBE, "accuracy"]

    # W&B: the config, the test metrics and the figure in the offline run's own file
    (wandb_run,) = (run / "wandb").glob("offline-run-*")
    config, history = {}, {}
    for record in wandb_records(next(wandb_run.glob("run-*.wandb"))):
        if record.HasField("config"):
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        if record.HasField("history"):
            for item in record.history.item:
                history[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    assert config["probes"]["model_kwargs"] == {"alpha": 0.01}
    assert config["model"]["name_or_path"] == str(tiny_model_dir)
    assert history[f"test/{PROBE}/accuracy"] == pytest.approx(accuracy)
    (image,) = history["accuracy_by_layer/filenames"]
    assert (wandb_run / "files" / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # MLflow: the run in the default store, through MLflow's client
    client = mlflow.MlflowClient(tracking_uri="sqlite:///mlflow.db")
    experiment = client.get_experiment_by_name("probe")  # task_name
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.status == "FINISHED"
    assert found.data.params["probes/model_kwargs/alpha"] == "0.01"
    assert found.data.params["data/path"] == "reviews.csv"
    assert found.data.metrics[f"test/{PROBE}/accuracy"] == pytest.approx(accuracy)
    artifacts = [a.path for a in client.list_artifacts(found.info.run_id)]
    assert artifacts == ["accuracy_by_layer.png"]

    # TensorBoard and CSV still written, with the config too
    hparams = yaml.safe_load((run / "csv" / "hparams.yaml").read_text())
    assert hparams["probes"]["model_kwargs"] == {"alpha": 0.01}
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
