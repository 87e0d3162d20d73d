"""Interventions at a probed site: does the model *use* what a probe reads there?

After training, on the test documents, the activations at a site are replaced at every token
(a torch hook on the site's module, so every later layer sees the edit) by:

* ``leace``: LEACE (Belrose et al., 2023; EleutherAI's ``concept-erasure``, its streaming
  ``LeaceFitter``) fitted for the labels on the site probe's training features: no linear
  classifier of those features then beats the constant one on the training rows;
* ``probe``: the probe's own direction(s) projected out (orthogonally, about the training mean);
* ``random``: as many random directions projected out (a control of the same rank);
* ``steer``: ``alpha`` times the probe's unit direction (towards the positive class) added,
  ``alpha`` in units of the site's mean activation norm on the test documents; and
  ``steer_random``: a random direction of the same norm.

For each, every probe of the bank scores the edited run's features (accuracy; for steering
the mean predicted probability of the positive class, the second of the sorted classes), and
the LM's next-token loss over the real tokens (bits per token) is measured; both with 95%
bootstrap intervals over documents, and their change from the unedited run with paired
intervals (the same resampled documents). ``intervene`` returns one row per site, condition,
rank, alpha and probe read (``intervention.csv``).

The edited site's own probes read the edit applied to their unedited features: an edit is
affine, so it commutes with every pooling that averages tokens (mean, first, last, token
level, word poolings); for ``max`` pooling their rows are left out (NaN).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from lmprobe.data.dataset import batches
from lmprobe.errors import LmProbeError
from lmprobe.scoring.metrics import column_of
from lmprobe.scoring.uncertainty import DEFAULT_RESAMPLES, LEVEL, resample_counts
from lmprobe.tracing.features import (
    FeatureKey,
    Features,
    gather,
    model_inputs,
    site_tensor,
    trace_features,
)
from lmprobe.tracing.models import forward_order, forward_parameters, input_device, torch_module

log = logging.getLogger("lmprobe")

INTERVENTION_CSV = "intervention.csv"
INTERVENTION_FIGURE = "intervention.png"
DEFAULT_ALPHAS = (-1.0, -0.5, 0.5, 1.0)
# Poolings that average tokens with weights summing to one: an affine edit commutes with them.
AFFINE_POOLINGS = ("mean", "first", "last", "none")


# ------------------------------------------------------------------------------ edits
@dataclass(frozen=True)
class Projection:
    """The affine erasure ``x -> x - ((x - mean) @ right.T) @ left.T`` (``left``: d x r,
    ``right``: r x d); LEACE's form, and an orthogonal projection about ``mean`` when
    ``left == right.T`` has orthonormal columns."""

    left: torch.Tensor
    right: torch.Tensor
    mean: torch.Tensor

    @classmethod
    def from_leace(cls, eraser: Any) -> Projection:
        bias = eraser.bias if eraser.bias is not None else torch.zeros(len(eraser.proj_left))
        keep = eraser.proj_left.norm(dim=0) > 0  # directions LEACE truncated are all zero
        return cls(eraser.proj_left[:, keep], eraser.proj_right[keep], bias)

    @classmethod
    def orthogonal(cls, directions: torch.Tensor, mean: torch.Tensor) -> Projection:
        """Project out the span of ``directions`` (r x d) about ``mean``."""
        q, _ = torch.linalg.qr(directions.double().T)  # d x r, orthonormal columns
        return cls(q, q.T, mean.double())

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        left, right, mean = (
            t.to(x.device, torch.float32) for t in (self.left, self.right, self.mean)
        )
        h = x.float()
        return (h - ((h - mean) @ right.T) @ left.T).to(x.dtype)


@dataclass(frozen=True)
class Shift:
    """``x -> x + vector`` at every token (steering)."""

    vector: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() + self.vector.to(x.device, torch.float32)).to(x.dtype)


@contextlib.contextmanager
def edited(lm: Any, site: str, edit: Any) -> Iterator[None]:
    """While inside: the value at ``site`` (a module's ``.output``, its first element if a
    tuple, or its ``.input``, the first argument: what lmprobe probes there) is replaced by
    ``edit(value)`` in every forward of ``lm``, traced or plain."""
    module = torch_module(lm).get_submodule(site.rpartition(".")[0])
    if site.endswith(".output"):

        def hook(mod: Any, args: Any, output: Any) -> Any:
            if isinstance(output, (tuple, list)):
                return (edit(site_tensor(site, output)), *output[1:])
            return edit(site_tensor(site, output))

        handle = module.register_forward_hook(hook)
    else:

        def pre_hook(mod: Any, args: Any, kwargs: Any) -> Any:
            if args:
                return (edit(args[0]), *args[1:]), kwargs
            first = next(iter(kwargs))
            return args, {**kwargs, first: edit(kwargs[first])}

        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


# ----------------------------------------------------------------- what a pass measures
def token_bits(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor):
    """Per document: the summed next-token loss in bits over real tokens that follow a real
    token, and how many such tokens (both numpy arrays)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = input_ids[:, 1:].to(logp.device)
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1) / math.log(2)
    valid = (mask[:, :-1].bool() & mask[:, 1:].bool()).to(nll.device)
    return (nll * valid).sum(1).cpu().double().numpy(), valid.sum(1).cpu().double().numpy()


