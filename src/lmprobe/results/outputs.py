"""What a run leaves behind: metrics.csv, per_class.csv, the probes, and the accuracy-by-layer figure.

Every file is written to a temporary name and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

from lmprobe.probes.base import Probe
from lmprobe.probes.config import ProbeConfig
from lmprobe.probes.files import atomic_write_bytes

LAYER = re.compile(r"\.(\d+)(?=\.)")


def write_metrics(table: pd.DataFrame, path: Path, partial: bool = False) -> Path:
    table = table.copy()
    if partial:
        table["partial"] = True
    atomic_write_bytes(path, table.to_csv().encode())
    return path


def write_per_class(table: pd.DataFrame, path: Path, label_names: dict | None) -> Path:
    """``per_class.csv``: precision, recall, F1 and support of every class of every probe
    (index: probe, class), with the original label of each class."""
    table = table.copy()
    classes = table.index.get_level_values("class")
    table.insert(0, "label", [(label_names or {}).get(c, c) for c in classes])
    atomic_write_bytes(path, table.to_csv().encode())
    return path


def write_dropped_rows(dropped: list[dict[str, Any]], path: Path) -> Path:
    """``dropped_rows.csv``: how many rows of which file were left out, and why (one row per
    file and reason: columns split, file, reason, rows)."""
    table = pd.DataFrame(dropped, columns=["split", "file", "reason", "rows"])
    atomic_write_bytes(path, table.to_csv(index=False).encode())
    return path


def safe_filename(name: str) -> str:
    """A file name for a probe name: readable, short, and distinct for distinct names (a
    hash of the full name follows the readable part, so ``a/b`` and ``a_b`` never share)."""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:100]
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:10]}"


def save_probes(
    probes: dict[str, Probe], directory: Path, label_names: dict[Any, Any] | None
) -> Path:
    """One safetensors file per fitted probe (``Probe.load``, ``lmprobe.probes.base.load_probe``) plus
    ``labels.json`` and ``index.json`` (probe name -> file)."""
    directory.mkdir(parents=True, exist_ok=True)
    index = {}
    for name, probe in probes.items():
        if not probe.is_fitted:
            continue
        filename = f"{safe_filename(name)}.safetensors"
        probe.save(directory / filename)
        index[name] = filename
    labels = {str(k): v for k, v in (label_names or {}).items()}
    atomic_write_bytes(
        directory / "labels.json", json.dumps(labels, indent=2, default=str).encode()
    )
    atomic_write_bytes(directory / "index.json", json.dumps(index, indent=2).encode())
    # a resumed run saves into the directory of its interrupted self: probes that are no
    # longer fitted must not stay beside the new index
    for stale in directory.glob("*.safetensors"):
        if stale.name not in index.values():
            stale.unlink()
    return directory


def layer_index(submodule: str) -> int | None:
    """The block number in a path (``transformer.h.5.output`` -> 5); the input of block 0,
    the embeddings, is layer -1."""
    match = LAYER.search(submodule)
    if match is None:
        return None
    return -1 if submodule.endswith(".input") and int(match.group(1)) == 0 else int(match.group(1))


def accuracy_by_layer(
    table: pd.DataFrame, configs: dict[str, ProbeConfig], metric: str = "accuracy"
):
    """A matplotlib figure: ``metric`` against layer, one line per submodule kind and pooling,
    with its 95% bootstrap interval as a band and the majority-class baseline dotted.

    Built without pyplot: pyplot would keep every run's figure alive until closed (a sweep
    in one process piles them up), and choosing its backend here would change the user's
    own (a notebook's inline plots); a bare ``Figure`` renders PNG with Agg by itself."""
    from matplotlib.figure import Figure

    # label -> (layer, value, low, high, majority, control, random-init) points
    lines: dict[str, list[tuple[int, float, float, float, float, float, float]]] = {}
    nan = float("nan")
    for name, row in table.iterrows():
        config = configs[name]
        layer = layer_index(config.submodule)
        if layer is None:
            continue
        # the embeddings (layer -1) continue the curve of the block outputs
        kind = LAYER.sub(".N", config.submodule, count=1).replace(".N.input", ".N.output")
        lines.setdefault(f"{kind} ({config.pooling})", []).append(
            (
                layer,
                row[metric],
                row.get(f"{metric}_low", nan),
                row.get(f"{metric}_high", nan),
                row.get("majority_accuracy", nan) if metric == "accuracy" else nan,
                row.get("control_accuracy", nan) if metric == "accuracy" else nan,
                row.get(f"random_init_{metric}", nan),
            )
        )
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for label, points in sorted(lines.items()):
        layers, values, low, high, majority, control, random_init = (
            list(v) for v in zip(*sorted(points), strict=True)
        )
        (line,) = ax.plot(layers, values, marker="o", label=label)
        if not all(math.isnan(v) for v in low):  # the 95% bootstrap interval as a band
            ax.fill_between(layers, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        if not all(math.isnan(v) for v in control):  # the control task's accuracy, dashed
            ax.plot(
                layers, control, linestyle="--", color=line.get_color(), label=f"control, {label}"
            )
        if not all(math.isnan(v) for v in random_init):  # the same probes, untrained model
            ax.plot(
                layers,
                random_init,
                linestyle="-.",
                color=line.get_color(),
                alpha=0.7,
                label=f"random init, {label}",
            )
        if not all(math.isnan(v) for v in majority):
            ax.plot(layers, majority, linestyle=":", color="grey", label=f"majority class, {label}")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"test {metric}")
    ax.grid(alpha=0.3)
    if lines:
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def save_figure(fig, path: Path) -> Path:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())
    return path
