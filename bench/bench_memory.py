"""Peak memory of reading a data file, against its number of rows (issue 11, part 2).

For each size, a CSV of short synthetic texts (3-20 words, a 0/1 label, a ``src`` column) is
written once; then a fresh Python process builds ``ProbeDataModule`` on it with filters and a
seeded balanced sample (``exclude``, ``balance``, ``sample_size`` when given), runs ``setup``
(read, filter, sample, split, tokenize) and one pass over the training batches, and reports
its peak resident memory (``ru_maxrss``) and the time each step took. A word-level tokenizer
over the made-up vocabulary is built in the child, so no download is needed.

    OMP_NUM_THREADS=1 python bench/bench_memory.py --rows 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import tempfile
from pathlib import Path

WORDS = [f"w{i}" for i in range(2000)]

CHILD = r"""
import json, resource, sys, time
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from lmprobe import ProbeDataModule

path, sample_size, words = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
vocab = {"<pad>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(words)}}
tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
before = peak_mb()
t0 = time.perf_counter()
dm = ProbeDataModule(path=path, tokenizer=tokenizer, exclude={"src": ["c"]}, balance=True,
                     sample_size=sample_size, test_size=0.2, max_length=64, batch_size=16)
dm.setup("fit")
t1 = time.perf_counter()
setup_peak = peak_mb()
batches = tokens = 0
for batch in dm.train_dataloader():
    batches += 1
    tokens += int(batch["attention_mask"].sum())
t2 = time.perf_counter()
print(json.dumps({"train": len(dm.train_set), "test": len(dm.test_set), "batches": batches,
                  "tokens": tokens, "setup_s": t1 - t0, "pass_s": t2 - t1,
                  "import_peak_mb": before, "setup_peak_mb": setup_peak,
                  "peak_mb": peak_mb()}))
"""


def write_rows(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("text,label,src\n")
        for i in range(rows):
            words = " ".join(rng.choices(WORDS, k=rng.randint(3, 20)))
            handle.write(f"{words},{i % 2},{'abc'[rng.randrange(3)]}\n")


def measure(path: Path, sample_size: int | None) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), json.dumps(sample_size), str(len(WORDS))],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--out", default=str(Path(__file__).with_name("memory.json")))
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.rows:
            path = Path(tmp) / f"rows{rows}.csv"
            write_rows(path, rows)
            mb = path.stat().st_size / 2**20
            for sample in (None, 10_000):
                result = {"rows": rows, "file_mb": round(mb, 1), "sample_size": sample}
                result |= measure(path, sample)
                results.append(result)
                print(
                    f"{rows:>9,} rows ({mb:6.1f} MB), sample_size={sample}: "
                    f"train {result['train']:>7,}  setup {result['setup_s']:6.1f} s  "
                    f"pass {result['pass_s']:6.1f} s  peak RSS {result['peak_mb']:6.0f} MB "
                    f"(after imports {result['import_peak_mb']:.0f} MB)",
                    flush=True,
                )
    machine = {"python": platform.python_version(), "machine": platform.processor()}
    Path(args.out).write_text(json.dumps({"machine": machine, "results": results}, indent=1))


if __name__ == "__main__":
    main()
