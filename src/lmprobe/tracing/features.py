"""Turning one batch into probe features: a single nnsight trace, each site pooled on the
model's device where the forward passes it (``lmprobe.integrations.nnsight``), and an early stop after
the deepest site needed."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection, Iterable, Sequence
from typing import Any, NamedTuple

import nnsight
import numpy as np
import torch

from lmprobe.data.dataset import words_present
from lmprobe.errors import LmProbeError, NonFiniteActivationError
from lmprobe.integrations.nnsight import SiteObserver, handoffs_only_at
from lmprobe.probes.config import ProbeConfig
from lmprobe.probes.poolings import POOLINGS, TOKEN_LEVEL, WORD_POOLINGS
from lmprobe.tracing.models import envoy_at, input_device, torch_module

log = logging.getLogger("lmprobe")


class FeatureKey(NamedTuple):
    """What a probe reads. Probes with equal keys share one feature matrix."""

    submodule: str
    pooling: str
    null_label: int | None
    control: bool = False  # rows labelled with the control task's labels (same features)
    word_pooling: str | None = None  # token-level probes: how word-level data pools words

    @classmethod
    def of(cls, config: ProbeConfig, control: bool = False) -> FeatureKey:
        word_pooling = config.word_pooling if config.token_level else None
        return cls(config.submodule, config.pooling, config.null_label, control, word_pooling)


class Features(NamedTuple):
    """Rows of one feature matrix with their labels and the dataset row each came from."""

    X: np.ndarray
    y: np.ndarray
    doc: np.ndarray

    def select_docs(self, docs: np.ndarray) -> Features:
        keep = np.isin(self.doc, docs)
        return Features(self.X[keep], self.y[keep], self.doc[keep])

    @staticmethod
    def concat(parts: list[Features]) -> Features:
        return Features(
            np.concatenate([p.X for p in parts]),
            np.concatenate([p.y for p in parts]),
            np.concatenate([p.doc for p in parts]),
        )


class WordRows(NamedTuple):
    """Which subwords make which word row (host tensors, made by ``word_rows``): subword
    ``positions[i]`` (flat, in (document, token) order) is averaged into row ``row[i]``,
    and ``count[r]`` subwords make row ``r``."""

    positions: torch.Tensor
    row: torch.Tensor
    count: torch.Tensor

    def to(self, device: torch.device) -> WordRows:
        return WordRows(*(t.to(device, non_blocking=True) for t in self))


def word_rows(word_ids: torch.Tensor, keep: torch.Tensor, word_pooling: str) -> WordRows:
    """The ``WordRows`` of the kept words ``keep`` (documents, words), one row each in
    (document, word) order, from the subwords the word pooling chooses."""
    chosen = WORD_POOLINGS[word_pooling](word_ids)
    slot = word_ids.clamp(min=0)
    chosen &= (word_ids >= 0) & keep.gather(1, slot)
    row_of = (keep.flatten().cumsum(0) - 1).view_as(keep)  # row number of each kept word
    positions = chosen.flatten().nonzero().squeeze(1)
    row = row_of.gather(1, slot).flatten().index_select(0, positions)
    count = torch.bincount(row, minlength=int(keep.sum())).to(torch.float32)
    return WordRows(positions, row, count)


def pool_words(hidden: torch.Tensor, words: WordRows) -> torch.Tensor:
    """One vector per word: the float32 mean of its chosen subwords (for first/last the
    one subword itself: 0 + x and x / 1 are exact)."""
    picked = hidden.flatten(0, 1).index_select(0, words.positions).float()
    total = torch.zeros(
        len(words.count), hidden.shape[-1], dtype=torch.float32, device=hidden.device
    )
    total = total.index_add(0, words.row, picked)
    return total / words.count.unsqueeze(1)


def pool(
    hidden: torch.Tensor,
    real: torch.Tensor,
    pooling: str,
    rows: torch.Tensor | WordRows | None = None,
) -> torch.Tensor:
    """Pool ``hidden`` (batch, tokens, d) over the positions where ``real`` is true with a
    registered pooling (``lmprobe.probes.poolings``), then keep the output rows ``rows`` (all when
    ``None``). With ``pooling="none"`` the output rows are the flattened (batch x tokens)
    positions, so ``rows`` must say which to keep; on word-level data ``rows`` is a
    ``WordRows`` and the output has one row per word.

    Rows are picked with ``index_select`` on an index made on the host: a boolean mask would
    make the device report the number of rows back, a wait on every batch.
    """
    # Under a device_map a layer can sit on another GPU than the inputs. (Asked first: in
    # nnsight's trace even a no-op `to` costs a dispatch, and this runs once per site.)
    if real.device != hidden.device:
        real = real.to(hidden.device, non_blocking=True)
    if isinstance(rows, WordRows):
        return pool_words(hidden, rows.to(hidden.device))
    if rows is not None:
        rows = rows.to(hidden.device, non_blocking=True)
    if pooling == TOKEN_LEVEL:
        if rows is None:
            raise ValueError("pooling='none' needs the flat indices of the tokens to keep")
        return hidden.flatten(0, 1).index_select(0, rows).float()
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}")
    pooled = POOLINGS[pooling](hidden, real)
    return pooled if rows is None else pooled.index_select(0, rows)


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only, so a left-padded text sees the same positions
    as the text alone (HF models otherwise number padding positions too)."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def model_inputs(
    batch: dict[str, torch.Tensor], device: torch.device | str, forward_takes: Collection[str]
) -> dict[str, Any]:
    """What a trace gives the model for ``batch``, on ``device``: its ids and attention
    mask, and, where the forward takes them (``forward_takes``, see
    ``models.forward_parameters``), positions of real tokens only and ``use_cache=False``."""
    attention_mask = batch["attention_mask"].to(device, non_blocking=True)
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"].to(device, non_blocking=True)}
    inputs["attention_mask"] = attention_mask
    if "position_ids" in forward_takes:
        inputs["position_ids"] = position_ids_for(attention_mask)
    if "use_cache" in forward_takes:
        # A probing forward never reuses its keys and values; building the cache copies
        # every layer's (3-8% of the forward's time on the CPU benchmark)
        inputs["use_cache"] = False
    return inputs


class PendingFeatures:
    """One batch's rows for one key, whose matrix may still be on the model's device.

    Bringing a GPU result to the host makes the CPU wait until the GPU has caught up; doing
    that once per chunk of batches (``gather``), not once per batch, lets the CPU queue the
    next batches' forward passes meanwhile. Labels and document indices never leave the
    host. ``host()`` copies the matrix once, checks that every row is finite, and keeps the
    result; the device copy is dropped then.
    """

    __slots__ = ("X", "y", "doc", "site", "label", "on_nonfinite", "_host", "_error", "_nbytes")

    def __init__(
        self,
        X: torch.Tensor,
        y: np.ndarray,
        doc: np.ndarray,
        site: str = "",
        label: str = "",
        on_nonfinite: str = "error",
    ) -> None:
        self.X: torch.Tensor | None = X
        self.y = y
        self.doc = doc
        self.site = site
        self.label = label
        self.on_nonfinite = on_nonfinite
        self._host: Features | None = None
        self._error: NonFiniteActivationError | None = None
        self._nbytes = X.numel() * X.element_size() + y.nbytes + doc.nbytes

    def __len__(self) -> int:
        return len(self.y)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def host(self) -> Features:
        """The rows as numpy arrays; raises ``NonFiniteActivationError`` (every time) if a
        row is not finite and the policy is ``error``."""
        settle([self])
        if self._error is not None:
            raise self._error
        return self._host

    def _settle(self, X: np.ndarray) -> None:
        self.X = None  # the device copy has served its purpose
        finite = np.isfinite(X).all(1)
        if finite.all():
            self._host = Features(X, self.y, self.doc)
            return
        bad_docs = np.unique(self.doc[~finite]).tolist()
        if self.on_nonfinite == "error":
            self._error = NonFiniteActivationError(
                f"non-finite activations (NaN/inf) at {self.site} in {self.label} "
                f"(documents {bad_docs[:5]}); use a wider dtype (e.g. model.dtype=float32) "
                f"or set on_nonfinite=skip to drop such rows"
            )
            return
        log.warning(
            "skipping %d rows with non-finite activations at %s in %s (documents %s)",
            int((~finite).sum()),
            self.site,
            self.label,
            bad_docs[:5],
        )
        self._host = Features(X[finite], self.y[finite], self.doc[finite])


def to_host(X: torch.Tensor) -> np.ndarray:
    """The one place a pooled matrix leaves the device (and the CPU waits for the GPU)."""
    return X.cpu().numpy()


def host_blocks(tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """``tensors`` (on one device) on the host with one copy, so one wait for the device:
    flattened end to end (sites differ in width), each given back its shape."""
    if len(tensors) == 1:
        return [to_host(tensors[0])]
    flat = to_host(torch.cat([t.reshape(-1) for t in tensors]))
    bounds = np.cumsum([t.numel() for t in tensors])[:-1]
    return [
        block.reshape(t.shape) for t, block in zip(tensors, np.split(flat, bounds), strict=True)
    ]


def by_device(
    parts: Iterable[PendingFeatures],
) -> dict[tuple[torch.device, torch.dtype], list[PendingFeatures]]:
    """The parts whose matrix is still to be settled (``X`` set), grouped by its device (and
    dtype), so each device is copied from (and waited for) once."""
    grouped: dict[tuple[torch.device, torch.dtype], list[PendingFeatures]] = {}
    for part in parts:
        if part.X is not None:
            grouped.setdefault((part.X.device, part.X.dtype), []).append(part)
    return grouped


def settle(parts: Sequence[PendingFeatures]) -> None:
    """Bring every part still on a device to the host with one copy (one wait) per device
    (``host_blocks``)."""
    for waiting in by_device(parts).values():
        for part, X in zip(waiting, host_blocks([p.X for p in waiting]), strict=True):
            part._settle(X)


def gather(parts: Sequence[PendingFeatures], drop_failed: bool = False) -> Features:
    """The rows of ``parts`` on the host, concatenated. ``drop_failed`` leaves out parts with
    non-finite rows instead of raising (used when saving what an interrupted run has)."""
    settle(parts)
    if drop_failed:  # settled parts know whether they failed the finiteness check
        parts = [p for p in parts if p._error is None]
    hosts = [p.host() for p in parts]
    if len(hosts) == 1:
        return hosts[0]
    if not hosts:
        empty = np.empty((0, 0), dtype=np.float32)
        return Features(empty, np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64))
    return Features.concat(hosts)


def location(envoy: Any, site: str) -> str:
    """nnsight's name for where the forward passes ``site``'s value (``envoy``: its module)."""
    return f"{envoy.path}.{site.rpartition('.')[2]}"


def read(envoy: Any, site: str) -> Any:
    """Inside a trace's body: the value at ``site`` (a module's output or first input)."""
    return envoy.output if site.endswith(".output") else envoy.input


def site_tensor(site: str, value: Any) -> torch.Tensor:
    """The activations in the value a site gives, or a clear error where there are none."""
    if isinstance(value, (tuple, list)):  # e.g. attention returns (hidden, weights)
        value = value[0]
    if not isinstance(value, torch.Tensor):  # e.g. a whole model's ModelOutput
        raise LmProbeError(
            f"submodule {site!r} gives a {type(value).__name__}, not a tensor of "
            f"activations; probe a block or layer inside it instead (e.g. a path "
            f"ending in .h.0.output or .layers.0.output; probes=all_layers finds them)"
        )
    return value


def trace_features(
    lm: Any,
    batch: dict[str, torch.Tensor],
    keys: Iterable[FeatureKey],
    order: dict[str, int],
    *,
    forward_takes: Collection[str] = ("position_ids", "use_cache"),
    remote: bool = False,
    batch_label: str = "",
    on_nonfinite: str = "error",
    all_positions: bool = False,
) -> dict[FeatureKey, PendingFeatures]:
    """Run the LM once on ``batch`` and return the pooled features of every key.

    Token-level keys (``pooling="none"``) keep the real, labelled tokens, one row each; with
    ``all_positions`` every position, padding included, in (document, position) order (what
    lm_probe's feature calls return). On word-level data (``batch["word_ids"]``) they keep
    the real, labelled words instead, one row each, pooled by the key's ``word_pooling``.

    ``forward_takes`` names the forward's parameters (``models.forward_parameters``): it
    gets ``position_ids`` and ``use_cache=False`` where it takes them.

    Nothing here waits for the device: which rows each key keeps is decided on the host
    from the labels and the attention mask, and the pooled matrices stay on the device
    until a consumer asks for them (``PendingFeatures.host`` or ``gather``).
    """
    keys = list(dict.fromkeys(keys))
    device = input_device(lm)
    labels = batch["labels"].cpu()
    control = batch["control"].cpu() if "control" in batch else None
    if control is None and any(key.control for key in keys):
        raise ValueError("control probes need the data's control labels (batch['control'])")
    doc_index = batch["index"].cpu()
    real_host = batch["attention_mask"].cpu().bool()
    inputs = model_inputs(batch, device, forward_takes)
    # Outside inference mode (Lightning's test steps run in it): a tensor made there has a
    # version, so mean pooling makes its weights once per batch, not once per site
    # (lmprobe.probes.poolings).
    with torch.inference_mode(False):
        real = inputs["attention_mask"].bool()
    word_ids = batch["word_ids"].cpu() if "word_ids" in batch else None
    rows: dict[FeatureKey, torch.Tensor | WordRows | None] = {}
    targets: dict[FeatureKey, tuple[np.ndarray, np.ndarray]] = {}
    for key in keys:
        # which rows a key keeps follows the real labels; a control key then reads the
        # control task's labels of the same rows
        given = control if key.control else labels
        if key.pooling == TOKEN_LEVEL and word_ids is not None:
            keep = words_present(word_ids, labels.shape[1])
            if key.null_label is not None and not all_positions:
                keep &= labels != key.null_label
            docs = doc_index.unsqueeze(1).expand_as(keep)
            targets[key] = (given[keep].numpy(), docs[keep].numpy())
            rows[key] = word_rows(word_ids, keep, key.word_pooling or "first")
            continue
        if key.pooling == TOKEN_LEVEL:
            if all_positions:
                keep = torch.ones_like(real_host)
            elif key.null_label is None:
                keep = real_host
            else:
                keep = real_host & (labels != key.null_label)
            index = keep.flatten().nonzero().squeeze(1)
            docs = doc_index.unsqueeze(1).expand_as(keep)
            targets[key] = (given[keep].numpy(), docs[keep].numpy())
        elif key.null_label is not None:
            keep = labels != key.null_label
            index = keep.nonzero().squeeze(1)
            targets[key] = (given[keep].numpy(), doc_index[keep].numpy())
        else:
            index = None
            targets[key] = (given.numpy(), doc_index.numpy())
        rows[key] = None if index is None else index.to(device, non_blocking=True)
    # What each site's value becomes, worked out before the forward, so that its handoffs
    # run as little Python as they can (inside the forward everything costs more:
    # bench/README.md): per site, each key that reads it, with its rows, and the control
    # twin of the same features listed before it, whose pooled matrix it shares.
    by_site: dict[str, list[tuple[FeatureKey, FeatureKey | None]]] = {}
    for key in keys:
        twin = key._replace(control=not key.control)
        shared = twin if any(twin == k for k, _ in by_site.get(key.submodule, ())) else None
        by_site.setdefault(key.submodule, []).append((key, shared))
    sites = sorted(by_site, key=order.__getitem__)
    saved: dict[FeatureKey, torch.Tensor] = {}

    def take(site: str, value: Any) -> None:
        """Pool the value the forward gave at ``site`` for every key that reads it."""
        value = site_tensor(site, value)
        for key, twin in by_site[site]:
            if twin is not None:  # a control twin reads the very same features
                saved[key] = saved[twin]
            else:
                saved[key] = pool(value, real, key.pooling, rows[key])

    paths = {site: site.rpartition(".")[0] for site in sites}  # each site's module
    envoys = {site: envoy_at(lm, path) for site, path in paths.items()}
    deepest = sites[-1]
    trace_kwargs = {"remote": True} if remote else {}
    # Locally, only the probed modules' paths hand off to nnsight (lmprobe.integrations.nnsight);
    # a remote model runs elsewhere, with its own modules.
    quiet = (
        contextlib.nullcontext()
        if remote
        else handoffs_only_at(torch_module(lm), list(paths.values()))
    )
    # Every site is pooled as the forward passes it (lmprobe.integrations.nnsight); the body only
    # waits at the deepest one, to stop there.
    observer = SiteObserver({location(envoys[site], site): site for site in sites}, take)
    with torch.no_grad(), quiet, lm.trace(inputs, **trace_kwargs) as tracer:
        if remote or not observer.attach():  # remotely, or an nnsight with no observers
            for site in sites:
                take(site, read(envoys[site], site))
                for key, _ in by_site[site]:
                    saved[key] = nnsight.save(saved[key])
        else:
            read(envoys[deepest], deepest)
        tracer.stop()  # nothing after the deepest site is needed: skip the rest, lm_head too
    if observer.attached:
        if deepest not in observer.seen:  # the body read it, so the forward passed it
            raise LmProbeError(
                f"nnsight {nnsight.__version__} did not hand lmprobe's observer the values "
                f"the forward passed (lmprobe.integrations.nnsight follows nnsight 0.8.1's cache "
                f"protocol); install nnsight 0.8.1"
            )
        for site in sites:
            if site not in observer.seen:
                raise LmProbeError(
                    f"submodule {site!r} did not run before {deepest!r} in the model's "
                    f"forward; probe modules the forward calls (probes=all_layers finds them)"
                )
    return {
        key: PendingFeatures(saved[key], *targets[key], key.submodule, batch_label, on_nonfinite)
        for key in keys
    }
