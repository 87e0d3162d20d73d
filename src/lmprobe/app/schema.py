"""Typed schemas of the Hydra config (structured configs in Hydra's ConfigStore).

Each group's YAML files start from its schema (``defaults: [schema, _self_]``), so Hydra
checks every key's type when it composes the config, before any model work:
``data.batch_size=abc`` fails at once, naming the key and the value. Defaults that Python
code also uses (Trainer defaults, chunk size) are read from the code, not repeated here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from lmprobe.errors import LmProbeError
from lmprobe.probes.config import DEFAULT_CHUNK_ROWS, ProbeConfig
from lmprobe.probes.poolings import WORD_POOLINGS, pooling_names
from lmprobe.scoring.uncertainty import DEFAULT_RESAMPLES
from lmprobe.training.engine import TRAINER_DEFAULTS


@dataclass
class ModelSchema:
    _target_: str = "lmprobe.tracing.models.load_language_model"
    name_or_path: str = MISSING
    dtype: str | None = None
    device: str | None = "auto"
    device_map: Any = None
    remote: bool = False


@dataclass
class DataOptionsSchema:
    """The data options of every source: columns, filters, sampling, splits, batches."""

    text_column: str = "text"
    label_column: str = "label"
    # Any, checked in check_config: a typed Optional[Dict] node set to null cannot take a
    # dict from the command line (data.exclude={label: [x]} ends in an OmegaConf
    # AttributeError), and an empty typed dict refuses its new keys in struct mode
    label_map: Any = None  # {original label: label}
    exclude: Any = None  # {column: [values]}
    include: Any = None  # {column: [values]}
    sample_size: int | None = None
    balance: bool = False
    test_size: float = 0.2
    val_size: float = 0.0
    max_length: int | None = None
    batch_size: int = 16
    num_workers: int = 0
    seed: int = 0
    group_size: int | None = DEFAULT_CHUNK_ROWS  # documents per length group (training)
    length_window: int | None = None  # groups sorted together; null: ~50 batches (auto)
    unknown_labels: str = "error"  # labels of val/test the training split lacks: error, drop


@dataclass
class DataSchema(DataOptionsSchema):
    """A data file (``data=csv``, ``tweets``, ``conll``, ``conllu``)."""

    _target_: str = "lmprobe.data.datamodule.ProbeDataModule"
    path: str = MISSING
    encoding: str = "utf-8"
    file_format: str | None = None
    test_path: str | None = None  # the test split as a file (data.path is then training)
    val_path: str | None = None  # the validation split as a file


@dataclass
class HFDataSchema(DataOptionsSchema):
    """A Hugging Face dataset (``data=hf``, ``imdb``; ``lmprobe.data.hf``)."""

    _target_: str = "lmprobe.data.hf.HFDataModule"
    name: str = MISSING  # a hub name, or a directory written by save_to_disk
    split: str = "train"  # the training split
    test_split: str | None = None  # null: test_size of the training split
    val_split: str | None = None
    config_name: str | None = None  # the hub dataset's configuration (subset), if it has several
    revision: str | None = None  # a hub branch, tag or commit


def _probe_default(name: str) -> Any:
    """ProbeConfig's default: the Python API and the app share one set."""
    return ProbeConfig.__dataclass_fields__[name].default


@dataclass
class ProbesSchema:
    _target_: str = "lmprobe.app.banks.probe_bank"
    submodules: Any = "all_layers"  # 'all_layers' or a list of nnsight paths
    site: str = "output"
    embeddings: bool = True  # all_layers: also the first block's input (layer -1)
    control: bool = False  # a control-task twin per probe (selectivity)
    pooling: Any = _probe_default("pooling")  # one pooling or a list of them
    word_pooling: Any = _probe_default("word_pooling")  # word-level data: first, last, mean
    kind: str = _probe_default("kind")
    classes: list[Any] | None = None
    heldout_size: float = _probe_default("test_size")
    test_size: float | None = None  # lm_probe's name for heldout_size
    early_stopping: bool = _probe_default("early_stopping")
    patience: int = _probe_default("patience")
    threshold: float = _probe_default("threshold")
    warmup_steps: int = _probe_default("warmup_steps")
    max_steps: int | None = _probe_default("max_steps")
    null_label: Any = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    refit: bool = _probe_default("refit")  # retrain on every training row at the end
    code_length: bool = _probe_default("code_length")  # online code length (MDL) at the end
    names: list[str] | None = None


