"""Shared fixtures: a tiny random GPT-2 and a tokenizer, both built in-process (no downloads)."""

from __future__ import annotations

import copy
import os
import random
from pathlib import Path

# Single-threaded torch: on the 2-core CI VM two threads make every small op ~8 ms slower.
# Set here for the test process only, never in the package.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# ProbeConfig(..., early_stopping=False, **ONE_ALPHA): one alpha instead of the default grid,
# so no training rows are held out (tests that count rows or replay the updates).
ONE_ALPHA = {"model_kwargs": {"alpha": 1e-2}}


def reference_sgd(alpha: float, random_state: int | None):
    """What a classifier probe's estimator of one ``alpha`` does, written from the docs:
    averaged logistic SGD whose every ``partial_fit`` on ``d`` standardised features, after
    ``seen`` rows, runs at the constant step ``1 / (d / 4 + alpha * (1 + seen))``; averaged
    as ``lmprobe.integrations.sklearn.AveragedSGDClassifier`` does (running intercepts kept between calls;
    test_probes checks that against plain SGD)."""
    from lmprobe.integrations.sklearn import AveragedSGDClassifier

    class ReferenceSGD(AveragedSGDClassifier):
        def partial_fit(self, X, y, classes=None, sample_weight=None):
            seen = getattr(self, "rows_seen", 0)
            self.set_params(
                learning_rate="constant", eta0=1 / (X.shape[1] / 4 + alpha * (1 + seen))
            )
            self.rows_seen = seen + len(y)
            return super().partial_fit(X, y, classes=classes, sample_weight=sample_weight)

    return ReferenceSGD(loss="log_loss", alpha=alpha, average=True, random_state=random_state)


POSITIVE = ["good", "great", "lovely", "excellent", "happy", "fine", "superb", "nice"]
NEGATIVE = ["bad", "awful", "terrible", "poor", "sad", "ugly", "horrible", "nasty"]
FILLER = ["the", "movie", "food", "was", "really", "quite", "a", "day", "and", "it", "so"]


def make_texts(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """Short texts whose label is the polarity of the sentiment words they contain."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 12))]
        for _ in range(rng.randint(1, 3)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def write_reviews_csv(path: Path, n: int, seed: int = 4) -> Path:
    """``n`` texts of ``make_texts`` as a CSV file with a text and a string label column."""
    import csv

    texts, labels = make_texts(n, seed=seed)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for text, label in zip(texts, labels, strict=True):
            writer.writerow([text, "positive" if label else "negative"])
    return path


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [" ".join(POSITIVE + NEGATIVE + FILLER)] * 20 + make_texts(200, seed=99)[0]
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def build_gpt2(tokenizer, n_layer: int = 12, n_embd: int = 64, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=4,
        n_positions=128,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(autouse=True)
def feature_store_dir(tmp_path, monkeypatch):
    """Each test's default feature store is its own (train.py subprocesses inherit it):
    no test reuses another's features, and the suite never writes the user's cache."""
    path = tmp_path / "feature-store"
    monkeypatch.setenv("LMPROBE_FEATURE_STORE", str(path))
    return path


@pytest.fixture(scope="session")
def base_tokenizer():
    """Built once; never handed out itself, so no test can change what another one sees."""
    return build_tokenizer()


@pytest.fixture()
def tokenizer(base_tokenizer):
    """A private copy for each test: a test may change it (e.g. ``padding_side``) freely."""
    return copy.deepcopy(base_tokenizer)


@pytest.fixture(scope="session")
def gpt2(base_tokenizer):
    """The tiny GPT-2 wrapped as an nnsight model (as the old README's ``gpt2``), with a
    tokenizer of its own (nnsight sets it to left padding)."""
    from nnsight import TransformersModel

    own = copy.deepcopy(base_tokenizer)
    return TransformersModel(build_gpt2(own), tokenizer=own, task="text-generation")


@pytest.fixture(scope="session")
def hf_gpt2(gpt2):
    return gpt2._module


@pytest.fixture(scope="session")
def docs(base_tokenizer):
    texts, labels = make_texts(120)
    # left padding, as nnsight pads: set here, so no fixture or test order can change it
    enc = base_tokenizer(
        texts, padding="max_length", max_length=32, padding_side="left", return_tensors="pt"
    )
    return texts, enc, torch.tensor(labels)


@pytest.fixture()
def dataset(docs):
    from lmprobe import ProbeDataset

    _, enc, labels = docs
    return ProbeDataset(enc["input_ids"], enc["attention_mask"], labels)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, base_tokenizer):
    """The tiny GPT-2 saved as a local model directory (for path-based loading and the app)."""
    path = tmp_path_factory.mktemp("tiny-gpt2")
    build_gpt2(base_tokenizer).save_pretrained(path)
    base_tokenizer.save_pretrained(path)
    return path


class InterruptAt:
    """A Lightning callback that interrupts training at one batch, like Ctrl-C or SIGTERM
    (``batch=-1``: the epoch's last batch)."""

    def __new__(cls, batch: int, how: str = "ctrl-c", epoch: int | None = None, stage="train"):
        import signal

        from lightning.pytorch.callbacks import Callback

        def interrupt() -> None:
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise KeyboardInterrupt

        class _Interrupt(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch_, batch_idx):
                last = batch == -1 and batch_idx == len(trainer.train_dataloader) - 1
                if stage == "train" and (batch_idx == batch or last):
                    if epoch is None or trainer.current_epoch == epoch:
                        interrupt()

            def on_test_batch_end(self, trainer, pl_module, outputs, batch_, batch_idx, *_):
                if stage == "test" and batch_idx == batch:
                    interrupt()

        return _Interrupt()
