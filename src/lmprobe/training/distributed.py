"""Several processes, one run: ``trainer.devices=N trainer.strategy=ddp`` (and ``num_nodes``).

Every rank loads the same global batches (the seeded ``LengthGroupedBatches`` order; no
distributed sampler) and traces a contiguous share of each: rank ``r`` takes rows
``[r*n/W, (r+1)*n/W)``, so the shares in rank order are the batch in its one-process order.
Probes are sharded by site: every probe reading a site (``FeatureKey.submodule``) lives on
the site's owner (sites sorted by name, dealt round-robin). After each trace the pooled rows
of a site go only to its owner (``Shards.route``: one ``all_to_all``, received in rank
order), so each probe sees the global batch in the order one process would, and the rows a
rank sends or receives per step fall as ranks are added. The ranks agree on which probes
still train (``sync_live``) at each point the bank may retire one. After training, each
probe's state goes from its owner to every rank (``sync_bank``); before each table, every
probe's scores go to rank 0 (``sync_scores``), so bootstrap intervals and ``p_vs_best`` see
every probe's predictions on the same rows. Rank 0 alone writes the outputs.

The LM is not a parameter of the module: nothing is wrapped in ``DistributedDataParallel``
(``ProbeDDPStrategy``); there are no gradients to reduce.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy

from lmprobe.errors import LmProbeError, NonFiniteActivationError
from lmprobe.tracing.features import FeatureKey, Features, PendingFeatures, settle

log = logging.getLogger("lmprobe")

STRATEGY = "ddp"


def _devices_count(devices: Any) -> int | None:
    """How many devices a ``trainer.devices`` value names (None: Lightning decides)."""
    if isinstance(devices, bool):
        return None
    if isinstance(devices, int):
        return devices if devices > 0 else None
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str):
        text = devices.strip()
        if text.isdigit():
            return int(text)
        if "," in text:
            return len([d for d in text.split(",") if d.strip()])
    return None


def requested(trainer: Mapping[str, Any]) -> bool:
    """Whether Trainer options ask for several processes (``strategy=ddp``, or ``devices`` or
    ``num_nodes`` above one). Another multi-process strategy is a one-line error."""
    strategy = trainer.get("strategy") or "auto"
    devices = _devices_count(trainer.get("devices", 1))
    nodes = int(trainer.get("num_nodes") or 1)
    several = (devices is not None and devices > 1) or nodes > 1
    if not isinstance(strategy, str):
        return isinstance(strategy, ProbeDDPStrategy)
    if strategy == STRATEGY:
        return True
    if several and strategy != "auto":
        raise LmProbeError(
            f"trainer.strategy={strategy!r} with devices={trainer.get('devices')!r}, "
            f"num_nodes={nodes}: lmprobe runs several processes with trainer.strategy=ddp only"
        )
    return several


def is_rank_zero() -> bool:
    """Whether this process is global rank 0, before the Trainer exists (true in a
    one-process run). torchrun sets RANK; the processes Lightning starts for
    ``strategy=ddp`` get LOCAL_RANK and NODE_RANK (and may inherit a batch job's
    SLURM_PROCID, so that is read last); SLURM's srun sets SLURM_PROCID."""
    if os.environ.get("RANK", "").isdigit():
        return int(os.environ["RANK"]) == 0
    if os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")) not in ("", "0"):
        return False
    if "LOCAL_RANK" in os.environ:
        return local_rank() == 0
    return os.environ.get("SLURM_PROCID", "0") in ("", "0")


def local_rank() -> int:
    text = os.environ.get("LOCAL_RANK", "0")
    return int(text) if text.isdigit() else 0


class ProbeDDPStrategy(DDPStrategy):
    """Lightning's DDP (process launch, process group, rank bookkeeping) without wrapping the
    module in ``DistributedDataParallel``: it has no parameters (the frozen LM is a plain
    attribute) and no gradients; the probes' traffic is ``Shards``'s own."""

    strategy_name = "lmprobe_ddp"

    def configure_ddp(self) -> None:
        pass


