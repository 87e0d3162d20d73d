"""Word-level probing: CoNLL readers, subword alignment, word poolings, windows, per-word
metrics (against scikit-learn on hand-pooled features), per-class tables, pre-split files."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FILLER, NEGATIVE, POSITIVE
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from lmprobe import LmProbeError, ProbeBank, ProbeConfig, ProbeDataModule, ProbeRunner
from lmprobe.data.conll import resolve_column
from lmprobe.data.readers import read_table
from lmprobe.data.words import encode_words
from lmprobe.tracing.features import gather, pool_words, position_ids_for, word_rows

TAGS = {
    **dict.fromkeys(POSITIVE + NEGATIVE, "ADJ"),
    **dict.fromkeys(["the", "a"], "DET"),
    **dict.fromkeys(["movie", "food", "day"], "NOUN"),
    **dict.fromkeys(["really", "quite", "so"], "ADV"),
    "was": "AUX",
    "and": "CCONJ",
    "it": "PRON",
}

CONLLU = """\
# sent_id = 1
# text = I don't know.
1\tI\tI\tPRON\tPRP\t_\t3\tnsubj\t_\t_
2-3\tdon't\t_\t_\t_\t_\t_\t_\t_\t_
2\tdo\tdo\tAUX\tVBP\t_\t4\taux\t_\t_
3\tn't\tnot\tPART\tRB\t_\t4\tadvmod\t_\t_
4\tknow\tknow\tVERB\tVB\t_\t0\troot\t_\t_
4.1\tknew\t_\t_\t_\t_\t_\t_\t_\t_
5\t.\t.\tPUNCT\t.\t_\t4\tpunct\t_\tSpaceAfter=No

