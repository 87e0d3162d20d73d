"""The Hydra application behind ``train.py``: every object of a run is instantiated here.

``train(cfg)`` loads the LM (once per process, so a sweep reuses it), builds the data module,
the probe bank, loggers, callbacks and the Trainer from ``conf/``, runs the shared
``fit_and_test`` loop, writes the run's outputs and returns the metrics table.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from lmprobe.app.schema import check_config
from lmprobe.errors import LmProbeError, RunInterrupted
from lmprobe.probes.base import resolve_probe_kind
from lmprobe.results.baselines import merge_baseline
from lmprobe.results.outputs import (
    accuracy_by_layer,
    save_figure,
    save_probes,
    write_dropped_rows,
    write_metrics,
    write_per_class,
)
from lmprobe.results.rundir import claim_run_dir, rescue_dir
from lmprobe.tracing.models import context_length, local_model_dir, model_frame
from lmprobe.tracing.store import DEFAULT_MAX_GB, FeatureSource, FeatureStore
from lmprobe.tracing.storekeys import model_identity
from lmprobe.training import distributed
from lmprobe.training.engine import baseline_table, fit_and_test, show_lmprobe_log
from lmprobe.training.interrupts import INTERRUPTS, check_stop, signals_held, stop_signals
from lmprobe.training.module import ProbeModule

log = logging.getLogger("lmprobe")

# One LM per process: Hydra's basic launcher runs a sweep's jobs in one process, and
# loading (or converting) a model costs far more than most probe runs.
_loaded_models: dict[str, Any] = {}
# The model's frame (tokenizer, module tree, config; no weights) for runs with a store.
_frames: dict[str, Any] = {}


def build(config: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, with lmprobe's own errors passed on unwrapped."""
    try:
        return instantiate(config, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, LmProbeError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def load_model(model_cfg: DictConfig) -> Any:
    spec = OmegaConf.to_container(model_cfg, resolve=True)
    spec.pop("remote", None)
    key = json.dumps(spec, sort_keys=True, default=str)
    if key not in _loaded_models:
        _loaded_models.clear()  # a different model: free the old one first
        _loaded_models[key] = build(spec)
    return _loaded_models[key]


def model_for_data(model_cfg: DictConfig, source: FeatureSource | None) -> Any:
    """What the run reads its tokenizer, context length and submodule paths from: the LM
    itself without a store, or once loaded in this process; else its frame (no weights:
    ``models.model_frame``), so that a run whose features are all stored never loads it."""
    spec = OmegaConf.to_container(model_cfg, resolve=True)
    spec.pop("remote", None)
    key = json.dumps(spec, sort_keys=True, default=str)
    if source is None or key in _loaded_models:
        return load_model(model_cfg)
    if key not in _frames:
        _frames.clear()
        _frames[key] = model_frame(local_model_dir(spec["name_or_path"]))
    return _frames[key]


def feature_source(cfg: DictConfig) -> FeatureSource | None:
    """The run's feature store (``feature_store`` in the config; false: none)."""
    options = cfg.get("feature_store")
    if options is None or options is False:
        return None
    if distributed.requested(cfg.trainer):
        log.info(
            "feature store: not used with trainer.strategy=ddp (each rank traces its share "
            "of every batch; nothing is read from or written to the store)"
        )
        return None
    if not OmegaConf.is_dict(options):
        raise LmProbeError(
            f"config key feature_store={options!r}: use false (no store) or "
            f"{{dir: DIR, max_gb: SIZE}}"
        )
    store = FeatureStore(options.get("dir"), options.get("max_gb", DEFAULT_MAX_GB))
    spec = OmegaConf.to_container(cfg.model, resolve=True)
    identity = model_identity(spec)
    if identity is None:  # a hub model not downloaded or a packaged one not converted yet
        load_model(cfg.model)
        identity = model_identity(spec)
    if identity is None:
        log.warning(
            "feature store: cannot tell which model %r is without loading it (not a local "
            "directory, a cached hub model or a packaged model); running without the store",
            spec.get("name_or_path"),
        )
        return None
    return FeatureSource(
        store,
        identity,
        lambda: load_model(cfg.model),
        remote=bool(cfg.model.get("remote", False)),
    )


def build_callbacks(cfg: DictConfig) -> list[Callback]:
    """Fresh callbacks of the config (each run of probes needs its own)."""
    return [build(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]


def output_dir(cfg: DictConfig) -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.get("output_dir") or ".")


# An output: its name in the run directory and a function writing it into a directory.
Output = tuple[str, Callable[[Path], Any]]


def keep_outputs(
    directory: Path, outputs: list[Output], trainer: L.Trainer | None = None
) -> tuple[Path | None, list[str]]:
    """Write every output into ``directory``. If any cannot be written there (a full disk,
    a file in the way, no permission), all of them and a checkpoint go to a rescue directory
    too, so a failure while saving never loses trained probes and the rescue is complete.
    Returns the rescue directory (None if none was needed) and 'path (reason)' per failure."""
    problems = []
    for name, write in outputs:
        try:
            write(directory)
        except OSError as err:
            problems.append(f"{directory / name} ({err.strerror or err})")
    if not problems:
        return None, []
    rescue = rescue_dir()
    for _, write in outputs:
        write(rescue)  # a failure here too has nowhere left to go: let it show
    if trainer is not None:
        trainer.save_checkpoint(rescue / "last.ckpt")
    return rescue, problems


def run_outputs(
    table: pd.DataFrame | None,
    module: ProbeModule,
    datamodule: Any,
    partial: bool = False,
    figure: Any = None,
) -> list[Output]:
    """The files of a run, in the order they are written (cheap, small ones first)."""
    names = datamodule.label_names
    outputs: list[Output] = []
    if table is not None:
        outputs.append(("metrics.csv", lambda d: write_metrics(table, d / "metrics.csv", partial)))
    per_class = module.bank.class_tables.get("test")
    if not partial and per_class is not None and not per_class.empty:
        outputs.append(
            ("per_class.csv", lambda d: write_per_class(per_class, d / "per_class.csv", names))
        )
    dropped = getattr(datamodule, "dropped_rows", None)
    if dropped:
        outputs.append(
            ("dropped_rows.csv", lambda d: write_dropped_rows(dropped, d / "dropped_rows.csv"))
        )
    outputs.append(("probes", lambda d: save_probes(module.bank.probes, d / "probes", names)))
    if figure is not None:
        outputs.append(
            ("accuracy_by_layer.png", lambda d: save_figure(figure, d / "accuracy_by_layer.png"))
        )
    return outputs


class RunOutputs(Callback):
    """Writes probes, metrics and a resumable checkpoint if a run is interrupted or fails."""

    def __init__(self, directory: Path, datamodule: Any) -> None:
        self.directory = directory
        self.datamodule = datamodule
        self.kept: Path | None = None  # where the outputs of a stopped run went

    def on_exception(self, trainer: L.Trainer, pl_module: ProbeModule, exception: BaseException):
        self.keep(trainer, pl_module, type(exception).__name__)

    def keep(
        self,
        trainer: L.Trainer,
        pl_module: ProbeModule,
        why: str,
        table: pd.DataFrame | None = None,
        figure: Any = None,
    ) -> Path | None:
        """Write what the run computed and ``last.ckpt``; returns where (None: nothing to
        keep). ``table``: the finished test pass's metrics (else the scores so far, marked
        partial). Once per run: a stop that Lightning handled has written them already."""
        if self.kept is not None:
            return self.kept
        bank = pl_module.bank
        if pl_module.shards is not None:  # each rank holds only its own probes' state
            if trainer.is_global_zero:
                log.warning("run stopped (%s): a multi-process run keeps no partial results", why)
            return None
        if not any(bank.steps.values()):
            return None  # stopped before any probe saw data (e.g. a bad label): nothing to keep
        partial = table is None
        if table is None:
            table = bank.tables.get("test")
        if table is None:  # what the test pass scored before it stopped, if it ran
            table = bank.finish_scoring("test", drop_failed=True)
        outputs = run_outputs(table, pl_module, self.datamodule, partial=partial, figure=figure)
        outputs.append(("last.ckpt", lambda d: trainer.save_checkpoint(d / "last.ckpt")))
        rescue, problems = keep_outputs(self.directory, outputs)
        where = self.kept = rescue or self.directory
        if problems:  # the run's own error follows; this one must not hide it
            log.error("could not write %s; kept in %s instead", "; ".join(problems), rescue)
        log.warning(
            "run stopped (%s): probes trained so far are in %s; resume with ckpt_path=%s",
            why,
            where / "probes",
            where / "last.ckpt",
        )
        return where


def nothing_trained(store: bool = False) -> RunInterrupted:
    """The one-line error of a run stopped before any probe saw data."""
    stored = " (the feature store keeps the splits it finished)" if store else ""
    return RunInterrupted(
        "run interrupted before any probe was trained: nothing to keep or resume; run the "
        f"same command again{stored}"
    )


def interrupted(
    keeper: RunOutputs,
    trainer: L.Trainer,
    module: ProbeModule,
    table: pd.DataFrame | None = None,
    figure: Any = None,
    missing: str = "",
) -> RunInterrupted:
    """The one-line error of a run stopped by Ctrl-C or SIGTERM, after writing what it
    computed (``RunOutputs.keep``; a second Ctrl-C meanwhile is ignored). ``table``: the
    finished test pass's metrics; ``missing``: what a resumed run adds to them."""
    with signals_held(then_raise=False):
        where = keeper.keep(trainer, module, "interrupted", table, figure)
    if where is None:
        if module.shards is not None:
            return RunInterrupted("run interrupted: a multi-process run keeps no partial results")
        return nothing_trained(module.feature_source is not None)
    kept = "metrics.csv (partial), probes and last.ckpt"
    if table is not None:
        kept = f"metrics.csv, probes and last.ckpt{f' (no {missing} yet)' if missing else ''}"
    return RunInterrupted(
        f"run interrupted; {kept} are in {where}; resume with ckpt_path={where / 'last.ckpt'}"
    )


def train(cfg: DictConfig) -> pd.DataFrame:
    """Run one probing job from a composed config; returns the test metrics table."""
    show_lmprobe_log()
    check_config(cfg)
    out = output_dir(cfg)
    if distributed.requested(cfg.trainer):
        multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
        distributed.check_supported(cfg, multirun)
    # Ctrl-C and SIGTERM stop every phase alike: what was computed is written (_train)
    with stop_signals():
        try:
            if distributed.requested(cfg.trainer) and not distributed.is_rank_zero():
                return _train(cfg, out)  # rank 0 holds the run directory and writes
            # locked for this run, and no earlier run's results left to mix with this one's
            with claim_run_dir(out, bool(cfg.get("overwrite", False)), cfg.get("ckpt_path")):
                return _train(cfg, out)
        except INTERRUPTS:  # before _train had a module (while loading the model or data)
            raise nothing_trained() from None


def _train(cfg: DictConfig, out: Path) -> pd.DataFrame:
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    regression = resolve_probe_kind(cfg.probes.get("kind", "sgd_classifier")).task == "regression"
    source = feature_source(cfg)
    lm = model_for_data(cfg.model, source)
    datamodule = build(
        cfg.data,
        tokenizer=lm.tokenizer,
        model_max_length=context_length(lm),
        continuous=regression,
        _convert_="all",
    )
    datamodule.setup("fit")
    classes = None if regression else cfg.probes.get("classes") or sorted(datamodule.label_names)
    words = datamodule.word_level
    if words:  # one row per word: probes read words, whatever probes.pooling says
        log.info(
            "word-level data: one row per word, subwords pooled by probes.word_pooling=%s "
            "(probes.pooling does not apply)",
            cfg.probes.get("word_pooling", "first"),
        )
    probe_configs = build(cfg.probes, model=lm, classes=classes, words=words, _convert_="all")
    module = ProbeModule(
        lm,
        probe_configs,
        seed=cfg.seed,
        remote=bool(cfg.model.get("remote", False)),
        on_nonfinite=cfg.get("on_nonfinite", "error"),
    )
    module.feature_source = source
    loggers = [build(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    log_config(loggers, cfg)
    callbacks = build_callbacks(cfg)
    keeper = RunOutputs(out, datamodule)
    callbacks.append(keeper)
    trainer = build(
        cfg.trainer, module=module, callbacks=callbacks, logger=loggers or False, _convert_="all"
    )

    table = figure = None
    missing, finished = "figure", False
    try:
        table = fit_and_test(trainer, module, datamodule, ckpt_path=cfg.get("ckpt_path"))
        check_stop()
        if not trainer.is_global_zero:  # rank 0 gathered every probe and writes the outputs
            return table
        if cfg.get("baseline"):
            missing = f"{cfg.baseline} baseline"

            def trainer_for(other: ProbeModule) -> L.Trainer:
                return build(
                    cfg.trainer,
                    module=other,
                    callbacks=build_callbacks(cfg),
                    logger=False,
                    _convert_="all",
                )

            other = baseline_table(
                cfg.baseline, module, datamodule, trainer_for, lm=load_model(cfg.model)
            )
            check_stop()
            table = merge_baseline(table, other, cfg.baseline)
            missing = "figure"
        figure = accuracy_by_layer(table, module.configs, headline_metric(table))
        missing = ""
        with signals_held():  # every output is written, then a Ctrl-C or SIGTERM raised
            rescue, problems = keep_outputs(
                out, run_outputs(table, module, datamodule, figure=figure), trainer
            )
            if not problems:  # a finished run leaves no checkpoint (one resumed from is stale)
                (out / "last.ckpt").unlink(missing_ok=True)
                finished = True
        check_stop()
    except INTERRUPTS:
        if finished:
            raise RunInterrupted(
                f"run interrupted after it wrote every output to {out}: nothing to resume"
            ) from None
        raise interrupted(keeper, trainer, module, table, figure, missing) from None
    if problems:
        raise LmProbeError(
            f"could not write {'; '.join(problems)}; the run's probes, metrics.csv and "
            f"last.ckpt are kept in {rescue} instead: copy them to where they belong"
        )
    log_figure(trainer.loggers, figure, out / "accuracy_by_layer.png")
    show_best(table, cfg)
    if cfg.get("intervene"):  # after the run's outputs are safe (README, "Interventions")
        from lmprobe.app.intervention import app_stage

        lm = load_model(cfg.model)
        app_stage(cfg, module, lm, datamodule, table, out, trainer.loggers, keep_outputs)
    return table


def log_config(loggers: list[Logger], cfg: DictConfig) -> None:
    """The composed config (Hydra's own node aside) as each logger's hyperparameters;
    Lightning's loggers write them on rank 0 only."""
    params = {
        key: OmegaConf.to_container(cfg[key], resolve=True)
        if OmegaConf.is_config(cfg[key])
        else cfg[key]
        for key in cfg
        if key != "hydra"
    }
    for logger in loggers:
        logger.log_hyperparams(params)


def log_figure(loggers: list[Logger], figure: Any, png: Path) -> None:
    """The accuracy-by-layer figure (``png``: the copy in the run directory) to each
    logger that keeps images; a W&B run ends here, so a sweep's next job starts its own."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure("accuracy_by_layer", figure)
            logger.experiment.flush()
        elif isinstance(logger, WandbLogger):
            logger.log_image("accuracy_by_layer", [str(png)])
            logger.experiment.finish()
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_artifact(logger.run_id, str(png))


def headline_metric(table: pd.DataFrame, wanted: str = "accuracy") -> str:
    """``wanted`` if the table has it, else r2 (regression probes have no accuracy)."""
    return wanted if wanted in table.columns else "r2"


def show_best(table: pd.DataFrame, cfg: DictConfig, n: int = 10) -> None:
    metric = headline_metric(table, cfg.get("optimized_metric", "accuracy"))
    best = table.sort_values([metric, "loss"], ascending=[False, True]).head(n)
    shown = (
        "accuracy",
        "accuracy_low",
        "accuracy_high",
        "f1",
        "matthews",
        "r2",
        "pearson",
        "loss",
        "p_vs_best",
        "majority_accuracy",
        "selectivity",
        "steps",
    )
    columns = [c for c in shown if c in table.columns]
    print(f"\nBest probes by test {metric} (all {len(table)} in metrics.csv):")
    print(best[columns].to_string(float_format=lambda v: f"{v:.4f}"))
    if "p_vs_best" in table.columns:
        tied = table.index[table["p_vs_best"] >= 0.05].tolist()
        print(
            f"{len(tied)} probe(s) cannot be told apart from the best (paired bootstrap, "
            f"p >= 0.05): {', '.join(map(str, tied))}"
        )


def optimized_metric(table: pd.DataFrame | None, cfg: DictConfig) -> float | None:
    """The value a sweeper optimizes: the best probe's ``cfg.optimized_metric``."""
    if table is None or table.empty:
        return None
    return float(table[headline_metric(table, cfg.get("optimized_metric", "accuracy"))].max())


def run_job(cfg: DictConfig) -> float | None:
    """``train.py``'s body. In a sweep, a failing job records its error and lets the others
    run; Ctrl-C or SIGTERM stops the sweep (``RunInterrupted``)."""
    in_sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        return optimized_metric(train(cfg), cfg)
    except RunInterrupted as err:
        if in_sweep:  # now: Hydra would run the sweep's other jobs after an Exception
            raise SystemExit(f"{type(err).__module__}.{type(err).__name__}: {err}") from None
        raise
    except Exception as err:
        if not in_sweep:
            raise
        out = output_dir(cfg)
        try:
            (out / "error.txt").write_text(
                f"{type(err).__name__}: {err}\n\n{traceback.format_exc()}", encoding="utf-8"
            )
        except OSError:  # the run directory itself is the problem: the log still says it
            log.error("job %s failed: %s", out.name, err)
            return None
        log.error("job %s failed: %s (recorded in %s)", out.name, err, out / "error.txt")
        return None