@dataclass
class TrainerSchema:
    _target_: str = "lmprobe.training.engine.make_trainer"
    max_epochs: int = TRAINER_DEFAULTS["max_epochs"]
    min_epochs: int | None = None
    accelerator: str = "auto"  # auto: follow the LM's device
    devices: Any = TRAINER_DEFAULTS["devices"]
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str | None = None
    enable_checkpointing: bool = TRAINER_DEFAULTS["enable_checkpointing"]
    enable_model_summary: bool = TRAINER_DEFAULTS["enable_model_summary"]
    enable_progress_bar: bool = TRAINER_DEFAULTS["enable_progress_bar"]
    num_sanity_val_steps: int = TRAINER_DEFAULTS["num_sanity_val_steps"]
    log_every_n_steps: int = 50
    limit_train_batches: float | None = None
    limit_val_batches: float | None = None
    limit_test_batches: float | None = None
    val_check_interval: float | None = None
    check_val_every_n_epoch: int | None = 1
    deterministic: bool | None = None
    max_time: str | None = None
    default_root_dir: str | None = None


@dataclass
class ProbeUpdaterSchema:
    _target_: str = "lmprobe.training.callbacks.ProbeUpdater"
    chunk_rows: int | None = DEFAULT_CHUNK_ROWS
    update_threads: int | None = None  # probes trained at once; null: cores - 1


@dataclass
class ProbeEarlyStoppingSchema:
    _target_: str = "lmprobe.training.callbacks.ProbeEarlyStopping"
    seed: int | None = None


@dataclass
class ProbeMetricsSchema:
    _target_: str = "lmprobe.training.callbacks.ProbeMetrics"
    chunk_rows: int | None = DEFAULT_CHUNK_ROWS
    bootstrap: int = DEFAULT_RESAMPLES  # resamples for the test metrics' 95% intervals


@dataclass
class TensorBoardLoggerSchema:
    _target_: str = "lightning.pytorch.loggers.TensorBoardLogger"
    save_dir: str = "."
    name: str | None = "tensorboard"
    version: str | None = ""
    default_hp_metric: bool = False
    log_graph: bool = False
    prefix: str = ""


@dataclass
class CSVLoggerSchema:
    _target_: str = "lightning.pytorch.loggers.CSVLogger"
    save_dir: str = "."
    name: str | None = "csv"
    version: str | None = ""
    prefix: str = ""
    flush_logs_every_n_steps: int = 100


@dataclass
class InterveneSchema:
    """Interventions after training (``intervene=erase`` / ``steer``; ``lmprobe.intervene``)."""

    erase: bool = True
    steer: bool = False
    sites: list[str] | None = None  # probe names or submodules; null: the best probe
    alphas: list[float] = field(default_factory=lambda: [-1.0, -0.5, 0.5, 1.0])
    batch_size: int | None = None  # null: data.batch_size
    bootstrap: int = DEFAULT_RESAMPLES  # resamples of documents for the 95% intervals


@dataclass
class WandbLoggerSchema:
    _target_: str = "lightning.pytorch.loggers.WandbLogger"
    save_dir: str = "."
    project: str | None = "lmprobe"
    name: str | None = None
    offline: bool = False
    id: str | None = None  # resume this W&B run
    entity: str | None = None
    group: str | None = None
    tags: list[str] | None = None
    notes: str | None = None
    log_model: bool = False
    prefix: str = ""


@dataclass
class MLFlowLoggerSchema:
    _target_: str = "lightning.pytorch.loggers.MLFlowLogger"
    experiment_name: str = "lightning_logs"
    run_name: str | None = None
    tracking_uri: str | None = None
    tags: dict[str, Any] | None = None
    artifact_location: str | None = None
    run_id: str | None = None  # log into this existing run
    log_model: bool = False
    prefix: str = ""


