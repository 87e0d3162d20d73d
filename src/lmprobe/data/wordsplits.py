"""Word-level files for ProbeDataModule (CoNLL-U, CoNLL): each sentence tokenized as text,
its subwords aligned to its words, one label per word."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from lmprobe.data.conll import resolve_column
from lmprobe.data.dataset import ProbeDataset
from lmprobe.data.readers import (
    SENTENCE,
    continuous_labels,
    label_vocabulary,
    number_labels,
    select_rows,
)
from lmprobe.data.sources import SplitRows
from lmprobe.data.words import encode_words
from lmprobe.errors import LmProbeError

log = logging.getLogger(__name__)


class WordSplits:
    """A part of ``ProbeDataModule``: its methods use the probedatamodule's state."""

    def _read_words(
        self, split: str, what: str, train: SplitRows | None, dropped: list[dict[str, Any]]
    ) -> SplitRows:
        """One split of a word-level source, read whole: filters choose the labelled words
        (the others stay in the text), ``sample_size`` counts sentences (training split);
        the split loader cuts by sentence (all windows of a sentence in one split)."""
        name, raw = self.source.table(split)
        source = f"{what} {name!r}"
        text = resolve_column(raw, self.text_column, source)
        label = resolve_column(raw, self.label_column, source)
        exclude = {resolve_column(raw, c, source): v for c, v in self.exclude.items()}
        include = {resolve_column(raw, c, source): v for c, v in self.include.items()}
        raw = raw.assign(_row=np.arange(len(raw)))
        selected = select_rows(raw, text, label, self.label_map, exclude, include, source, dropped)
        vocabulary = None if train is None else train.vocabulary
        if self.continuous:
            values = selected.assign(_label=continuous_labels(selected, label, source))
        else:
            if train is None:
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
        if train is None and self.sample_size is not None:
            if len(sentences) > self.sample_size:
                keep = np.random.default_rng(self.seed).permutation(len(sentences))
                sentences = [sentences[i] for i in sorted(keep[: int(self.sample_size)])]
        hashes = np.fromiter(
            (hash(tuple(words)) for words, _ in sentences), np.int64, len(sentences)
        )

        def build(names: dict[int, Any] | None, max_length: int | None) -> ProbeDataset:
            types = part.types if train is None else train.types  # one numbering for all
            encoded = encode_words(
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
                len(encoded.input_ids),
            )
            part.sentence = encoded.sentence
            e = encoded
            return ProbeDataset(
                e.input_ids, e.attention_mask, e.labels, names, e.word_ids, e.word_types
            )

        part = SplitRows(name, hashes, None, build, unit="sentences", vocabulary=vocabulary)
        return part