def lm_bits(lm: Any, batch: dict[str, torch.Tensor], forward_takes: Sequence[str]):
    """``token_bits`` of one plain forward of ``lm`` on ``batch`` (with whatever edit is on)."""
    inputs = model_inputs(batch, input_device(lm), forward_takes)
    with torch.no_grad():
        logits = torch_module(lm)(**inputs).logits
    return token_bits(logits, batch["input_ids"], batch["attention_mask"])


def probe_directions(probe: Any) -> torch.Tensor:
    """The directions (classes or 1 x d) a linear probe's decision reads, on raw features
    (its scaler's scale folded in)."""
    estimator = getattr(probe, "estimator_", probe)
    coef = getattr(estimator, "coef_", None)
    if coef is None:
        raise LmProbeError(f"a {type(probe).__name__} probe has no linear direction (coef_)")
    coef = np.asarray(coef, dtype=np.float64).reshape(-1, np.shape(coef)[-1])
    scaler = getattr(probe, "scaler_", None)
    if scaler is not None:
        coef = coef / scaler.scale_
    return torch.from_numpy(coef)


def training_rows(module: Any, train_set: Any, name: str, batch_size: int) -> Features:
    """The training features of probe ``name``: those kept from the first epoch when all its
    batches are (the held-out slice aside), else traced again (or read from the store)."""
    key = module.bank.key(name)
    cache = getattr(module, "_train_cache", None) or {}
    parts = [features[key] for _, features in cache.values() if key in features]
    if parts and len(parts) == len(cache):
        return gather(parts)
    return module.extract_dataset(train_set, [name], batch_size)[key]


def fit_leace(rows: Features, classes: np.ndarray, chunk: int = 4096, **options: Any):
    """LEACE for the classes of ``rows`` (one-hot), fitted chunk by chunk (streaming)."""
    try:
        from concept_erasure import LeaceFitter
    except ImportError:
        raise LmProbeError(
            "erasure needs the concept-erasure package: pip install 'lmprobe-lightning[intervene]'"
        ) from None

    fitter = LeaceFitter(rows.X.shape[1], len(classes), dtype=torch.float64, **options)
    for start in range(0, len(rows.y), chunk):
        X = torch.from_numpy(np.asarray(rows.X[start : start + chunk], dtype=np.float64))
        column = torch.from_numpy(column_of(classes, rows.y[start : start + chunk]))
        fitter.update(X, torch.nn.functional.one_hot(column.long(), len(classes)).double())
    return fitter


def random_directions(rank: int, d: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rank, d, generator=generator, dtype=torch.float64)


# ---------------------------------------------------------------------------- the stage
@dataclass
class Condition:
    name: str
    rank: int
    alpha: float
    edit: Any  # None: the unedited run