# sent_id = 2
1\tNA\tna\tINTJ\tUH\t_\t0\troot\t_\t_
"""


def tagged_sentences(n: int, seed: int) -> list[list[tuple[str, str]]]:
    rng = random.Random(seed)
    words = sorted(TAGS)
    return [[(w, TAGS[w]) for w in rng.choices(words, k=rng.randint(3, 9))] for _ in range(n)]


def write_conllu(path: Path, sentences: list[list[tuple[str, str]]]) -> Path:
    lines = []
    for i, sentence in enumerate(sentences):
        lines.append(f"# sent_id = {i}")
        for j, (word, tag) in enumerate(sentence, start=1):
            lines.append(f"{j}\t{word}\t{word}\t{tag}\t_\t_\t0\tdep\t_\t_")
        lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_conll(path: Path, sentences: list[list[tuple[str, str]]]) -> Path:
    blocks = ["\n".join(f"{w}\t{t}" for w, t in s) for s in sentences]
    path.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------ readers
def test_conllu_reader_skips_comments_multiword_tokens_and_empty_nodes(tmp_path):
    frame = read_table(str(write_text(tmp_path / "a.conllu", CONLLU)))
    assert frame["form"].tolist() == ["I", "do", "n't", "know", ".", "NA"]  # NA stays a word
    assert frame["upos"].tolist() == ["PRON", "AUX", "PART", "VERB", "PUNCT", "INTJ"]
    assert frame["sentence"].tolist() == [0, 0, 0, 0, 0, 1]
    assert resolve_column(frame, "3", "f") == "upos"  # by position in the file
    assert resolve_column(frame, "deprel", "f") == "deprel"


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_conll_reader_columns_by_position_docstart_and_spaces(tmp_path):
    text = (
        "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n\nPeter NNP B-NP B-PER\n"
    )
    frame = read_table(str(write_text(tmp_path / "a.conll", text)))
    assert frame["0"].tolist() == ["EU", "rejects", "Peter"]
    assert frame["sentence"].tolist() == [0, 0, 1]
    assert resolve_column(frame, "-1", "f") == "3"
    with pytest.raises(LmProbeError, match="has 4 columns .*column 7"):
        resolve_column(frame, "7", "f")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("a.conllu", "# only a comment\n\n", "has no sentences"),
        ("b.conllu", "1\tI\tPRON\n", "line 1 .* 3 tab-separated columns"),
        ("c.conll", "a\tX\nb\tY\tZ\n", "line 2 .* 3 columns but line 1 has 2"),
    ],
)
def test_bad_conll_files_fail_naming_the_problem(tmp_path, name, text, message):
    with pytest.raises(LmProbeError, match=message):
        read_table(str(write_text(tmp_path / name, text)))


def test_missing_label_column_names_the_columns(tmp_path, tokenizer):
    path = write_text(tmp_path / "a.conllu", CONLLU)
    dm = ProbeDataModule(
        path=str(path), text_column="form", label_column="upox", tokenizer=tokenizer
    )
    with pytest.raises(LmProbeError, match="no column 'upox'.*id, form, lemma, upos.*'upos'"):
        dm.setup()


# ---------------------------------------------------------------- alignment
def check_alignment(tokenizer, words: list[str], enc) -> None:
    """Every word (counted by hand: ``len(words)``) owns a contiguous run of subwords that
    decodes to exactly the word; no subword of the text is lost."""
    ids, word_ids = enc.input_ids[0], enc.word_ids[0]
    real = enc.attention_mask[0].bool()
    assert sorted(set(word_ids[real & (word_ids >= 0)].tolist())) == list(range(len(words)))
    for w, word in enumerate(words):
        at = (word_ids == w).nonzero().squeeze(1)
        assert (at.diff() == 1).all()  # contiguous
        assert tokenizer.decode(ids[at]).strip().lstrip("▁") == word
    assert int(real.sum()) == len(tokenizer(" ".join(words))["input_ids"])


def test_alignment_gpt2_style_byte_level_bpe(tokenizer):
    words = ["the", "movie", "was", "superbly", "un-nice", "!!", "Zebra"]  # 7, by hand
    enc = encode_words(tokenizer, [words], [list(range(7))])
    check_alignment(tokenizer, words, enc)
    assert enc.labels[0].tolist() == list(range(7))
    # some words are split into several subwords (else the test would prove little)
    assert len(enc.input_ids[0]) > len(words)


def sentencepiece_tokenizer():
    """A SentencePiece-style tokenizer (Unigram, ``▁`` Metaspace) with a BOS token,
    trained in-process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=120, special_tokens=["<s>", "</s>", "<unk>", "<pad>"], unk_token="<unk>"
    )
    tok.train_from_iterator([" ".join(s) for s in [sorted(TAGS)] * 30], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


def test_alignment_sentencepiece_style_matches_is_split_into_words():
    sp = sentencepiece_tokenizer()
    words = ["the", "movie", "was", "superbly", "nasty", "and", "ugly"]  # 7, by hand
    enc = encode_words(sp, [words], [list(range(7))])
    check_alignment(sp, words, enc)
    assert enc.input_ids[0, 0] == sp.bos_token_id and enc.word_ids[0, 0] == -1
    reference = sp(words, is_split_into_words=True)
    assert enc.input_ids[0].tolist() == reference["input_ids"]
    assert enc.word_ids[0].tolist() == [-1 if w is None else w for w in reference.word_ids()]


def test_unlabelled_words_stay_in_the_text_without_a_row(tokenizer):
    words = ["the", "movie", "was", "good"]
    enc = encode_words(tokenizer, [words], [[None, 1, None, 0]])
    assert enc.labels[0].tolist() == [1, 0]
    decoded = [tokenizer.decode(enc.input_ids[0][enc.word_ids[0] == w]).strip() for w in (0, 1)]
    assert decoded == ["movie", "good"]
    assert int(enc.attention_mask.sum()) == len(tokenizer("the movie was good")["input_ids"])


def test_long_sentences_become_windows_that_keep_every_word(tokenizer):
    rng = random.Random(0)
    words = [rng.choice(sorted(TAGS)) for _ in range(60)]
    labels = list(range(60))
    enc = encode_words(tokenizer, [words, words[:3]], [labels, labels[:3]], max_length=12)
    assert enc.windows_split == 1 and enc.dropped == 0
    assert int(enc.attention_mask.sum(1).max()) <= 12
    first = enc.sentence == 0
    assert first.sum() > 1
    # every labelled word once, in order, each window decoding to its own words
    kept = [enc.labels[i][enc.labels[i] >= 0].tolist() for i in np.flatnonzero(first)]
    assert sum(kept, []) == labels
    for i, row in zip(np.flatnonzero(first), kept, strict=True):
        text = tokenizer.decode(enc.input_ids[i][enc.attention_mask[i].bool()])
        assert text.split() == [words[j] for j in row]


# ----------------------------------------------------------------- poolings
@pytest.mark.parametrize("how", ["first", "last", "mean"])
def test_word_poolings_against_hand_pooling(how):
    word_ids = torch.tensor([[-1, 0, 0, 1, 2, 2, 2, -1], [3, -1, 0, 0, 1, 2, 3, 3]])
    hidden = torch.randn(2, 8, 5)
    keep = torch.tensor([[True, True, True, False], [True, False, True, True]])
    spans = {(0, 0): [1, 2], (0, 1): [3], (0, 2): [4, 5, 6], (1, 0): [2, 3], (1, 2): [5]}
    spans[(1, 3)] = [0, 6, 7]
    pick = {"first": lambda s: s[:1], "last": lambda s: s[-1:], "mean": lambda s: s}[how]
    expected = torch.stack(
        [hidden[d, pick(spans[(d, w)])].mean(0) for d in range(2) for w in range(4) if keep[d, w]]
    )
    pooled = pool_words(hidden, word_rows(word_ids, keep, how))
    torch.testing.assert_close(pooled, expected)


# ----------------------------------------------- per-word metrics vs sklearn
@pytest.fixture()
def conllu_pair(tmp_path):
    train = write_conllu(tmp_path / "train.conllu", tagged_sentences(60, seed=1))
    test_sentences = tagged_sentences(25, seed=2)
    test = write_conllu(tmp_path / "test.conllu", test_sentences)
    return train, test, sum(len(s) for s in test_sentences)


def hand_features(hf_gpt2, dataset, layer: int, how: str) -> tuple[np.ndarray, np.ndarray]:
    """Word features from a plain Hugging Face forward, pooled by hand, and their labels."""
    with torch.no_grad():
        out = hf_gpt2(
            input_ids=dataset.input_ids,
            attention_mask=dataset.attention_mask,
            position_ids=position_ids_for(dataset.attention_mask),
            output_hidden_states=True,
        )
    hidden = out.hidden_states[layer + 1]
    X, y = [], []
    for d in range(len(dataset)):
        for w in range(dataset.labels.shape[1]):
            at = (dataset.word_ids[d] == w).nonzero().squeeze(1).tolist()
            if not at:
                continue
            at = {"first": at[:1], "last": at[-1:], "mean": at}[how]
            X.append(hidden[d, at].mean(0).numpy())
            y.append(int(dataset.labels[d, w]))
    return np.stack(X), np.array(y)


def test_per_word_metrics_match_sklearn_on_hand_pooled_features(gpt2, hf_gpt2, conllu_pair):
    train, test, n_test_words = conllu_pair
    dm = ProbeDataModule(
        path=str(train),
        test_path=str(test),
        text_column="form",
        label_column="upos",
        tokenizer=gpt2.tokenizer,
    )
    dm.setup()
    classes = sorted(dm.label_names)
    hows = ("first", "last", "mean")
    configs = [
        ProbeConfig(
            "transformer.h.1.output",
            classes,
            pooling="none",
            word_pooling=how,
            name=how,
            early_stopping=False,
        )
        for how in hows
    ]
    runner = ProbeRunner(gpt2, configs)
    runner.fit_probes(dm.train_set, dm.test_set, batch_size=8, max_epochs=1)
    per_class = runner.module.bank.class_tables["test"]
    for how in hows:
        X, y = hand_features(hf_gpt2, dm.test_set, 1, how)
        assert len(y) == n_test_words  # one row per word of the test file, none per subword
        # the trace pools the same vectors as the hand pooling
        batch = dm.test_set[:]
        traced = gather(list(runner.module.extract(batch, [how], "test").values())).X
        np.testing.assert_allclose(traced, X, rtol=1e-4, atol=1e-5)
        pred = runner[how].predict(X)
        row = runner.metrics.loc[how]
        assert row["support"] == n_test_words
        assert row["accuracy"] == pytest.approx(accuracy_score(y, pred))
        assert row["f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
        p, r, f, s = precision_recall_fscore_support(y, pred, labels=classes, zero_division=0)
        table = per_class.loc[how]
        np.testing.assert_allclose(table["precision"], p)
        np.testing.assert_allclose(table["recall"], r)
        np.testing.assert_allclose(table["f1"], f)
        assert table["support"].tolist() == s.tolist()


def test_control_labels_follow_the_word_type(tokenizer):
    bank = ProbeBank(
        [ProbeConfig("transformer.h.0.output", [0, 1, 2], pooling="none", control=True)], seed=3
    )
    types: dict[str, int] = {}
    from lmprobe import ProbeDataset

    def dataset(sentences, labels):
        enc = encode_words(tokenizer, sentences, labels, types=types)
        return ProbeDataset(
            enc.input_ids, enc.attention_mask, enc.labels, None, enc.word_ids, enc.word_types
        )

    rng = random.Random(0)
    train_words = [[rng.choice(sorted(TAGS)) for _ in range(8)] for _ in range(40)]
    train = dataset(train_words, [[rng.randrange(3) for _ in s] for s in train_words])
    test = dataset([["The", "movie", "MOVIE", "good"]], [[0, 1, 2, 0]])
    train.set_control_labels(bank.control_labels(train, "train"))
    test.set_control_labels(bank.control_labels(test, "test"))
    control = {}
    for data, words in ((train, train_words), (test, [["The", "movie", "MOVIE", "good"]])):
        for d, sentence in enumerate(words):
            for w, word in enumerate(sentence):
                control.setdefault(word.lower(), set()).add(int(data.control_labels[d, w]))
    assert all(len(values) == 1 for values in control.values())  # one label per word type
    assert len({next(iter(v)) for v in control.values()}) > 1  # drawn, not constant


# ------------------------------------------------------------ pre-split files
def test_csv_test_path_scores_exactly_the_test_file(tmp_path, tokenizer):
    rng = random.Random(0)

    def rows(n):
        return pd.DataFrame(
            [
                (f"{rng.choice(POSITIVE + NEGATIVE)} {rng.choice(FILLER)}", rng.choice("abc"))
                for _ in range(n)
            ],
            columns=["text", "label"],
        )

    rows(80).to_csv(tmp_path / "train.csv", index=False)
    test = rows(37)
    test.to_csv(tmp_path / "test.csv", index=False)
    dm = ProbeDataModule(
        path=str(tmp_path / "train.csv"),
        test_path=str(tmp_path / "test.csv"),
        tokenizer=tokenizer,
        sample_size=50,  # samples the training file only
    )
    dm.setup()
    assert len(dm.train_set) == 50 and len(dm.test_set) == 37
    names = dm.label_names
    assert sorted(names.values()) == ["a", "b", "c"]
    assert sorted(names[int(v)] for v in dm.test_set.labels) == sorted(test["label"])

    test.iloc[[0, 5], 1] = "z"  # a label the training file never has
    test.to_csv(tmp_path / "test.csv", index=False)
    with pytest.raises(
        LmProbeError, match=r"\['z'\].*never occur in the training.*unknown_labels=drop"
    ):
        ProbeDataModule(
            path=str(tmp_path / "train.csv"),
            test_path=str(tmp_path / "test.csv"),
            tokenizer=tokenizer,
        ).setup()
    dm = ProbeDataModule(
        path=str(tmp_path / "train.csv"),
        test_path=str(tmp_path / "test.csv"),
        tokenizer=tokenizer,
        unknown_labels="drop",
    )
    dm.setup()
    assert len(dm.test_set) == 35


def test_conllu_unknown_test_tags_error_or_drop_words(tmp_path, tokenizer, conllu_pair):
    train, _, _ = conllu_pair
    test = write_conllu(tmp_path / "odd.conllu", [[("the", "DET"), ("xyzzy", "SYM")]])
    options = dict(path=str(train), test_path=str(test), text_column="form", label_column="upos")
    with pytest.raises(LmProbeError, match=r"\['SYM'\].*unknown_labels=drop"):
        ProbeDataModule(**options, tokenizer=tokenizer).setup()
    dm = ProbeDataModule(**options, tokenizer=tokenizer, unknown_labels="drop")
    dm.setup()
    assert dm.test_set.word_present.sum() == 1  # "xyzzy" is read, but has no row
    assert dm.label_names[int(dm.test_set.label_values()[0])] == "DET"


# ------------------------------------------------------------------- the app
def app_overrides(model_dir) -> list[str]:
    return [
        f"model.name_or_path={model_dir}",
        "model.device=cpu",
        "probes.submodules=[transformer.h.1.output,transformer.h.2.output]",
        "probes.early_stopping=false",
        "data.batch_size=8",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "logger=none",
    ]


@pytest.mark.parametrize("fmt", ["conllu", "conll"])
def test_app_runs_conll_files_end_to_end(tmp_path, tiny_model_dir, fmt):
    from test_app import compose_cfg

    from lmprobe.app.job import train

    write = write_conllu if fmt == "conllu" else write_conll
    train_file = write(tmp_path / f"train.{fmt}", tagged_sentences(50, seed=1))
    test_sentences = tagged_sentences(20, seed=2)
    test_file = write(tmp_path / f"test.{fmt}", test_sentences)
    n_words = sum(len(s) for s in test_sentences)  # the word lines of the test file
    label = "upos" if fmt == "conllu" else "-1"
    cfg = compose_cfg(
        tmp_path / "run",
        [
            f"data={fmt}",
            f"data.path={train_file}",
            f"data.test_path={test_file}",
            f"data.label_column={label}",
            "probes.word_pooling=[first,mean]",
            *app_overrides(tiny_model_dir),
        ],
    )
    train(cfg)
    run = tmp_path / "run"
    metrics = pd.read_csv(run / "metrics.csv", index_col="probe")
    assert list(metrics.index) == [
        f"transformer.h.{i}.output/{how}" for i in (1, 2) for how in ("first", "mean")
    ]
    assert (metrics["support"] == n_words).all()  # one row per word of the test file
    per_class = pd.read_csv(run / "per_class.csv")
    tags = sorted({t for s in test_sentences for _, t in s} | set(TAGS.values()))
    assert set(per_class["label"]) <= set(tags)
    for _, table in per_class.groupby("probe"):
        assert table["support"].sum() == n_words
        assert len(table) == len(set(TAGS.values()))  # every training tag


def test_app_csv_test_path_scores_the_rows_of_the_test_file(tmp_path, tiny_model_dir):
    from test_app import compose_cfg

    from lmprobe.app.job import train

    rng = random.Random(0)
    for name, n in (("train", 60), ("test", 23)):
        labels = [rng.choice(["pos", "neg"]) for _ in range(n)]
        texts = [f"{rng.choice(POSITIVE if y == 'pos' else NEGATIVE)} food" for y in labels]
        pd.DataFrame({"text": texts, "label": labels}).to_csv(tmp_path / f"{name}.csv", index=False)
    cfg = compose_cfg(
        tmp_path / "run",
        [
            "data=csv",
            f"data.path={tmp_path / 'train.csv'}",
            f"data.test_path={tmp_path / 'test.csv'}",
            *app_overrides(tiny_model_dir),
        ],
    )
    table = train(cfg)
    assert (table["support"] == 23).all()
    assert (tmp_path / "run" / "per_class.csv").exists()
