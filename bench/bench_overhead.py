"""Probing cost against the floor: a bare HF forward of the LM body over every document once.

Configurations (see bench/README.md):
  cpu   tiny random GPT-2 (12 layers, width 256), ~1,000 short documents, 12 probes,
        batch 8 and 32 (bank and control: batch 8)
  gpu   GPT-2-small architecture, random weights, 2,048 x 512 tokens, batch 8 and 32, fp32/bf16
  bank  100 probes (12 layers x {block, mlp, attn} x {mean, last} + SGD-alpha variants) vs 1,
        and the 100 without their code lengths (``code_length=False``)
  control  the cpu bank of 12 probes with control-task twins vs without
  llama1b, llama8b  Llama-architecture models of about 1B and 8B parameters (Llama-3.2-1B's
        and Llama-3.1-8B's shapes, random weights), bfloat16, every decoder block probed,
        mean pooling, 4,096 x 512 tokens (``--docs`` to change)
  llama1b-tokens, llama8b-tokens  the same models, token-level probes (``pooling: none``)
        on fewer documents (512 and 256 x 512 tokens)
  (``--smoke``: the gpu and llama configurations on a tiny model of the same architecture
  and a few short documents, on ``--device``: a test runs them on the CPU)

Floor and lmprobe run in one process, interleaved, ``--repeats`` times after a warm-up;
the table shows medians and the JSON keeps every sample. cpu/gpu rows also give each case's
ratio to the stricter floor (``floor, no cache``: the forward with ``use_cache=False``, as
lmprobe's traces run it). Run with OMP_NUM_THREADS=1 on small CPU machines (``make bench``
does). ``--breakdown`` (cpu/gpu) splits lmprobe's cost over the floor: the same forward
over lmprobe's own batches (padding), then traced by nnsight, then with pooling and the
copy to the host; the rest is the probes and Lightning, also timed within each lmprobe run
as ``outside the traces``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lmprobe import ProbeConfig, ProbeDataset, ProbeRunner  # noqa: E402
from lmprobe.data.dataset import longest_first, pad_to_longest  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lmprobe").setLevel(logging.ERROR)


def random_docs(n: int, min_len: int, max_len: int, vocab: int, seed: int = 0) -> ProbeDataset:
    """Right-padded random token documents with random binary labels."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, n)
    ids = np.zeros((n, max_len), dtype=np.int64)
    mask = np.zeros((n, max_len), dtype=np.int64)
    for i, length in enumerate(lengths):
        ids[i, :length] = rng.integers(0, vocab, length)
        mask[i, :length] = 1
    return ProbeDataset(ids, mask, rng.integers(0, 2, n))


def gpt2(n_layer: int, n_embd: int, n_head: int, n_positions: int, vocab: int, device, dtype):
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions, vocab_size=vocab
    )
    return GPT2LMHeadModel(config).eval().to(device=device, dtype=dtype)