class Tally:
    """Per-document sums of one condition: each probe's correct rows, rows and P(positive),
    and the LM's bits and tokens."""

    def __init__(self, n_docs: int, names: Sequence[str]) -> None:
        self.correct = {n: np.zeros(n_docs) for n in names}
        self.rows = {n: np.zeros(n_docs) for n in names}
        self.positive = {n: np.zeros(n_docs) for n in names}
        self.bits = np.zeros(n_docs)
        self.tokens = np.zeros(n_docs)

    def add_probe(self, name: str, probe: Any, rows: Features, binary: bool) -> None:
        if not len(rows.y):
            return
        if hasattr(probe, "predict_with_proba"):
            prediction, proba = probe.predict_with_proba(rows.X)
        else:
            prediction, proba = probe.predict(rows.X), probe.predict_proba(rows.X)
        np.add.at(self.correct[name], rows.doc, prediction == rows.y)
        np.add.at(self.rows[name], rows.doc, 1.0)
        if binary:
            np.add.at(self.positive[name], rows.doc, proba[:, 1])

    def add_lm(self, docs: np.ndarray, bits: np.ndarray, tokens: np.ndarray) -> None:
        np.add.at(self.bits, docs, bits)
        np.add.at(self.tokens, docs, tokens)


def check_intervention(module: Any, sites: Sequence[str], steer: bool, alphas: Sequence[float]):
    """One-line errors before any model work."""
    if module.shards is not None:
        raise LmProbeError(
            "intervene runs in one process, not under trainer.strategy=ddp; run it with "
            "trainer.devices=1 (from the run's probes: ckpt_path=...) or intervene=none"
        )
    if module.remote:
        raise LmProbeError("intervene edits the model's forward locally; use a local model")
    for site in sites:
        config = module.configs[site]
        probe = module.bank.probes[site]
        if probe.task != "classification":
            raise LmProbeError(
                f"intervene: probe {site!r} is a {config.kind} probe; erasure and steering "
                f"need a classifier probe (e.g. kind=sgd_classifier)"
            )
        if steer and len(probe.classes_) != 2:
            raise LmProbeError(
                f"intervene: steering needs binary labels; probe {site!r} has "
                f"{len(probe.classes_)} classes ({list(probe.classes_)}); use intervene=erase"
            )
    for alpha in alphas:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise LmProbeError(f"intervene: alpha {alpha!r} must be a number, e.g. 0.5")


def resolve_sites(module: Any, sites: Any, table: pd.DataFrame | None) -> list[str]:
    """Probe names from names or submodules; ``None``: the best probe of ``table``."""
    names = list(module.bank.probe_names)
    if sites is None or sites == []:
        if table is None or table.empty or "accuracy" not in table.columns:
            raise LmProbeError(
                "intervene: no test metrics to choose the best probe from; name the sites "
                "(probe names or submodules), e.g. sites=['transformer.h.5.output']"
            )
        return [str(table.sort_values(["accuracy", "loss"], ascending=[False, True]).index[0])]
    chosen = []
    for site in [sites] if isinstance(sites, str) else list(sites):
        if site in names:
            chosen.append(site)
            continue
        matches = [n for n in names if module.configs[n].submodule == site]
        if len(matches) != 1:
            raise LmProbeError(
                f"intervene: site {site!r} is not one probe's name or submodule; probes: "
                f"{', '.join(names)}"
            )
        chosen.append(matches[0])
    return chosen


