"""Words to subwords: sentences given as words (CoNLL) tokenized as text, each subword
traced back to its word, and sentences longer than ``max_length`` cut into windows.

A sentence is joined with single spaces and tokenized like any other text, with the
tokenizer's character offsets (any fast tokenizer: byte-level BPE as GPT-2's, SentencePiece
with its ``▁``, WordPiece). A subword belongs to the word its characters overlap; special
tokens overlap none; a token of whitespace alone belongs to the word it precedes. This is what ``is_split_into_words``
computes, without its constraint on byte-level tokenizers (``add_prefix_space=True``,
which would also give the first word a space it never has in running text).

The result is one sequence per window with ``word_ids`` (sequences, tokens): the number of
each subword's labelled word within its window, -1 for special tokens, padding and words
without a label (they stay in the text the model reads but give no row), and ``labels``
(sequences, words). Poolings over a word's subwords (first, last, mean) are in
``lmprobe.probes.poolings.WORD_POOLINGS`` and run inside the trace.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lmprobe.errors import LmProbeError

log = logging.getLogger("lmprobe")

#: The label of a padding word slot; such slots have no subword (``word_ids`` never names
#: them), so the value is never read as a label.
PAD_LABEL = -100


@dataclass
class WordEncoding:
    """Tokenized windows of word-labelled sentences, padded as the tokenizer pads."""

    input_ids: torch.Tensor  # (windows, tokens)
    attention_mask: torch.Tensor  # (windows, tokens)
    word_ids: torch.Tensor  # (windows, tokens): labelled word number, -1 elsewhere
    labels: torch.Tensor  # (windows, words), PAD_LABEL beyond a window's words
    word_types: torch.Tensor  # (windows, words): id of each word's lower-cased form
    sentence: np.ndarray  # (windows,): the sentence each window comes from
    dropped: int = 0  # labelled words with no subword left (a single word over max_length)
    windows_split: int = 0  # sentences cut into more than one window
    types: dict[str, int] = field(default_factory=dict)


def word_of_tokens(offsets: Sequence[tuple[int, int]], spans: np.ndarray) -> np.ndarray:
    """The word of each token: the first word whose characters ``spans[w] = (start, end)``
    the token's ``(start, end)`` overlaps, or the word a whitespace token ends at; -1 for
    none (special tokens)."""
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if len(spans) == 0:
        return np.full(len(offsets), -1, dtype=np.int64)
    start, end = offsets[:, 0], offsets[:, 1]
    word = np.searchsorted(spans[:, 1], start, side="right")  # first word ending after start
    inside = word < len(spans)
    word = np.minimum(word, len(spans) - 1)
    hit = inside & (end > start) & (spans[word, 0] < end)
    # a token of whitespace only (SentencePiece's lone "▁") marks the start of the next word
    # and belongs to it, as is_split_into_words's word ids have it
    hit |= inside & (end > start) & (spans[word, 0] == end)
    return np.where(hit, word, -1)


def _spans(words: Sequence[str]) -> tuple[str, np.ndarray]:
    lengths = np.array([len(w) for w in words], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]]).astype(np.int64)
    return " ".join(words), np.stack([starts, starts + lengths], 1)


def check_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise LmProbeError(
            f"word-level data needs a fast tokenizer (character offsets); "
            f"{type(tokenizer).__name__} is not one: load the model's tokenizer with "
            f"use_fast=True (AutoTokenizer's default)"
        )


def _encode(tokenizer: Any, words: Sequence[str], max_length: int | None):
    """Token ids and the word of each token for one window of words."""
    text, spans = _spans(words)
    enc = tokenizer(
        text,
        return_offsets_mapping=True,
        truncation=max_length is not None,
        max_length=max_length,
    )
    return enc["input_ids"], word_of_tokens(enc["offset_mapping"], spans)


def _windows(tokenizer: Any, words: list[str], ids: list[int], word_of: np.ndarray, limit: int):
    """Cut a sentence whose tokens exceed ``limit`` into windows of whole words, each
    re-tokenized on its own (a window's first word loses its leading space), each as long
    as fits. A single word longer than ``limit`` is a window truncated to ``limit``."""
    per_word = np.bincount(word_of[word_of >= 0], minlength=len(words))
    specials = len(ids) - int(per_word.sum())
    start = 0
    while start < len(words):
        end, total = start, specials
        while end < len(words) and total + per_word[end] <= limit:
            total += per_word[end]
            end += 1
        end = max(end, start + 1)
        while True:  # re-tokenizing can change a boundary word's count: shrink until it fits
            window_ids, window_of = _encode(tokenizer, words[start:end], None)
            if len(window_ids) <= limit or end == start + 1:
                break
            end -= 1
        if len(window_ids) > limit:
            window_ids, window_of = _encode(tokenizer, words[start:end], limit)
        yield start, end, window_ids, window_of
        start = end


def encode_words(
    tokenizer: Any,
    sentences: Sequence[Sequence[str]],
    labels: Sequence[Sequence[Any]],
    max_length: int | None = None,
    types: dict[str, int] | None = None,
) -> WordEncoding:
    """Tokenize word-split sentences; ``labels[i][j]`` is the label of word ``j`` of
    sentence ``i``, or ``None`` for a word without one. ``types`` (lower-cased word ->
    id, extended in place) numbers word types the same way across splits."""
    check_fast(tokenizer)
    types = {} if types is None else types
    texts = [" ".join(words) for words in sentences]
    encoded = tokenizer(texts, return_offsets_mapping=True) if texts else {"input_ids": []}
    rows: list[tuple[list[int], np.ndarray, list[Any], list[int], int]] = []
    dropped = split = 0
    for i, words in enumerate(sentences):
        words = list(words)
        ids = encoded["input_ids"][i]
        word_of = word_of_tokens(encoded["offset_mapping"][i], _spans(words)[1])
        if max_length is not None and len(ids) > max_length:
            pieces = list(_windows(tokenizer, words, ids, word_of, max_length))
            split += 1
        else:
            pieces = [(0, len(words), ids, word_of)]
        for start, end, window_ids, window_of in pieces:
            # renumber the labelled words of the window 0..k-1; others get -1
            number = np.full(end - start + 1, -1, dtype=np.int64)  # last slot: -1 -> -1
            window_labels, window_types = [], []
            has_token = np.zeros(end - start, dtype=bool)
            has_token[window_of[window_of >= 0]] = True
            for j in range(end - start):
                label = labels[i][start + j]
                if label is None:
                    continue
                if not has_token[j]:
                    dropped += 1
                    continue
                number[j] = len(window_labels)
                window_labels.append(label)
                form = words[start + j].lower()
                window_types.append(types.setdefault(form, len(types)))
            rows.append((list(window_ids), number[window_of], window_labels, window_types, i))
    if dropped:
        log.warning(
            "%d labelled words have no subword of their own (a word longer than max_length, "
            "or merged into a neighbour's token) and are left out",
            dropped,
        )
    if split:
        log.info("%d sentences longer than max_length=%s split into windows", split, max_length)
    return _pad(tokenizer, rows, dropped, split, types)


def _pad(tokenizer: Any, rows: list, dropped: int, split: int, types: dict[str, int]):
    n = len(rows)
    length = max((len(r[0]) for r in rows), default=1)
    width = max((len(r[2]) for r in rows), default=0)
    input_ids = torch.full((n, length), int(tokenizer.pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    word_ids = torch.full((n, length), -1, dtype=torch.long)
    integral = all(isinstance(v, (int, np.integer)) for r in rows for v in r[2])
    dtype = torch.long if integral else torch.float64  # float: targets of a regression probe
    labels = torch.full((n, max(width, 1)), PAD_LABEL, dtype=dtype)
    word_types = torch.full((n, max(width, 1)), -1, dtype=torch.long)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    for i, (ids, word_of, row_labels, row_types, _) in enumerate(rows):
        at = slice(length - len(ids), length) if left else slice(0, len(ids))
        input_ids[i, at] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, at] = 1
        word_ids[i, at] = torch.from_numpy(np.asarray(word_of, dtype=np.int64))
        labels[i, : len(row_labels)] = torch.tensor(row_labels, dtype=dtype)
        word_types[i, : len(row_types)] = torch.tensor(row_types, dtype=torch.long)
    sentence = np.array([r[4] for r in rows], dtype=np.int64)
    return WordEncoding(
        input_ids, attention_mask, word_ids, labels, word_types, sentence, dropped, split, types
    )