# Llama-architecture shapes (issue 38): random weights cost what trained ones do, and
# nothing is downloaded. 1b: Llama-3.2-1B's shape (1.24B parameters, tied embeddings);
# 8b: Llama-3.1-8B's (8.03B).
LLAMA = {
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
    "tiny": dict(  # --smoke
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
}
LLAMA_VOCAB = 128256
# config: (model, pooling, documents, tokens, batch sizes); bfloat16, every block probed
SIZED = {
    "llama1b": ("1b", "mean", 4096, 512, (8, 32)),
    "llama8b": ("8b", "mean", 4096, 512, (8,)),
    "llama1b-tokens": ("1b", "none", 512, 512, (8,)),
    "llama8b-tokens": ("8b", "none", 256, 512, (8,)),
}
SMOKE = dict(docs=40, tokens=16, batch_size=4)
TINY_GPT2 = dict(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab=1000)


def llama(shape: dict, vocab: int, device, dtype):
    """A Llama model of ``shape`` with random weights, built in ``dtype`` on ``device``
    (an 8B model initialised on the GPU takes seconds, on the CPU minutes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=4096, **shape)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def make_model(shape: dict, device, dtype):
    if "llama" in shape:
        return llama(LLAMA[shape["llama"]], shape["vocab"], device, dtype)
    return gpt2(device=device, dtype=dtype, **shape)


def token_docs(n: int, tokens: int, vocab: int, seed: int = 0) -> ProbeDataset:
    """``n`` documents of ``tokens`` random tokens, a random label (1 or 2) per token."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (n, tokens))
    return ProbeDataset(ids, np.ones_like(ids), rng.integers(1, 3, (n, tokens)))


def word_tokenizer(vocab: int):
    """A word-level tokenizer over ``vocab`` made-up words: these benchmarks feed token ids
    directly, nnsight only needs a tokenizer object to wrap the model."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, **{f"w{i}": i for i in range(1, vocab)}}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<pad>")


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def floor(
    model, datasets, batch_size: int, device, by_length: bool = True, use_cache: bool = True
) -> float:
    """A bare forward of the LM body (no lm_head) over every document once; ``by_length``:
    in batches of documents sorted by length (the least padding a forward can have), else in
    the dataset's order. ``use_cache=False`` skips building the keys-and-values cache, as
    lmprobe's traces do (the default forward builds it)."""
    from torch.utils.data import DataLoader

    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for dataset in datasets:
            order = longest_first(dataset) if by_length else None
            loader = DataLoader(
                dataset, batch_size=batch_size, sampler=order, collate_fn=pad_to_longest
            )
            for batch in loader:
                mask = batch["attention_mask"].to(device, non_blocking=True)
                ids = batch["input_ids"].to(device, non_blocking=True)
                model.base_model(input_ids=ids, attention_mask=mask, use_cache=use_cache)
    sync(device)
    return time.perf_counter() - start


def probe_run(runner: ProbeRunner, train, test, batch_size: int, device, **fit) -> float:
    """One ``fit_probes`` (one epoch, scoring the test set); ``fit``: more of its options."""
    sync(device)
    start = time.perf_counter()
    runner.fit_probes(
        train, test, batch_size=batch_size, max_epochs=1, enable_progress_bar=False, **fit
    )
    sync(device)
    return time.perf_counter() - start


def probe_run_wrapped(runner: ProbeRunner, train, test, batch_size: int, device, wrap) -> float:
    """``probe_run`` with lmprobe's ``trace_features`` replaced, for this run only, by
    ``wrap(trace_features)`` (the breakdown records and times the traces this way)."""
    import lmprobe.tracing.loop as loop

    trace = loop.trace_features
    loop.trace_features = wrap(trace)
    try:
        return probe_run(runner, train, test, batch_size, device)
    finally:
        loop.trace_features = trace


def probe_run_split(
    runner: ProbeRunner, train, test, batch_size: int, device, outside: list[float]
) -> float:
    """``probe_run`` that also appends to ``outside`` the seconds spent outside lmprobe's
    traces (``trace_features``): the probes, scoring, data loading and Lightning, measured
    within the same run, so the machine's drift between runs does not blur it. (On a GPU
    the traces return before the device is done; the device time lands where the host
    waits, so there the split is only indicative.)"""
    inside = [0.0]

    def timing(trace):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return trace(*args, **kwargs)
            finally:
                inside[0] += time.perf_counter() - start

        return timed

    total = probe_run_wrapped(runner, train, test, batch_size, device, timing)
    outside.append(total - inside[0])
    return total


def every_handoff(runner: ProbeRunner, train, test, batch_size: int, device) -> float:
    """``probe_run`` with nnsight's handoffs left on at every module (what lmprobe did
    before ``lmprobe.tracing.handoffs``): the same run, for a side-by-side ratio."""
    import lmprobe.tracing.handoffs as handoffs

    state, handoffs._STATE = handoffs._STATE, None
    try:
        return probe_run(runner, train, test, batch_size, device)
    finally:
        handoffs._STATE = state


def last_training_in_place(runner: ProbeRunner, train, test, batch_size: int, device) -> float:
    """``probe_run`` with the run's last training (and refit) done in place, before the
    test pass, instead of on a worker thread while the test set is traced (what lmprobe did
    before): the same run, for a side-by-side ratio."""
    from lmprobe.training.callbacks import ProbeUpdater

    in_background = ProbeUpdater._in_background
    ProbeUpdater._in_background = lambda *args: False
    try:
        return probe_run(runner, train, test, batch_size, device)
    finally:
        ProbeUpdater._in_background = in_background


def update_threads(
    threads: int, runner: ProbeRunner, train, test, batch_size: int, device
) -> float:
    """``probe_run`` with the probes trained on ``threads`` threads (1: one at a time, what
    lmprobe did before its probes trained on several threads): the same run, side by side."""
    from lmprobe.training.callbacks import ProbeUpdater

    before, ProbeUpdater.update_threads = ProbeUpdater.update_threads, threads
    try:
        return probe_run(runner, train, test, batch_size, device)
    finally:
        ProbeUpdater.update_threads = before


def lmprobe_batches(runner: ProbeRunner, train, test, batch_size: int, device) -> list[dict]:
    """The batches one lmprobe run traces (held-out slice, length-grouped training batches,
    test batches), recorded from a run: the breakdown replays them."""
    recorded = []

    def recording(trace):
        def record(lm, batch, *args, **kwargs):
            recorded.append(
                {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "index")}
            )
            return trace(lm, batch, *args, **kwargs)

        return record

    probe_run_wrapped(runner, train, test, batch_size, device, recording)
    return recorded