def intervene(
    module: Any,
    lm: Any,
    train_set: Any,
    test_set: Any,
    sites: Any = None,
    *,
    erase: bool = True,
    steer: bool = False,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    batch_size: int = 8,
    bootstrap: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    table: pd.DataFrame | None = None,
    leace_options: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Erase (``erase``) and steer (``steer``, binary labels) at each site (a probe's name or
    submodule; ``None``: the best probe of ``table`` by accuracy) of a trained
    ``ProbeModule``'s bank, running ``lm`` (its LM) on ``test_set``; returns the table of
    ``intervention.csv`` (see the module docstring). ``leace_options`` go to ``LeaceFitter``."""
    if not erase and not steer:
        raise LmProbeError("intervene: nothing to do; set erase=True and/or steer=True")
    module.bank.wait()  # (the last training may still run on the bank's worker)
    names = resolve_sites(module, sites, table)
    check_intervention(module, names, steer, alphas)
    probes = {n: module.bank.probes[n] for n in module.bank.probe_names}
    scored = [n for n in probes if probes[n].task == "classification"]
    keys = {n: module.bank.key(n) for n in scored}
    forward_takes = forward_parameters(lm)
    order = forward_order(
        lm,
        sorted({k.submodule for k in keys.values()} | {module.configs[s].submodule for s in names}),
    )
    n_docs = len(test_set)
    context = _Context(lm, module, test_set, batch_size, probes, keys, order, forward_takes)
    frames = []
    for site in names:
        config = module.configs[site]
        where = config.submodule
        conditions = [Condition("none", 0, 0.0, None)]
        if erase:
            rows = training_rows(module, train_set, site, batch_size)
            fitter = fit_leace(rows, probes[site].classes_, **(leace_options or {}))
            leace = Projection.from_leace(fitter.eraser)
            mean = fitter.mean_x
            own = Projection.orthogonal(probe_directions(probes[site]), mean)
            conditions += [Condition("leace", leace.rank, 0.0, leace)]
            conditions += [Condition("probe", own.rank, 0.0, own)]
            d = rows.X.shape[1]
            for rank in sorted({leace.rank, own.rank}):
                rand = Projection.orthogonal(random_directions(rank, d, seed + rank), mean)
                conditions.append(Condition("random", rank, 0.0, rand))
        tallies = {id(c): Tally(n_docs, scored) for c in conditions}
        clean_site: dict[int, dict[FeatureKey, Features]] = {}  # batch -> site's rows
        norm_sum, norm_count = _run(context, where, conditions, tallies, clean_site, steer)
        if steer:
            norm = norm_sum / max(norm_count, 1)
            unit = probe_directions(probes[site])[0]
            unit = unit / unit.norm()
            other = random_directions(1, len(unit), seed + 10_000)[0]
            other = other / other.norm()
            steering = []
            for alpha in alphas:
                steering.append(Condition("steer", 1, float(alpha), Shift(alpha * norm * unit)))
                steering.append(
                    Condition("steer_random", 1, float(alpha), Shift(alpha * norm * other))
                )
            tallies.update({id(c): Tally(n_docs, scored) for c in steering})
            _run(context, where, steering, tallies, clean_site)
            conditions += steering
            log.info("intervene: %s's mean activation norm on the test set: %.4g", site, norm)
        frames.append(
            _summarise(site, module, conditions, tallies, scored, order, bootstrap, seed, table)
        )
    return pd.concat(frames, ignore_index=True)


@dataclass
class _Context:
    """What every pass of one ``intervene`` call shares."""

    lm: Any
    module: Any
    test_set: Any
    batch_size: int
    probes: dict[str, Any]
    keys: dict[str, FeatureKey]  # of each probe scored
    order: dict[str, int]
    forward_takes: Any


def _run(
    context: _Context,
    site: str,
    conditions: list[Condition],
    tallies: dict[int, Tally],
    clean_site: dict[int, dict[FeatureKey, Features]],
    measure_norm: bool = False,
) -> tuple[float, int]:
    """One pass over the test set: each condition's features and LM loss, per batch, into
    its tally. The unedited condition (if among them) keeps the site's rows of each batch in
    ``clean_site``; edited ones read the site's rows from there, edited."""
    lm, module, probes, keys = context.lm, context.module, context.probes, context.keys
    unique_keys = list(dict.fromkeys(keys.values()))
    norm_sum, norm_count = 0.0, 0

    def measure(x: torch.Tensor) -> torch.Tensor:
        nonlocal norm_sum, norm_count
        if not current["counting"]:  # counted in the plain forward only (it always runs)
            return x
        real = current["mask"].to(x.device).bool()
        norm_sum += float(x.float().norm(dim=-1)[real].sum())
        norm_count += int(real.sum())
        return x

    current: dict[str, Any] = {"counting": False}
    for i, batch in enumerate(batches(context.test_set, context.batch_size, by_length=True)):
        docs = batch["index"].numpy()
        current["mask"] = batch["attention_mask"]
        for condition in conditions:
            tally = tallies[id(condition)]
            edit = condition.edit
            if edit is None and measure_norm:
                edit = measure
            hooked = edited(lm, site, edit) if edit is not None else contextlib.nullcontext()
            with hooked:
                pending = trace_features(
                    lm,
                    batch,
                    unique_keys,
                    context.order,
                    forward_takes=context.forward_takes,
                    batch_label=f"test batch {i} ({condition.name})",
                    on_nonfinite=module.on_nonfinite,
                )
                current["counting"] = edit is measure
                bits, tokens = lm_bits(lm, batch, context.forward_takes)
                current["counting"] = False
            features = {key: gather([p]) for key, p in pending.items()}
            if condition.edit is None:
                clean_site[i] = {k: f for k, f in features.items() if k.submodule == site}
            for name, key in keys.items():
                rows = features[key]
                if key.submodule == site and condition.edit is not None:
                    if module.configs[name].pooling not in AFFINE_POOLINGS:
                        continue  # (NaN in the table)
                    rows = clean_site[i][key]
                    X = condition.edit(torch.from_numpy(rows.X)).numpy()
                    rows = Features(X, rows.y, rows.doc)
                binary = len(probes[name].classes_) == 2
                tally.add_probe(name, probes[name], rows, binary)
            tally.add_lm(docs, bits, tokens)
    return norm_sum, norm_count


def _interval(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    low, high = 100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2
    with np.errstate(invalid="ignore"):
        bounds = np.nanpercentile(samples, [low, high], axis=-1)
    return bounds[0], bounds[1]


def _summarise(site, module, conditions, tallies, scored, order, n_resamples, seed, table):
    """The rows of one site: point values, bootstrap intervals over documents, and paired
    intervals of each change from the unedited run."""
    # every ratio statistic: (numerators, denominators) per document, one row each
    stats: list[tuple[str, int, np.ndarray, np.ndarray]] = []
    for c, condition in enumerate(conditions):
        tally = tallies[id(condition)]
        stats.append(("bits", c, tally.bits, tally.tokens))
        for name in scored:
            stats.append((f"accuracy:{name}", c, tally.correct[name], tally.rows[name]))
            stats.append((f"positive:{name}", c, tally.positive[name], tally.rows[name]))
    num = np.stack([s[2] for s in stats])
    den = np.stack([s[3] for s in stats])
    with np.errstate(invalid="ignore", divide="ignore"):
        point = num.sum(1) / den.sum(1)
        draws = resample_counts(num.shape[1], n_resamples, seed) if n_resamples > 0 else []
        samples = [(num @ counts) / (den @ counts) for counts in draws]
    samples = np.concatenate(samples, axis=1) if samples else None
    index = {(s[0], s[1]): i for i, s in enumerate(stats)}
    nan = np.full(len(stats), np.nan)
    low, high = _interval(samples) if samples is not None else (nan, nan)

    def value(stat: str, c: int) -> dict[str, float]:
        i, i0 = index[(stat, c)], index[(stat, 0)]
        change_low = change_high = math.nan
        if samples is not None:
            change_low, change_high = (b[0] for b in _interval((samples[i] - samples[i0])[None]))
        return {
            "": point[i],
            "_low": low[i],
            "_high": high[i],
            "_change": point[i] - point[i0],
            "_change_low": change_low,
            "_change_high": change_high,
        }

    edited_at = order[module.configs[site].submodule]
    majority = (
        table["majority_accuracy"] if table is not None and "majority_accuracy" in table else None
    )
    rows = []
    for c, condition in enumerate(conditions):
        bits = value("bits", c)
        for name in scored:
            at = order[module.configs[name].submodule]
            row = {
                "site": site,
                "condition": condition.name,
                "rank": condition.rank,
                "alpha": condition.alpha,
                "probe": name,
                "probe_is": "site"
                if at == edited_at
                else ("after" if at > edited_at else "before"),
            }
            accuracy = value(f"accuracy:{name}", c)
            row.update({f"accuracy{k}": v for k, v in accuracy.items()})
            if len(module.bank.probes[name].classes_) == 2:
                positive = value(f"positive:{name}", c)
                row.update({f"p_positive{k}": v for k, v in positive.items()})
            if majority is not None and name in majority.index:
                row["majority_accuracy"] = float(majority[name])
            row.update({f"bits_per_token{k}": v for k, v in bits.items()})
            rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------- outputs
def intervention_figure(frame: pd.DataFrame):
    """Accuracy of every probe by position with and without erasure (first site), and the
    steering dose-response (mean P(positive) of the last probe; the LM's bits per token)."""
    from matplotlib.figure import Figure

    site = frame["site"].iloc[0]
    rows = frame[frame["site"] == site]
    steer = rows[rows["condition"].isin(["steer", "steer_random"])]
    panels = 1 + (not steer.empty)
    fig = Figure(figsize=(6 * panels, 4))
    axes = fig.subplots(1, panels, squeeze=False)[0]
    order = list(dict.fromkeys(rows["probe"]))
    x = np.arange(len(order))
    ax = axes[0]
    for (condition, rank), group in rows.groupby(["condition", "rank"], sort=False):
        if condition.startswith("steer"):
            continue
        group = group.set_index("probe").loc[order]
        label = condition if condition == "none" else f"{condition} (rank {rank})"
        (line,) = ax.plot(x, group["accuracy"], marker="o", label=label)
        ax.fill_between(
            x, group["accuracy_low"], group["accuracy_high"], color=line.get_color(), alpha=0.15
        )
    ax.axvline(order.index(site), color="grey", linestyle=":")
    ax.set_xticks(x, order, rotation=90, fontsize=6)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"erasure at {site}")
    ax.legend(fontsize=7)
    if panels == 2:
        ax = axes[1]
        last = order[-1]
        none = rows[(rows["condition"] == "none") & (rows["probe"] == last)]
        for condition, group in steer[steer["probe"] == last].groupby("condition"):
            group = pd.concat([group, none.assign(condition=condition)]).sort_values("alpha")
            (line,) = ax.plot(group["alpha"], group["p_positive"], marker="o", label=condition)
            ax.fill_between(
                group["alpha"],
                group["p_positive_low"],
                group["p_positive_high"],
                color=line.get_color(),
                alpha=0.15,
            )
        ax.set_xlabel("alpha (x mean activation norm)")
        ax.set_ylabel(f"mean P(positive), {last}")
        twin = ax.twinx()
        for condition, group in steer[steer["probe"] == last].groupby("condition"):
            group = pd.concat([group, none]).sort_values("alpha")
            twin.plot(
                group["alpha"],
                group["bits_per_token"],
                linestyle="--",
                label=f"{condition}: LM bits",
            )
        twin.set_ylabel("LM bits per token (dashed)")
        ax.legend(fontsize=7)
        ax.set_title(f"steering at {site}")
    fig.tight_layout()
    return fig


def log_to_tensorboard(frame: pd.DataFrame, loggers: Sequence[Any], figure: Any = None) -> None:
    """On every TensorBoard logger: ``intervention/<site>/<condition>[_rank<r>]/accuracy``
    with the probe's position (its row order) as the step, for the erasures;
    ``.../p_positive/<probe>`` and ``.../bits_per_token`` with ``round(100 * alpha)`` as
    the step; and the figure."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in loggers:
        if not isinstance(logger, TensorBoardLogger):
            continue
        writer = logger.experiment
        for (site, condition, rank, alpha), group in frame.groupby(
            ["site", "condition", "rank", "alpha"], sort=False
        ):
            tag = f"intervention/{site}/{condition}"
            if condition == "random":
                tag += f"_rank{rank}"
            step = round(100 * alpha)
            writer.add_scalar(f"{tag}/bits_per_token", group["bits_per_token"].iloc[0], step)
            for position, (_, row) in enumerate(group.iterrows()):
                if condition.startswith("steer"):
                    writer.add_scalar(f"{tag}/p_positive/{row['probe']}", row["p_positive"], step)
                else:
                    writer.add_scalar(f"{tag}/accuracy", row["accuracy"], position)
        if figure is not None:
            writer.add_figure("intervention", figure)
        writer.flush()


def write_intervention(frame: pd.DataFrame, path: Path) -> Path:
    from lmprobe.probes.files import atomic_write_bytes

    atomic_write_bytes(path, frame.to_csv(index=False, float_format="%.6g").encode())
    return path
