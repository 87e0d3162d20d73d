"""Word-level files for ProbeDataModule (CoNLL-U, CoNLL): each sentence tokenized as text,
its subwords aligned to its words, one label per word."""

from __future__ import annotations

import logging

import numpy as np

from lmprobe.data.conll import resolve_column
from lmprobe.data.dataset import ProbeDataset
from lmprobe.data.readers import (
    SENTENCE,
    continuous_labels,
    label_names,
    label_vocabulary,
    number_labels,
    select_rows,
)
from lmprobe.data.streaming import effective_max_length, ensure_pad_token, warn_shared_texts
from lmprobe.data.words import encode_words
from lmprobe.errors import LmProbeError

log = logging.getLogger(__name__)


class WordSplits:
    """A part of ``ProbeDataModule``: its methods use the probedatamodule's state."""

    def _load_words(self) -> tuple[ProbeDataset, ProbeDataset | None, ProbeDataset]:
        """CoNLL files: one label per word; splits cut by sentence (all windows of a
        sentence in one split) unless given as files."""
        if self.balance:
            raise LmProbeError(
                "data.balance samples one row per label, but word-level data has many labels "
                "per sentence; set data.balance=false"
            )
        ensure_pad_token(self.tokenizer)
        max_length = effective_max_length(self.max_length, self.model_max_length)
        vocabulary, types, encoded, hashes = None, {}, {}, {}
        for split, file in self._split_files():
            path, raw = self._read(file)
            source = f"data file {path!r}" if split == "train" else f"{split} file {path!r}"
            text = resolve_column(raw, self.text_column, source)
            label = resolve_column(raw, self.label_column, source)
            exclude = {resolve_column(raw, c, source): v for c, v in self.exclude.items()}
            include = {resolve_column(raw, c, source): v for c, v in self.include.items()}
            raw = raw.assign(_row=np.arange(len(raw)))
            dropped = self._dropped(split)
            selected = select_rows(
                raw, text, label, self.label_map, exclude, include, source, dropped
            )
            if self.continuous:
                values = selected.assign(_label=continuous_labels(selected, label, source))
            else:
                if split == "train":
                    if len(selected) == 0:
                        raise LmProbeError(
                            f"{source} has no labelled words left after filtering; loosen "
                            f"data.exclude / data.include"
                        )
                    vocabulary = label_vocabulary(selected["_label"])
                values = number_labels(
                    selected, vocabulary, self.unknown_labels, source, label, dropped
                )
            word_labels = np.full(len(raw), None, dtype=object)
            word_labels[values["_row"].to_numpy()] = values["_label"].tolist()
            sentences = [
                (group[text].astype(str).tolist(), word_labels[group["_row"].to_numpy()].tolist())
                for _, group in raw.groupby(SENTENCE, sort=True)
            ]
            if split == "train" and self.sample_size is not None:
                if len(sentences) > self.sample_size:
                    keep = np.random.default_rng(self.seed).permutation(len(sentences))
                    sentences = [sentences[i] for i in sorted(keep[: int(self.sample_size)])]
            hashes[split] = np.fromiter(
                (hash(tuple(words)) for words, _ in sentences), np.int64, len(sentences)
            )
            encoded[split] = encode_words(
                self.tokenizer,
                [words for words, _ in sentences],
                [labels for _, labels in sentences],
                max_length,
                types,
            )
            log.info(
                "%s: %d sentences, %d labelled words, %d sequences",
                source,
                len(sentences),
                int(sum(lab is not None for _, labs in sentences for lab in labs)),
                len(encoded[split].input_ids),
            )
        names = None if vocabulary is None else label_names(vocabulary, self.label_map)
        self._check_classes(names, self.path)
        self.label_names = names
        datasets = {
            split: ProbeDataset(
                e.input_ids, e.attention_mask, e.labels, names, e.word_ids, e.word_types
            )
            for split, e in encoded.items()
        }
        train = encoded["train"]
        n_sentences = int(train.sentence.max()) + 1
        parts = self._fractions(n_sentences, None)
        test = hashes["test"] if "test" in hashes else hashes["train"][parts["test"]]
        warn_shared_texts(
            hashes["train"][parts["train"]],
            test,
            self.path,
            self.test_path or self.path,
            "sentences",
        )
        full = datasets["train"]
        for split, sentences in parts.items():
            datasets[split] = full.subset(np.flatnonzero(np.isin(train.sentence, sentences)))
        return datasets["train"], datasets.get("val"), datasets["test"]
