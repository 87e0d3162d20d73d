"""What the feature store saves: whole runs of the Hydra app (``lmprobe.app.job.train``) on the
``cpu`` benchmark model (tiny random GPT-2, 12 layers, width 256, 12 probes) and ~1,000 short
texts, in one process, with the model and its frame dropped before each job, so every
timed case loads what a fresh process would (the model on a miss, its frame on a hit).

Cases, each from an empty store unless said:
  one job      a single run (traces every split, fills the store)
  sweep x4     four jobs over probe options (alpha grid, kinds) on the same model and data,
               one after the other sharing the store: the first traces, the others hit
  repeated     the one-job run again, its store full (target <= 0.2x one job)

Run: OMP_NUM_THREADS=1 python bench/bench_store.py [--repeats 3] [--out bench/store.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
from bench_overhead import gpt2  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

import lmprobe.app.job as app  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lmprobe").setLevel(logging.ERROR)

VOCAB = 2000
# the sweep: four jobs over probe options (what a sweep over probes varies)
SWEEP = [
    [],
    ["+probes.model_kwargs={alpha: 0.001}"],
    ["+probes.model_kwargs={alpha: 0.1}"],
    ["probes.kind=mean_difference"],
]


def word_tokenizer(vocab: int):
    """One token per made-up word ``w<i>`` (split on whitespace)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, **{f"w{i}": i for i in range(1, vocab)}}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<pad>")


def make_inputs(root: Path, n_docs: int, width: int = 256, seed: int = 0) -> tuple[Path, Path]:
    """The benchmark model saved as a local directory, and a CSV of 4-48 random words per
    text, labelled by whether it holds a word of a small signal set (a learnable task, so
    probes train as long as on real data)."""
    model_dir = root / "model"
    gpt2(12, width, width // 64, 64, VOCAB, "cpu", torch.float32).save_pretrained(model_dir)
    word_tokenizer(VOCAB).save_pretrained(model_dir)
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n_docs):
        words = rng.integers(20, VOCAB, rng.integers(4, 49))
        if i % 2:
            words[rng.integers(len(words))] = rng.integers(1, 20)  # a signal word
        texts.append(" ".join(f"w{w}" for w in words))
        labels.append(i % 2)
    path = root / "texts.csv"
    pd.DataFrame({"text": texts, "label": labels}).to_csv(path, index=False)
    return model_dir, path


def job(run_dir: Path, store: Path, model_dir: Path, data: Path, *overrides: str) -> float:
    """One run of the app, timed, as a fresh process would run it (no model in memory)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                "probes=gpt2_layers",
                f"model.name_or_path={model_dir}",
                "model.device=cpu",
                "data=csv",
                f"data.path={data}",
                "data.batch_size=8",
                "trainer.enable_progress_bar=false",
                "logger=none",
                f"feature_store.dir={store}",
                f"output_dir={run_dir}",
                *overrides,
            ],
        )
    app._loaded_models.clear()
    app._frames.clear()
    start = time.perf_counter()
    app.train(cfg)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=256, help="768: GPT-2 small's width")
    parser.add_argument("--out", default=str(ROOT / "bench" / "store.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    samples: dict[str, list[float]] = {"one job": [], "sweep x4": [], "repeated": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, data = make_inputs(root, args.docs, args.width)
        runs = iter(range(10**6))

        def run(store: str, *overrides: str) -> float:
            return job(root / f"run{next(runs)}", root / store, model_dir, data, *overrides)

        run("warmup")  # imports, first-call costs
        for r in range(args.repeats):
            samples["one job"].append(run(f"single{r}"))
            samples["repeated"].append(run(f"single{r}"))
            samples["sweep x4"].append(sum(run(f"sweep{r}", *o) for o in SWEEP))
    medians = {case: statistics.median(values) for case, values in samples.items()}
    base = medians["one job"]
    print(f"{'case':<10} {'median s':>9} {'ratio':>6}  (target)")
    targets = {"one job": "", "sweep x4": "<= 1.3", "repeated": "<= 0.2"}
    for case, value in medians.items():
        print(f"{case:<10} {value:>9.3f} {value / base:>6.2f}  {targets[case]}")
    result = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "docs": args.docs,
        "width": args.width,
        "samples": samples,
        "medians": medians,
        "ratios": {case: value / base for case, value in medians.items()},
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
