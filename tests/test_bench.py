"""The GPU benchmark's configurations run (``--smoke``: tiny models, on the CPU), so they
cannot rot between the rare sessions that have a GPU."""

from __future__ import annotations

import importlib.util
import json
import logging
import statistics
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_overhead.py"


def _bench_main(argv: list[str]) -> None:
    loggers = [logging.getLogger(n) for n in ("lmprobe", "lightning.pytorch")]
    levels = [logger.level for logger in loggers]
    spec = importlib.util.spec_from_file_location("bench_overhead", BENCH)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)  # (quiets lmprobe's and Lightning's logs)
        module.main(argv)
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def test_gpu_configurations_run_in_smoke_mode_on_the_cpu(tmp_path):
    out = tmp_path / "smoke.json"
    configs = ["gpu", "llama1b", "llama8b-tokens"]
    _bench_main(
        ["--config", *configs, "--smoke", "--device", "cpu", "--repeats", "1"]
        + [
            "--out",
            str(out),
        ]
    )
    rows = json.loads(out.read_text())["rows"]
    seen = {(r["config"], r["case"], r["dtype"]) for r in rows}
    for config in ("llama1b", "llama8b-tokens"):
        for case in ("floor", "floor, no cache", "lmprobe"):
            assert (config, case, "bfloat16") in seen
    for dtype in ("float32", "bfloat16"):
        assert ("gpu", "lmprobe", dtype) in seen
    # the tiny Llama by hand: embeddings 1000 x 64 (tied with the head), per block
    # q and o 64 x 64, k and v 64 x 32 (2 of 4 heads), the MLP 3 x 64 x 128, two norms
    block = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64
    llama = [r for r in rows if r["config"] == "llama1b"]
    assert {r["params"] for r in llama} == {1000 * 64 + 2 * block + 64}
    assert {(r["documents"], r["tokens"]) for r in rows} == {(40, 40 * 16)}
    floor = {r["config"]: r for r in rows if r["case"] == "floor" and r["dtype"] == "bfloat16"}
    for row in rows:
        if row["dtype"] == "bfloat16":
            base = floor[row["config"]]["samples_s"]
            expected = statistics.median(row["samples_s"]) / statistics.median(base)
            assert row["ratio"] == expected and row["median_s"] > 0