def bare_batches(model, batches: list[dict], device) -> float:
    """``floor`` over lmprobe's own batches: the model's share of lmprobe's run (what
    length grouping and the held-out slice leave of padding), nothing else."""
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            model.transformer(**model_inputs(batch, device))
    sync(device)
    return time.perf_counter() - start


def model_inputs(batch: dict, device) -> dict[str, torch.Tensor]:
    """The inputs ``trace_features`` gives the benchmark's GPT-2 for ``batch``, on ``device``."""
    from lmprobe.tracing import features

    return features.model_inputs(batch, device, ("position_ids", "use_cache"))


def traced_batches(lm, batches: list[dict], n_layer: int, device, pooled: bool) -> float:
    """lmprobe's trace over its own batches: ``pooled=False`` keeps every block's output as
    it is, the way ``trace_features`` reads them (an observer, the body waiting at the
    deepest block only: nnsight's share); ``pooled=True`` is ``trace_features`` itself,
    pooling and moving the features to the host (pooling's share), with no probes,
    callbacks or Lightning."""
    from lmprobe.tracing.handoffs import handoffs_only_at
    from lmprobe.tracing.observers import SiteObserver

    from lmprobe.tracing.features import FeatureKey, location, read, trace_features
    from lmprobe.tracing.models import envoy_at, torch_module

    keys = [FeatureKey(f"transformer.h.{i}.output", "mean", None) for i in range(n_layer)]
    order = {key.submodule: i for i, key in enumerate(keys)}
    model = torch_module(lm)
    paths = [key.submodule.rpartition(".")[0] for key in keys]
    envoys = {key.submodule: envoy_at(lm, path) for key, path in zip(keys, paths, strict=True)}
    locations = {location(envoy, site): site for site, envoy in envoys.items()}
    deepest = keys[-1].submodule
    sync(device)
    start = time.perf_counter()
    for batch in batches:
        if pooled:
            for pending in trace_features(lm, batch, keys, order).values():
                pending.host()
            continue
        inputs = model_inputs(batch, device)
        kept: dict[str, torch.Tensor] = {}
        observer = SiteObserver(locations, kept.__setitem__)
        with torch.no_grad(), handoffs_only_at(model, paths), lm.trace(inputs) as tracer:
            observer.attach()
            read(envoys[deepest], deepest)
            tracer.stop()
        assert len(kept) == n_layer
    sync(device)
    return time.perf_counter() - start


def layer_probes(n_layer: int, control: bool = False) -> list[ProbeConfig]:
    return [
        ProbeConfig(f"transformer.h.{i}.output", [0, 1], early_stopping=False, control=control)
        for i in range(n_layer)
    ]


def block_probes(n_layer: int, pooling: str) -> list[ProbeConfig]:
    """A probe per Llama decoder block (``pooling="none"``: one row per token, labels 1
    and 2, 0 for none)."""
    if pooling == "none":
        return [
            ProbeConfig(f"model.layers.{i}.output", [1, 2], pooling="none", null_label=0)
            for i in range(n_layer)
        ]
    return [
        ProbeConfig(f"model.layers.{i}.output", [0, 1], early_stopping=False, pooling=pooling)
        for i in range(n_layer)
    ]


