"""Padding on real data: tokens the model traces per training epoch, against a length sort.

Reads the 3,000 sentiment-labelled sentences in ``../shared/data/sentiment-sentences``
(never copied into the repo), tokenizes them with SmolLM2-135M-Instruct's tokenizer (the
offline default model, ``packaged:smollm2``), and counts the tokens (padding included) of
one pass over them in lmprobe's training batches (``LengthGroupedBatches``: groups of
``chunk_rows`` = 256 documents, each length window sorted) with one group per window and
with the default window, against every document sorted by length (the floor) and the
random order. No model runs: a transformer's cost grows with the tokens it is given, so the
ratio is the share of the forward spent on padding. Runs in seconds.

    python bench/bench_padding.py          # writes bench/padding.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from lmprobe.bank.bank import DEFAULT_CHUNK_ROWS  # noqa: E402
from lmprobe.data.dataset import LengthGroupedBatches, auto_window  # noqa: E402


def sentences(folder: Path) -> list[str]:
    """Every sentence of the folder's ``*_labelled.txt`` files (``sentence<TAB>label``);
    ``imdb_labelled.txt`` has stray NEL line breaks inside lines, read as spaces."""
    texts = []
    for path in sorted(folder.glob("*_labelled.txt")):
        for line in path.read_text(encoding="utf-8").replace("\x85", " ").split("\n"):
            if "\t" in line:
                texts.append(line.rsplit("\t", 1)[0])
    return texts


def tokens(lengths: np.ndarray, batches: list[np.ndarray]) -> int:
    """Tokens the model is given: each batch padded to its longest document."""
    return int(sum(lengths[b].max() * len(b) for b in batches))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared" / "data" / "sentiment-sentences"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("padding.json"))
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"--data={str(args.data)!r} is not a folder; give the sentiment-sentences folder")
    from transformers import AutoTokenizer

    from lmprobe.tracing.models import packaged_model_dir

    tokenizer = AutoTokenizer.from_pretrained(packaged_model_dir("packaged:smollm2"))
    texts = sentences(args.data)
    lengths = np.array([len(ids) for ids in tokenizer(texts)["input_ids"]])
    print(
        f"{len(texts)} sentences, tokens per sentence: median {np.median(lengths):.0f}, "
        f"90th percentile {np.percentile(lengths, 90):.0f}, longest {lengths.max()}"
    )
    print(f"{'batch':>5} {'window':>6} {'random order':>12} {'one group':>9} {'default':>7}")
    rows = []
    for batch_size in (8, 32, 64):
        by_length = np.argsort(-lengths, kind="stable")
        floor = tokens(
            lengths, np.array_split(by_length, range(batch_size, len(by_length), batch_size))
        )
        order = np.random.default_rng(0).permutation(len(lengths))
        random = tokens(lengths, np.array_split(order, range(batch_size, len(order), batch_size)))
        window = auto_window(batch_size, DEFAULT_CHUNK_ROWS)
        grouped = {
            w: tokens(
                lengths,
                [
                    np.asarray(b)
                    for b in LengthGroupedBatches(
                        lengths, batch_size, DEFAULT_CHUNK_ROWS, 0, window=w
                    )
                ],
            )
            for w in (1, window)
        }
        row = {
            "batch_size": batch_size,
            "default_window_groups": window,
            "real_tokens": int(lengths.sum()),
            "floor_tokens": floor,
            "ratio_random_order": random / floor,
            "ratio_one_group": grouped[1] / floor,
            "ratio_default_window": grouped[window] / floor,
        }
        rows.append(row)
        print(
            f"{batch_size:5d} {window:6d} {row['ratio_random_order']:12.3f} "
            f"{row['ratio_one_group']:9.3f} {row['ratio_default_window']:7.3f}"
        )
    result = {"data": args.data.name, "tokenizer": "SmolLM2-135M-Instruct", "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
