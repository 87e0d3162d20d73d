"""Golden outputs: fixed runs on the tiny model must reproduce the committed results exactly.

The safety net for refactoring (issue 34): each configuration below runs the Hydra app on the
tiny GPT-2 of conftest.py and compares, with tests/golden/<name>/,
- ``metrics.csv`` and ``per_class.csv``: every column the run writes, values read as written
  (the run writes floats with ``repr`` precision, so equal text is equal numbers);
- every probe's fitted arrays (coefficients, intercepts, scaler statistics: the tensors of
  its safetensors file), bit for bit.

Everything is compared exactly: the runs are seeded and single-threaded, on the machine that
wrote the files. A change of a number is a change of behaviour, to be explained or fixed.
(Another CPU, BLAS or torch build may change the last bits of the activations: regenerate the
files there and review the diff before trusting it.)

Regenerate after an intended change of results with
``LMPROBE_REGEN_GOLDEN=1 pytest tests/test_golden.py`` and commit the diff of tests/golden/.
"""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import NEGATIVE, POSITIVE, make_texts, write_reviews_csv
from omegaconf import open_dict
from safetensors.numpy import load_file

GOLDEN = Path(__file__).resolve().parent / "golden"
REGEN = os.environ.get("LMPROBE_REGEN_GOLDEN") == "1"
LAYERS = "probes.submodules=[transformer.h.0.output,transformer.h.5.output,transformer.h.11.output]"


def _common(model_dir: Path) -> list[str]:
    return [
        "probes=gpt2_layers",
        LAYERS,
        f"model.name_or_path={model_dir}",
        "model.device=cpu",
        "data.batch_size=8",
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
        "logger=none",
    ]


def _tagged_conll(path: Path, n: int, seed: int) -> Path:
    tags = {
        **dict.fromkeys(POSITIVE + NEGATIVE, "ADJ"),
        **dict.fromkeys(["the", "a"], "DET"),
        **dict.fromkeys(["movie", "food", "day"], "NOUN"),
        "was": "AUX",
    }
    rng = random.Random(seed)
    words = sorted(tags)
    sentences = [rng.choices(words, k=rng.randint(3, 9)) for _ in range(n)]
    path.write_text(
        "\n\n".join("\n".join(f"{w}\t{tags[w]}" for w in s) for s in sentences) + "\n",
        encoding="utf-8",
    )
    return path


def _data(name: str, tmp_path: Path) -> list[str]:
    if name in ("sequence_control", "resumed"):
        csv = write_reviews_csv(tmp_path / "reviews.csv", 120)
        return ["data=csv", f"data.path={csv}", "control=true", "data.group_size=16"]
    if name == "token_level":  # a tag per token: each word's tag on all its subwords
        train = _tagged_conll(tmp_path / "train.conll", 30, seed=3)
        return ["data=conll", f"data.path={train}", "probes.pooling=none"]
    if name == "word_level":
        train = _tagged_conll(tmp_path / "train.conll", 40, seed=1)
        test = _tagged_conll(tmp_path / "test.conll", 15, seed=2)
        return [
            "data=conll",
            f"data.path={train}",
            f"data.test_path={test}",
            "probes.word_pooling=[first,mean]",
        ]
    if name == "regression":
        texts, _ = make_texts(100, seed=5)
        path = tmp_path / "numeric.csv"
        pd.DataFrame({"text": texts, "label": [len(t) / 7 for t in texts]}).to_csv(
            path, index=False
        )
        return ["data=csv", f"data.path={path}", "probes.kind=sgd_regressor"]
    if name == "logistic":
        csv = write_reviews_csv(tmp_path / "reviews.csv", 100)
        return ["data=csv", f"data.path={csv}", "probes.kind=logistic"]
    raise KeyError(name)


CONFIGS = ["sequence_control", "token_level", "word_level", "regression", "logistic", "resumed"]


def _run(name: str, tmp_path: Path, model_dir: Path) -> Path:
    from test_app import compose_cfg

    from lmprobe.app.job import train
    from lmprobe.errors import RunInterrupted

    overrides = [*_common(model_dir), *_data(name, tmp_path)]
    run = tmp_path / "run"
    if name == "resumed":  # stopped mid-epoch by SIGTERM, then resumed from its last.ckpt
        cfg = compose_cfg(run, overrides)
        with open_dict(cfg):
            cfg.callbacks.interrupt = {
                "_target_": "conftest.InterruptAt",
                "how": "sigterm",
                "batch": 5,
                "epoch": 0,
            }
        with pytest.raises(RunInterrupted):
            train(cfg)
        cfg = compose_cfg(run, overrides)
        with open_dict(cfg):
            cfg.ckpt_path = str(run / "last.ckpt")
        train(cfg)
    else:
        train(compose_cfg(run, overrides))
    return run


def _probe_arrays(run: Path) -> dict[str, np.ndarray]:
    index = json.loads((run / "probes" / "index.json").read_text())
    arrays = {}
    for probe, file in sorted(index.items()):
        for key, value in sorted(load_file(run / "probes" / file).items()):
            arrays[f"{probe}::{key}"] = value
    return arrays


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@pytest.mark.parametrize("name", CONFIGS)
def test_golden_outputs(name, tmp_path, tiny_model_dir):
    run = _run(name, tmp_path, tiny_model_dir)
    golden = GOLDEN / name
    arrays = _probe_arrays(run)
    # a regression run writes no per_class.csv: the golden directory then has none either
    tables = [t for t in ("metrics.csv", "per_class.csv") if (run / t).exists()]
    if REGEN:
        golden.mkdir(parents=True, exist_ok=True)
        for table in tables:
            (golden / table).write_bytes((run / table).read_bytes())
        (golden / "probes.npz").write_bytes(_npz_bytes(arrays))
    assert tables == [t for t in ("metrics.csv", "per_class.csv") if (golden / t).exists()]
    for table in tables:
        want = pd.read_csv(golden / table, keep_default_na=False)
        got = pd.read_csv(run / table, keep_default_na=False)
        pd.testing.assert_frame_equal(got, want, check_exact=True, obj=f"{name}/{table}")
    with np.load(golden / "probes.npz") as want:
        assert sorted(arrays) == sorted(want.files), name
        for key in want.files:
            np.testing.assert_array_equal(arrays[key], want[key], err_msg=f"{name}: {key}")
            assert arrays[key].dtype == want[key].dtype, key