@dataclass
class TrainSchema:
    task_name: str = "probe"
    seed: int = 0
    ckpt_path: str | None = None  # resume an interrupted run from the last.ckpt it wrote
    on_nonfinite: str = "error"  # error: stop at NaN/inf activations; skip: drop those rows
    optimized_metric: str = "accuracy"  # the best probe's test metric returned to a sweeper
    control: bool = False  # control-task twins for every probe (probes.control follows it)
    baseline: str | None = None  # random_init: the same probes on re-initialised weights
    output_dir: str | None = None  # where outputs go when Hydra is not running the job
    overwrite: bool = False  # replace an earlier run's results in the run directory
    model: Any = MISSING
    data: Any = MISSING
    probes: Any = MISSING
    trainer: Any = MISSING
    logger: Any = None
    callbacks: Any = None
    # {dir, max_gb} or false: Any, so that feature_store=false can replace the whole node
    feature_store: Any = None
    intervene: Any = None  # intervene=erase or steer (conf/intervene)


def open_keys(schema: type, *keys: str) -> DictConfig:
    """``schema`` with the dicts at ``keys`` open to new keys: Hydra's struct mode does not
    reach into them, so ``probes.model_kwargs.alpha=0.01`` needs no ``+`` (a free-form
    dict of estimator options has no keys to declare)."""
    node = OmegaConf.structured(schema)
    for key in keys:
        OmegaConf.set_struct(node[key], False)
    return node


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainSchema)
    for group, node in (
        ("model", ModelSchema),
        ("data", DataSchema),
        ("probes", open_keys(ProbesSchema, "model_kwargs")),
        ("trainer", TrainerSchema),
    ):
        store.store(group=group, name="schema", node=node)
    store.store(group="data", name="hf_schema", node=HFDataSchema)
    store.store(group="intervene", name="schema", node=InterveneSchema)
    for name, node in (
        ("probe_updater_schema", ProbeUpdaterSchema),
        ("probe_early_stopping_schema", ProbeEarlyStoppingSchema),
        ("probe_metrics_schema", ProbeMetricsSchema),
    ):
        store.store(group="callbacks", name=name, node=node)
    for name, node in (
        ("tensorboard_schema", TensorBoardLoggerSchema),
        ("csv_schema", CSVLoggerSchema),
        ("wandb_schema", WandbLoggerSchema),
        ("mlflow_schema", MLFlowLoggerSchema),
    ):
        store.store(group="logger", name=name, node=node)


register_configs()

NONFINITE_POLICIES = ("error", "skip")