def make_strategy(accelerator: str | None) -> ProbeDDPStrategy:
    backend = "gloo" if accelerator == "cpu" else None  # GPUs: Lightning's default (NCCL)
    return ProbeDDPStrategy(process_group_backend=backend)


def check_supported(cfg: Any, multirun: bool) -> None:
    """The Hydra app's options that a multi-process run cannot honour: a one-line error
    before any model work."""
    if multirun:
        raise LmProbeError(
            "trainer.strategy=ddp in a sweep (-m): Lightning restarts the script per rank, "
            "which would rerun the whole sweep; run each job on its own without -m"
        )
    if cfg.get("ckpt_path"):
        raise LmProbeError(
            f"ckpt_path={cfg.ckpt_path!r} with trainer.strategy=ddp: resuming is for one-process "
            f"runs; resume with trainer.devices=1, or start afresh without ckpt_path"
        )
    if cfg.get("baseline"):
        raise LmProbeError(
            f"baseline={cfg.baseline!r} with trainer.strategy=ddp is not supported; run the "
            f"baseline with trainer.devices=1"
        )
    model = cfg.get("model") or {}
    devices = _devices_count(cfg.trainer.get("devices", 1))
    if model.get("device_map") is not None and (devices is None or devices > 1):
        raise LmProbeError(
            f"model.device_map={model.get('device_map')!r} with trainer.devices="
            f"{cfg.trainer.get('devices')!r}: a model spread over a machine's devices runs one "
            f"process per machine; use trainer.devices=1 with trainer.num_nodes=N"
        )
    if model.get("remote"):
        raise LmProbeError("model.remote=true with trainer.strategy=ddp is not supported")


# --------------------------------------------------------------------- collectives
_host_groups: dict[int, Any] = {}


def host_group() -> Any:
    """A gloo process group over the ranks (the default group itself when it is gloo): the
    pooled rows, scores and probes live on the host (the probes are scikit-learn's), so
    they travel between hosts as they are, never through GPU memory for NCCL. Made once
    per process group, by every rank in the same order (``Shards`` is made on every rank)."""
    default = dist.group.WORLD
    if dist.get_backend() == "gloo":
        return default
    key = id(default)
    if key not in _host_groups:
        _host_groups[key] = dist.new_group(backend="gloo")
    return _host_groups[key]


def all_to_all_bytes(payloads: list[bytes], group: Any = None) -> list[memoryview]:
    """``payloads[d]`` goes to rank ``d``; returns what every rank sent here, in rank order."""
    group = group or host_group()
    world = len(payloads)
    sizes = torch.tensor([len(p) for p in payloads], dtype=torch.int64)
    incoming = torch.empty(world, dtype=torch.int64)
    dist.all_to_all_single(incoming, sizes, group=group)
    sent = torch.frombuffer(bytearray().join(payloads) or bytearray(1), dtype=torch.uint8)
    counts = incoming.tolist()
    received = torch.empty(max(sum(counts), 1), dtype=torch.uint8)
    dist.all_to_all_single(
        received[: sum(counts)],
        sent[: int(sizes.sum())],
        output_split_sizes=counts,
        input_split_sizes=sizes.tolist(),
        group=group,
    )
    data = memoryview(received.numpy())
    bounds = np.cumsum([0, *counts])
    return [data[bounds[i] : bounds[i + 1]] for i in range(world)]


def all_gather(value: Any, group: Any = None) -> list[Any]:
    """``value`` of every rank, in rank order."""
    group = group or host_group()
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