def bank_probes(n_layer: int) -> list[ProbeConfig]:
    configs = []
    for i in range(n_layer):
        for site in ("", ".mlp", ".attn"):
            for pooling in ("mean", "last"):
                path = f"transformer.h.{i}{site}.output"
                configs.append(
                    ProbeConfig(
                        path,
                        [0, 1],
                        pooling=pooling,
                        early_stopping=False,
                        name=f"{path}/{pooling}",
                    )
                )
    i = 0
    while len(configs) < 100:  # SGD-alpha variants on block outputs
        path = f"transformer.h.{i % n_layer}.output"
        alpha = (1e-2, 1e-3, 1e-1)[i // n_layer]
        configs.append(
            ProbeConfig(
                path,
                [0, 1],
                early_stopping=False,
                model_kwargs={"alpha": alpha},
                name=f"{path}/alpha={alpha}",
            )
        )
        i += 1
    return configs


def count_syncs(fn) -> int:
    """How often ``fn`` makes the CPU wait for the GPU (CUDA's sync debug mode warns on each
    synchronising call). The floor waits once, at the end; each wait inside the loop stops
    the CPU from queueing the next batch while the GPU works."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def measure(cases: dict, repeats: int, device) -> tuple[dict[str, list[float]], dict]:
    """Run every case once to warm up (recording peak GPU memory), then ``repeats``
    interleaved rounds."""
    peak = {}
    for name, fn in cases.items():
        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        fn()
        if torch.device(device).type == "cuda":
            peak[name] = torch.cuda.max_memory_allocated() / 2**20
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            samples[name].append(fn())
    return samples, peak


def profile_case(fn, path: Path, title: str, top: int = 45) -> None:
    """Append a cProfile of one more run of ``fn`` to ``path`` (cumulative time, the
    ``top`` heaviest calls): where the time over the floor goes, read off the same run."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.runcall(fn)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(top)
    with path.open("a") as out:
        out.write(f"==== {title}\n{text.getvalue()}\n")


def run_config(name: str, args) -> Iterator[dict]:
    """The rows of one configuration, one setting (batch size, dtype) at a time."""
    from nnsight import TransformersModel

    if name in ("cpu", "bank", "control"):
        # batch 32 as well for cpu: the setting issue 16 was measured in
        sizes = (8, 32) if name == "cpu" else (8,)
        device, settings = "cpu", [(b, torch.float32) for b in sizes]
        shape = dict(n_layer=12, n_embd=256, n_head=4, n_positions=128, vocab=1000)
        train = random_docs(args.docs, 4, 48, shape["vocab"], seed=0)
        test = random_docs(args.docs // 4, 4, 48, shape["vocab"], seed=1)
    else:
        device = args.device or "cuda"
        if name in SIZED:
            size, pooling, _, _, sizes = SIZED[name]
            settings = [(b, torch.bfloat16) for b in sizes]
            shape = dict(llama="tiny" if args.smoke else size, vocab=LLAMA_VOCAB)
            shape["n_layer"] = LLAMA[shape["llama"]]["num_hidden_layers"]
        else:
            pooling = "mean"
            settings = [(b, d) for d in (torch.float32, torch.bfloat16) for b in (8, 32)]
            shape = dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab=50257)
        if args.smoke:
            settings = list({dtype: (SMOKE["batch_size"], dtype) for _, dtype in settings}.values())
            shape = shape if name in SIZED else dict(TINY_GPT2)
            shape["vocab"] = TINY_GPT2["vocab"]
        if pooling == "none":
            train = token_docs(args.docs, args.tokens, shape["vocab"], seed=0)
        else:
            train = random_docs(args.docs, args.tokens, args.tokens, shape["vocab"], seed=0)
        train_n = int(args.docs * 0.8)
        train, test = train.subset(range(train_n)), train.subset(range(train_n, args.docs))
    for batch_size, dtype in settings:
        model = make_model(shape, device, dtype)
        lm = TransformersModel(
            model, tokenizer=word_tokenizer(shape["vocab"]), task="text-generation"
        )
        if name == "control":
            plain = ProbeRunner(lm, layer_probes(shape["n_layer"]))
            twins = ProbeRunner(lm, layer_probes(shape["n_layer"], control=True))
            cases = {
                "12 probes": partial(probe_run, plain, train, test, batch_size, device),
                "+ controls": partial(probe_run, twins, train, test, batch_size, device),
            }
            base = "12 probes"
        elif name == "bank":
            many = ProbeRunner(lm, bank_probes(shape["n_layer"]))
            uncoded = [replace(c, code_length=False) for c in bank_probes(shape["n_layer"])]
            one = ProbeRunner(lm, [layer_probes(shape["n_layer"])[-1]])
            cases = {
                "1 probe": partial(probe_run, one, train, test, batch_size, device),
                "100 probes": partial(probe_run, many, train, test, batch_size, device),
                "100 probes, no code lengths": partial(
                    probe_run, ProbeRunner(lm, uncoded), train, test, batch_size, device
                ),
                "100 probes, 1 thread": partial(
                    update_threads, 1, many, train, test, batch_size, device
                ),
                "100 probes, 2 threads": partial(
                    update_threads, 2, many, train, test, batch_size, device
                ),
            }
            base = "1 probe"
        elif name in SIZED:
            runner = ProbeRunner(lm, block_probes(shape["n_layer"], pooling))
            cases = {
                "floor": partial(floor, model, (train, test), batch_size, device),
                "floor, no cache": partial(
                    floor, model, (train, test), batch_size, device, use_cache=False
                ),
                "lmprobe": partial(probe_run, runner, train, test, batch_size, device),
            }
            base = "floor"
        else:
            runner = ProbeRunner(lm, layer_probes(shape["n_layer"]))
            outside: list[float] = []
            lmprobe = (
                partial(probe_run_split, runner, train, test, batch_size, device, outside)
                if args.breakdown
                else partial(probe_run, runner, train, test, batch_size, device)
            )
            cases = {
                "floor": partial(floor, model, (train, test), batch_size, device),
                # the least work a forward can do: lmprobe's traces build no cache either
                "floor, no cache": partial(
                    floor, model, (train, test), batch_size, device, use_cache=False
                ),
                "floor unsorted": partial(
                    floor, model, (train, test), batch_size, device, by_length=False
                ),
                "lmprobe": lmprobe,
                # side by side: each group of chunk_rows documents sorted on its own, as
                # before the default length window (issue 16)
                "lmprobe, window 1": partial(
                    probe_run, runner, train, test, batch_size, device, length_window=1
                ),
                # side by side: the probes trained one at a time
                "lmprobe, 1 thread": partial(
                    update_threads, 1, runner, train, test, batch_size, device
                ),
                # side by side: the last training before the test pass, not during it
                "lmprobe, last training in place": partial(
                    last_training_in_place, runner, train, test, batch_size, device
                ),
            }
            if args.every_handoff:
                cases["lmprobe every handoff"] = partial(
                    every_handoff, runner, train, test, batch_size, device
                )
            if args.breakdown:
                own = lmprobe_batches(runner, train, test, batch_size, device)
                n = shape["n_layer"]
                cases["lmprobe's batches"] = partial(bare_batches, model, own, device)
                cases["+ nnsight trace"] = partial(traced_batches, lm, own, n, device, False)
                cases["+ pooling, to host"] = partial(traced_batches, lm, own, n, device, True)
            base = "floor"
        samples, peak = measure(cases, args.repeats, device)
        if name in ("cpu", "gpu") and outside:  # the first was the warm-up round's
            samples["outside the traces"] = outside[1 : 1 + args.repeats]
        if args.profile is not None and "lmprobe" in cases:
            profile_case(cases["lmprobe"], args.profile, f"{name} batch {batch_size} {dtype}")
        medians = {k: statistics.median(v) for k, v in samples.items()}
        syncs = {}
        if torch.device(device).type == "cuda":
            try:
                syncs = {case: count_syncs(fn) for case, fn in cases.items()}
            except Exception as error:  # a diagnostic: never lose the timings for it
                print(f"counting syncs failed: {error!r}", file=sys.stderr)
        n_batches = sum(-(-len(d) // batch_size) for d in (train, test))
        params = sum(p.numel() for p in model.parameters())
        # the stricter floor, where there is one: every case's ratio to it as well
        strict = "floor, no cache" if "floor, no cache" in samples else None
        for case, value in medians.items():
            ratio, paired = ratios(samples, case, base)
            ratio_no_cache, paired_no_cache = (
                ratios(samples, case, strict) if strict else (None, None)
            )
            yield (
                {
                    "config": name,
                    "case": case,
                    "batch_size": batch_size,
                    "dtype": str(dtype).replace("torch.", ""),
                    "params": params,
                    "documents": len(train) + len(test),
                    "tokens": int(train.attention_mask.sum() + test.attention_mask.sum()),
                    "median_s": value,
                    "ratio": ratio,
                    "paired_ratio": paired,
                    "ratio_no_cache": ratio_no_cache,
                    "paired_no_cache": paired_no_cache,
                    "peak_mib": peak.get(case),
                    "peak_ratio": peak[case] / peak[base] if case in peak else None,
                    "syncs_per_batch": syncs[case] / n_batches if case in syncs else None,
                    "samples_s": samples[case],
                }
            )


def ratios(samples: dict[str, list[float]], case: str, against: str) -> tuple[float, float]:
    """``case``'s median time over ``against``'s, and the median of each round's own ratio
    (drift between rounds cancels)."""
    medians = statistics.median(samples[case]) / statistics.median(samples[against])
    rounds = zip(samples[case], samples[against], strict=False)
    return medians, statistics.median(a / b for a, b in rounds)


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        choices=["cpu", "gpu", "bank", "control", *SIZED],
        nargs="+",
        default=["cpu", "bank", "control"],
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--docs", type=int, default=None, help="training+test documents")
    parser.add_argument("--tokens", type=int, default=None, help="gpu, llama: tokens per document")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="gpu, llama: a tiny model of the same architecture, a few short documents",
    )
    parser.add_argument(
        "--device", default=None, help="gpu: run its cases on this device (e.g. cpu, smoke test)"
    )
    parser.add_argument(
        "--every-handoff",
        action="store_true",
        help="cpu/gpu: also run lmprobe with nnsight's handoffs at every module",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="cpu/gpu: also time lmprobe's own batches bare, traced, and traced with pooling",
    )
    parser.add_argument(
        "--profile", type=Path, default=None, help="append a cProfile of one lmprobe run here"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("overhead.json"))
    args = parser.parse_args(argv)
    print(f"machine: {machine()}; torch {torch.__version__}")
    print(
        f"{'config':14} {'case':31} {'batch':>5} {'dtype':9} {'median s':>9} {'ratio':>6} "
        f"{'paired':>6} {'/no-cache':>9} {'paired':>6} {'peak MiB':>9} {'peak x':>6} "
        f"{'syncs/batch':>11}",
        flush=True,
    )
    rows = []
    for name in args.config:
        args_for = argparse.Namespace(**vars(args))
        if args.smoke and (name == "gpu" or name in SIZED):
            args_for.docs = args.docs or SMOKE["docs"]
            args_for.tokens = args.tokens or SMOKE["tokens"]
        elif name in SIZED:
            args_for.docs = args.docs or SIZED[name][2]
            args_for.tokens = args.tokens or SIZED[name][3]
        elif args.docs is None:
            args_for.docs = 2048 if name == "gpu" else 800
        args_for.tokens = args_for.tokens or 512
        for row in run_config(name, args_for):
            rows.append(row)
            peak = f"{row['peak_mib']:9.0f} {row['peak_ratio']:6.2f}" if row["peak_mib"] else "-"
            syncs = row["syncs_per_batch"]
            strict = (
                f"{row['ratio_no_cache']:9.2f} {row['paired_no_cache']:6.2f}"
                if row["ratio_no_cache"] is not None
                else f"{'-':>9} {'-':>6}"
            )
            print(
                f"{row['config']:14} {row['case']:31} {row['batch_size']:5d} {row['dtype']:9} "
                f"{row['median_s']:9.3f} {row['ratio']:6.2f} {row['paired_ratio']:6.2f} {strict} "
                f"{peak:>16} {'-' if syncs is None else f'{syncs:.2f}':>11}",
                flush=True,
            )
            # written after every row, so a later failure (out of memory, say) loses nothing
            result = {"machine": machine(), "torch": torch.__version__, "rows": rows}
            args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