def check_config(cfg: DictConfig) -> None:
    """What types cannot say, checked before any model work: mandatory keys, and values
    from a fixed set. One line each, naming the key and the value."""
    for top in cfg:
        if top == "hydra":  # Hydra's own node holds run-time values not set yet
            continue
        if OmegaConf.is_missing(cfg, top):
            raise LmProbeError(f"config key {top} must be set, e.g. {top}=...")
        node = cfg[top]
        if OmegaConf.is_config(node):
            for key in sorted(OmegaConf.missing_keys(node)):
                raise LmProbeError(f"config key {top}.{key} must be set, e.g. {top}.{key}=...")
    pooling = OmegaConf.select(cfg, "probes.pooling")
    for value in [pooling] if isinstance(pooling, str) else list(pooling or []):
        if value not in pooling_names():
            raise LmProbeError(
                f"config key probes.pooling={value!r} is not a pooling: use one of "
                f"{', '.join(pooling_names())}"
            )
    from lmprobe.probes.config import check_listed_once

    for key in ("submodules", "pooling", "word_pooling", "names"):
        value = OmegaConf.select(cfg, f"probes.{key}")
        check_listed_once(f"probes.{key}", value if OmegaConf.is_list(value) else None)
    word_pooling = OmegaConf.select(cfg, "probes.word_pooling")
    for value in [word_pooling] if isinstance(word_pooling, str) else list(word_pooling or []):
        if value not in WORD_POOLINGS:
            raise LmProbeError(
                f"config key probes.word_pooling={value!r} is not a word pooling: use one of "
                f"{', '.join(WORD_POOLINGS)}"
            )
    data = cfg.get("data")
    if OmegaConf.is_config(data):
        from lmprobe.data.datamodule import check_data_options

        options = OmegaConf.to_container(data, resolve=True)
        check_data_options(
            prefix="config key data.",
            presplit=(options.get("test_path") or options.get("test_split")) is not None,
            **{k: v for k, v in options.items() if not k.startswith("_") and k != "seed"},
        )
        if "name" in options and "path" not in options:  # a Hugging Face dataset
            from lmprobe.data.hf import check_hf_options

            check_hf_options(options["name"])
        from lmprobe.data.readers import resolve_data_path

        for key in ("path", "test_path", "val_path"):  # a missing file, before the model loads
            value = options.get(key)
            if value is None or str(value).startswith("hf://"):
                continue
            if not Path(resolve_data_path(value)).is_file():
                raise LmProbeError(
                    f"config key data.{key}={value!r} names no readable file; check the path "
                    f"(relative paths start from the directory train.py is run in)"
                )
    kind = OmegaConf.select(cfg, "probes.kind")
    if kind is not None:
        from lmprobe.probes.base import resolve_probe_kind

        task = resolve_probe_kind(kind).task
        control = OmegaConf.select(cfg, "probes.control", default=None)
        if task != "classification" and (control or (control is None and cfg.get("control"))):
            raise LmProbeError(
                f"config key probes.kind={kind!r} with control=true: control tasks are for "
                f"classifier probes; set control=false or probes.kind=sgd_classifier"
            )
    from lmprobe.results.baselines import check_baseline

    check_baseline(cfg.get("baseline"))
    if OmegaConf.select(cfg, "trainer.max_epochs") == 0:  # fit_and_test says it too, later
        raise LmProbeError("config key trainer.max_epochs=0 trains no probe; use max_epochs >= 1")
    callbacks = cfg.get("callbacks")
    for name in callbacks or {}:
        node = callbacks[name]
        value = node.get("chunk_rows") if OmegaConf.is_dict(node) else None
        if value is not None and value < 1:
            raise LmProbeError(
                f"config key callbacks.{name}.chunk_rows={value!r}: use a whole number >= 1 "
                f"(rows per scikit-learn call) or null"
            )
        if OmegaConf.is_dict(node) and "update_threads" in node:
            from lmprobe.bank.bank import check_update_threads

            try:
                check_update_threads(node.get("update_threads"))
            except LmProbeError as error:
                raise LmProbeError(f"config key callbacks.{name}.{error}") from None
    store = cfg.get("feature_store")
    if store is not None and store is not False:
        if not OmegaConf.is_dict(store):
            raise LmProbeError(
                f"config key feature_store={store!r}: use false (no store) or "
                f"{{dir: DIR, max_gb: SIZE}}"
            )
        for key in store:
            if key not in ("dir", "max_gb"):
                raise LmProbeError(
                    f"config key feature_store.{key} is not an option of the feature store: "
                    f"use feature_store.dir or feature_store.max_gb"
                )
        max_gb = store.get("max_gb")
        if max_gb is not None and (
            isinstance(max_gb, bool) or not isinstance(max_gb, (int, float)) or max_gb <= 0
        ):
            raise LmProbeError(
                f"config key feature_store.max_gb={max_gb!r}: use a size in GB > 0 "
                f"(or null: no cap)"
            )
    from lmprobe.app.intervention import check_config as check_intervene

    check_intervene(cfg)
    if cfg.get("on_nonfinite", "error") not in NONFINITE_POLICIES:
        raise LmProbeError(
            f"config key on_nonfinite={cfg.on_nonfinite!r}: use one of "
            f"{', '.join(NONFINITE_POLICIES)}"
        )