class Shards:
    """This rank's place in a multi-process run: its share of each batch, the site each
    probe lives on, and the routing of pooled rows to their owners (module docstring)."""

    def __init__(self, rank: int, world: int, sites: list[str]) -> None:
        self.rank = rank
        self.world = world
        self.group = host_group()
        self.owner = {site: i % world for i, site in enumerate(sorted(set(sites)))}

    def owns(self, key: FeatureKey) -> bool:
        return self.owner[key.submodule] == self.rank

    def bounds(self, n: int) -> tuple[int, int]:
        return self.rank * n // self.world, (self.rank + 1) * n // self.world

    def share(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """This rank's contiguous rows of a global batch, trimmed to their own padding
        (None: no rows, a batch smaller than the world)."""
        from lmprobe.data.dataset import trim_padding

        start, stop = self.bounds(len(batch["index"]))
        if start == stop:
            return None
        return trim_padding({k: v[start:stop] for k, v in batch.items()})

    def route(
        self, features: dict[FeatureKey, PendingFeatures], label: str = ""
    ) -> dict[FeatureKey, PendingFeatures]:
        """Send each key's rows to its site's owner; returns the keys this rank owns, their
        rows of every rank concatenated in rank order (the one-process order). A rank whose
        trace met non-finite activations (``on_nonfinite=error``) makes every rank raise."""
        outgoing: list[dict[str, Any]] = [{"rows": {}, "error": None} for _ in range(self.world)]
        error = None
        settle(list(features.values()))  # one device-to-host copy (one wait) per device
        for key, part in features.items():
            try:
                rows = part.host()
            except NonFiniteActivationError as err:
                error = str(err)
                continue
            outgoing[self.owner[key.submodule]]["rows"][key] = tuple(rows)
        for payload in outgoing:
            payload["error"] = error
        received = [
            pickle.loads(data)
            for data in all_to_all_bytes(
                [pickle.dumps(p, protocol=5) for p in outgoing], self.group
            )
        ]
        errors = [p["error"] for p in received if p["error"]]
        if errors:
            raise NonFiniteActivationError(errors[0])
        parts: dict[FeatureKey, list[Features]] = {}
        for payload in received:  # rank order
            for key, rows in payload["rows"].items():
                parts.setdefault(key, []).append(Features(*rows))
        routed = {}
        for key, rows in parts.items():
            rows = rows[0] if len(rows) == 1 else Features.concat(rows)
            routed[key] = PendingFeatures(
                torch.from_numpy(rows.X), rows.y, rows.doc, key.submodule, label
            )
        return routed

    def agree(self, value: bool) -> bool:
        """True on every rank when ``value`` is true on every rank."""
        flag = torch.tensor([int(value)], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())


# ------------------------------------------------------------------ the bank's state
def owned_names(bank: Any, shards: Shards) -> list[str]:
    return [name for name in bank.configs if shards.owns(bank.key(name))]


def sync_live(bank: Any, shards: Shards) -> None:
    """Every rank's view of which probes still train: each probe's owner decides."""
    mine = sorted(bank.live & set(owned_names(bank, shards)))
    bank.set_live({name for names in all_gather(mine, shards.group) for name in names})


def sync_bank(bank: Any, shards: Shards) -> None:
    """Every probe's training state, from its owner, on every rank (after training: the
    tables and the saved probes need them all)."""
    names = owned_names(bank, shards)
    for rank, theirs in enumerate(all_gather(bank.probe_state(names), shards.group)):
        if rank != shards.rank:  # keep this rank's own objects
            bank.merge_probe_state(theirs)
    sync_live(bank, shards)


def sync_scores(bank: Any, stage: str, shards: Shards) -> None:
    """Every probe's scores of ``stage`` (what its owner scored, every row) on rank 0, which
    computes the table, the bootstrap and ``p_vs_best`` over all probes and writes them
    (the other ranks' tables hold their own probes' scores only, and are not used)."""
    names = set(owned_names(bank, shards))
    mine = bank.scores_of(stage, names)
    everyone: list[Any] | None = [None] * shards.world if shards.rank == 0 else None
    dist.gather_object(mine, everyone, dst=0, group=shards.group)
    for rank, theirs in enumerate(everyone or []):
        if rank != shards.rank:
            bank.add_scores(theirs)
