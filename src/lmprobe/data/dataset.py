"""Datasets: ``ProbeDataset`` (tokenized texts and their labels), seeded splits, and batches
padded to their own longest document."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, Sampler

from lmprobe.errors import LmProbeError


def _tensor(value: Any, error: str) -> torch.Tensor:
    """``value`` as a tensor (a copy: inputs may be read-only); ``error``, with the reason
    in its ``{}``, when it is not an array."""
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.tensor(np.asarray(value))
    except (TypeError, ValueError) as err:
        raise LmProbeError(error.format(err)) from None


def _as_long_tensor(value: Any, what: str) -> torch.Tensor:
    """``value`` as int64; floats only where they are whole numbers (a cast would truncate
    1.5 to the id 1 without a word)."""
    value = _tensor(
        value,
        f"{what} could not be read as an integer array ({{}}); pass equal-length rows, e.g. "
        "tokenize with padding=True",
    )
    if value.is_floating_point():
        whole = value == value.round()  # (NaN is not)
        if not bool(whole.all()):
            at = tuple(int(i) for i in torch.nonzero(~whole)[0])
            raise LmProbeError(
                f"{what} holds {value[at].item()!r} at {at}, not a whole number; pass the "
                f"tokenizer's integer ids"
            )
    return value.long()


def _as_label_tensor(value: Any) -> torch.Tensor:
    """Integer labels as int64 (classes); non-integral numbers stay float64 (targets of a
    regression probe, ``kind="sgd_regressor"``)."""
    value = _tensor(
        value,
        "labels could not be read as a numeric array ({}); map string labels to integers "
        "first, e.g. with label_map",
    )
    if value.is_floating_point() and not torch.equal(value, value.round()):
        return value.double()
    return value.long()


def check_documents(tokens: np.ndarray, token: str = "token") -> None:
    """A dataset's documents (``tokens``: each one's count of tokens): at least one, and
    none without a ``token``; else the one-line error."""
    if len(tokens) == 0:
        raise LmProbeError("the dataset is empty (0 documents); pass at least one text")
    if (tokens == 0).any():
        row = int(np.flatnonzero(tokens == 0)[0])
        raise LmProbeError(f"document {row} has no {token}; drop empty texts")


class ProbeDataset(Dataset):
    """Tokenized documents and their labels.

    ``labels`` has one value per document (sequence-level probes) or one per token, shaped
    like ``input_ids`` (token-level probes, ``pooling="none"``). Items are dicts with
    ``input_ids``, ``attention_mask``, ``labels`` and ``index`` (the row in this dataset).

    Word-level data (``lmprobe.data.words``, CoNLL files) adds ``word_ids`` shaped like
    ``input_ids``: the word of each subword within its sequence, -1 for subwords of no
    labelled word (special tokens, padding, unlabelled words). ``labels`` is then
    (sequences, words), one per word; slots of words that no subword names are padding.
    Probes with ``pooling="none"`` get one row per word, pooled over its subwords by their
    ``word_pooling``. ``word_types`` (sequences, words) numbers each word's form, for the
    control task (Hewitt & Liang: one control label per word type).
    """

    def __init__(
        self,
        input_ids: Any,
        attention_mask: Any,
        labels: Any,
        label_names: Mapping[Any, Any] | None = None,
        word_ids: Any = None,
        word_types: Any = None,
    ) -> None:
        self.input_ids = _as_long_tensor(input_ids, "input_ids")
        self.attention_mask = _as_long_tensor(attention_mask, "attention_mask")
        self.labels = _as_label_tensor(labels)
        self.label_names = dict(label_names) if label_names else None
        self.word_ids = None if word_ids is None else _as_long_tensor(word_ids, "word_ids")
        self.word_types = None if word_types is None else _as_long_tensor(word_types, "word_types")
        # Labels of the control task when probes have control twins (``set_control_labels``)
        self.control_labels: torch.Tensor | None = None
        if self.input_ids.dim() != 2:
            raise LmProbeError(
                f"input_ids has shape {tuple(self.input_ids.shape)}; expected "
                f"(documents, tokens): tokenize a list of texts with padding=True"
            )
        if self.attention_mask.shape != self.input_ids.shape:
            raise LmProbeError(
                f"attention_mask has shape {tuple(self.attention_mask.shape)} but input_ids has "
                f"{tuple(self.input_ids.shape)}; pass both from the same tokenizer call"
            )
        n_docs = self.input_ids.shape[0]
        check_documents(self.attention_mask.sum(1).numpy(), "real token (attention_mask all 0)")
        if self.word_ids is not None:
            self._check_words()
        elif self.labels.dim() == 1:
            if self.labels.shape[0] != n_docs:
                raise LmProbeError(
                    f"{self.labels.shape[0]} labels for {n_docs} sequences; pass one label per "
                    f"sequence (or one per token, shaped like input_ids)"
                )
        elif self.labels.shape != self.input_ids.shape:
            raise LmProbeError(
                f"token-level labels have shape {tuple(self.labels.shape)} but input_ids has "
                f"{tuple(self.input_ids.shape)}; pad labels exactly like input_ids"
            )

    def _check_words(self) -> None:
        n_docs = self.input_ids.shape[0]
        if self.word_ids.shape != self.input_ids.shape:
            raise LmProbeError(
                f"word_ids has shape {tuple(self.word_ids.shape)} but input_ids has "
                f"{tuple(self.input_ids.shape)}; give every subword its word (-1 for none)"
            )
        if self.labels.dim() != 2 or self.labels.shape[0] != n_docs:
            raise LmProbeError(
                f"word-level labels have shape {tuple(self.labels.shape)}; expected "
                f"({n_docs}, words): one label per word of each sequence"
            )
        if int(self.word_ids.max()) >= self.labels.shape[1]:
            raise LmProbeError(
                f"word_ids name word {int(self.word_ids.max())} but labels have "
                f"{self.labels.shape[1]} words per sequence; pad labels to the most words"
            )
        if self.word_types is not None and self.word_types.shape != self.labels.shape:
            raise LmProbeError(
                f"word_types has shape {tuple(self.word_types.shape)}; shape it like the "
                f"word labels {tuple(self.labels.shape)}"
            )

    @property
    def token_level(self) -> bool:
        return self.labels.dim() == 2

    @property
    def word_level(self) -> bool:
        return self.word_ids is not None

    @property
    def word_present(self) -> torch.Tensor:
        """(sequences, words): true where a word has at least one subword (a real word)."""
        return words_present(self.word_ids, self.labels.shape[1])

    def _real_labels(self) -> torch.Tensor:
        """The labels of real positions: every document, real tokens, or real words."""
        if self.word_level:
            return self.labels[self.word_present]
        if self.token_level:
            return self.labels[self.attention_mask.bool()]
        return self.labels

    @property
    def lengths(self) -> np.ndarray:
        """The number of real tokens of each document."""
        return self.attention_mask.sum(1).numpy()

    def digest_parts(self) -> tuple[torch.Tensor, ...]:
        """What identifies the data (a run's fingerprint, ``ProbeBank.fingerprint_of``)."""
        return (self.input_ids, self.attention_mask, self.labels)

    @property
    def classes(self) -> set[int]:
        """The distinct label values, over real tokens (``attention_mask == 1``) for
        token-level labels, over real words for word-level ones."""
        return {int(value) for value in torch.unique(self._real_labels())}

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, idx: Any) -> dict[str, torch.Tensor]:
        if isinstance(idx, (int, np.integer)):  # one row: no arange over the whole dataset
            if not -len(self) <= idx < len(self):
                raise IndexError(f"row {idx} of a dataset of {len(self)} documents")
            index = torch.tensor(range(len(self))[idx])  # negative rows count from the end
        else:
            index = torch.arange(len(self))[idx]
        item = {
            "input_ids": self.input_ids[idx],
            "attention_mask": self.attention_mask[idx],
            "labels": self.labels[idx],
            "index": index,
        }
        if self.control_labels is not None:
            item["control"] = self.control_labels[idx]
        if self.word_ids is not None:
            item["word_ids"] = self.word_ids[idx]
        return item

    def set_control_labels(self, labels: torch.Tensor) -> None:
        """The control task's labels, shaped like ``labels`` (from ``ProbeBank.control_labels``),
        given once by the dataset's owner; handed out as ``"control"`` with every item."""
        if tuple(labels.shape) != tuple(self.labels.shape):
            raise LmProbeError(
                f"control labels of shape {tuple(labels.shape)} for labels of shape "
                f"{tuple(self.labels.shape)}: give one control label per label"
            )
        self.control_labels = labels

    def subset(self, indices: Sequence[int] | np.ndarray) -> ProbeDataset:
        indices = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        subset = ProbeDataset(
            self.input_ids[indices],
            self.attention_mask[indices],
            self.labels[indices],
            self.label_names,
            None if self.word_ids is None else self.word_ids[indices],
            None if self.word_types is None else self.word_types[indices],
        )
        if self.control_labels is not None:
            subset.control_labels = self.control_labels[indices]
        return subset

    def label_values(self, null_label: int | None = None) -> np.ndarray:
        """The label of every document, or of every real, non-null token or word."""
        if not self.token_level:
            return self.labels.numpy()
        keep = self.word_present if self.word_level else self.attention_mask.bool()
        if null_label is not None:
            keep &= self.labels != null_label
        return self.labels[keep].numpy()

    def tt_split(
        self, test_size: float = 0.2, seed: int = 0, stratify: bool = True
    ) -> tuple[ProbeDataset, ProbeDataset]:
        """Seeded train/test split, stratified by label for sequence-level labels."""
        train_idx, test_idx = split_indices(
            len(self),
            test_size,
            seed,
            self.labels.numpy() if stratify and not self.token_level else None,
        )
        return self.subset(train_idx), self.subset(test_idx)


def words_present(word_ids: torch.Tensor, n_words: int) -> torch.Tensor:
    """(sequences, ``n_words``) bool: which word slots some subword of ``word_ids`` names."""
    present = torch.zeros(word_ids.shape[0], n_words + 1, dtype=torch.bool)
    slot = torch.where(word_ids >= 0, word_ids, n_words)  # -1 goes to a spare last slot
    present.scatter_(1, slot, True)
    return present[:, :n_words]


def split_indices(
    n: int, test_size: float, seed: int, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    if not 0.0 < test_size < 1.0:
        raise LmProbeError(f"test_size={test_size!r} must be a fraction in (0, 1), e.g. 0.2")
    n_test = int(round(n * test_size))
    if n_test == 0 or n_test == n:
        raise LmProbeError(
            f"test_size={test_size} of {n} documents leaves an empty split; use more documents "
            f"or a test_size between {1 / n:.3g} and {1 - 1 / n:.3g}"
        )
    stratify = None
    if labels is not None:
        _, counts = np.unique(labels, return_counts=True)
        if counts.min() >= 2 and n_test >= len(counts) and n - n_test >= len(counts):
            stratify = labels
    return train_test_split(np.arange(n), test_size=n_test, random_state=seed, stratify=stratify)


def pad_to_longest(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack items and drop the columns that are padding in every row of the batch.

    Works for left and right padding alike: the real tokens of a batch occupy one contiguous
    block of columns, so a batch costs its own longest document, not the dataset's.
    """
    return trim_padding({key: torch.stack([item[key] for item in items]) for key in items[0]})


def longest_first(dataset: ProbeDataset) -> list[int]:
    """An order for scoring passes (held-out, validation, test): longest documents first,
    so each batch holds documents of about one length and pads little. Scores do not depend
    on order (training, whose SGD does, uses ``LengthGroupedBatches``). Longest first
    also makes a batch too large for memory fail at once rather than at the end."""
    return np.argsort(-dataset.lengths, kind="stable").tolist()


# Hugging Face's group_by_length sorts "megabatches" of 50 batches: the default length
# window holds about as many (``auto_window``).
WINDOW_BATCHES = 50
MAX_WINDOW_GROUPS = 16  # the buffered rows of a window are its groups' rows: bound them


def auto_window(batch_size: int, group_size: int | None, token_level: bool = False) -> int:
    """The default length window, in groups of ``group_size`` documents (rounded to whole
    batches): about ``WINDOW_BATCHES`` batches, at most ``MAX_WINDOW_GROUPS`` groups. One
    group (no window) for token- and word-level data, whose documents give a row per token
    or word: a window's buffered rows would be all of its tokens."""
    if token_level or group_size is None:
        return 1
    group_docs = batch_size * max(1, -(-group_size // batch_size))
    return int(min(MAX_WINDOW_GROUPS, -(-WINDOW_BATCHES * batch_size // group_docs)))


class LengthGroupedBatches(Sampler[list[int]]):
    """Training batches of similar length whose probes still see a seeded random order.

    The documents are put in one seeded random order (``order``) and cut into groups of
    ``group_size`` documents (rounded to whole batches): a probe trains on one group at a
    time. ``window`` consecutive groups are sorted together, longest first, and cut into
    batches, so a batch pads to about its own length (as Hugging Face's
    ``group_by_length`` with its megabatches); the larger the window, the closer to a sort
    of the whole set. The probe bank trains at the end of each window (``window_ends``):
    group by group (``group_of``), each group's rows put back in ``order`` first, so a
    probe learns exactly what it would learn from the documents in that random order,
    chunk by chunk, whatever the window; only the model sees the sorted batches.
    ``group_size=None``: groups of one batch, i.e. plain random-order batches (and no
    window). The same batches come every epoch (later epochs replay the kept features).
    ``skip`` leaves out the first batches of the next pass only (a run resumed mid-epoch
    continues with the batch after the last one it trained on). ``leave_out``: documents no
    batch holds (the probes' held-out slice, traced on its own), so every batch is full.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        batch_size: int,
        group_size: int | None,
        seed: int,
        leave_out: np.ndarray | None = None,
        window: int = 1,
    ) -> None:
        lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.window = 1 if group_size is None else max(1, int(window))
        # the permutation of *all* documents: leaving some out keeps the others' order
        self.order = np.random.default_rng(seed).permutation(len(lengths))
        kept = self.order
        if leave_out is not None and len(leave_out):
            kept = kept[~np.isin(kept, leave_out)]
        # documents per group, in whole batches
        self.batches_per_group = 1 if group_size is None else max(1, -(-group_size // batch_size))
        size = batch_size * self.batches_per_group
        # Which group each document is in (-1: in none) and each group's batch count (a
        # probe's steps advance by it when it trains on the group).
        self.group_of = np.full(len(lengths), -1, dtype=np.int64)
        self.group_of[kept] = np.arange(len(kept)) // size
        self.group_batches = -(-np.bincount(self.group_of[kept]) // batch_size)
        # The documents in traced order and where each batch starts: numpy, not lists of
        # Python ints (tens of bytes a document on a data set of millions of rows). Every
        # group but the last is whole batches, so a window has its groups' batch count.
        windows, starts = [], []
        self.window_ends: set[int] = set()
        for start in range(0, len(kept), size * self.window):
            docs = kept[start : start + size * self.window]
            windows.append(docs[np.argsort(-lengths[docs], kind="stable")])
            starts.extend(range(start, start + len(docs), batch_size))
            self.window_ends.add(len(starts) - 1)
        self._docs = np.concatenate(windows) if windows else np.zeros(0, dtype=np.int64)
        self._bounds = np.append(np.asarray(starts, dtype=np.int64), len(kept))
        self.skip = 0

    def first_window(self) -> tuple[np.ndarray, int]:
        """The first length window's documents (as traced) and its last batch's position
        (the held-out slice is traced with them: ``lmprobe.tracing.ahead``)."""
        end = min(self.window_ends) if self.window_ends else -1
        return self._docs[: self._bounds[end + 1]], end

    def batch(self, position: int) -> np.ndarray:
        """The documents of the batch at ``position`` of a pass."""
        return self._docs[self._bounds[position] : self._bounds[position + 1]]

    def __iter__(self):
        # a generator: ``skip`` is read at the first batch, after Lightning's epoch-start
        # hooks (Lightning creates the iterator before them)
        skip, self.skip = self.skip, 0
        for i in range(skip, len(self)):
            yield self.batch(i).tolist()

    def __len__(self) -> int:
        return len(self._bounds) - 1


def loader_batch_size(loader: Any, default: int = 8) -> int:
    """A training loader's batch size (the held-out slice, and the documents a resumed run
    never kept, are traced at it too). A DataLoader built on a batch sampler (lmprobe's
    ``LengthGroupedBatches``) has ``batch_size=None``: the sampler has it."""
    size = getattr(loader, "batch_size", None)
    if size is None:
        size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    return int(size) if size else default


def batches(
    dataset: ProbeDataset,
    batch_size: int,
    by_length: bool = False,
    num_workers: int = 0,
    group_size: int | None = None,
    seed: int | None = None,
    leave_out: np.ndarray | None = None,
    window: int = 1,
) -> DataLoader:
    """Batches padded to their own longest: ``by_length`` for scoring passes
    (``longest_first``); with a ``seed``, training batches grouped by length in a seeded
    random order, ``window`` groups sorted together, without the documents in
    ``leave_out`` (``LengthGroupedBatches``); else the dataset's order. A dataset with a
    ``collate`` of its own (``lmprobe.data.packed.PackedDataset``: unpadded items) pads with it."""
    collate = getattr(dataset, "collate", pad_to_longest)
    if seed is not None:
        sampler = LengthGroupedBatches(
            dataset.lengths, batch_size, group_size, seed, leave_out, window
        )
        return DataLoader(
            dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=longest_first(dataset) if by_length else None,
        num_workers=num_workers,
        collate_fn=collate,
    )


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the columns of a batch that are padding in every row."""
    batch = dict(batch)
    used = batch["attention_mask"].any(0).nonzero()
    start, stop = int(used[0, 0]), int(used[-1, 0]) + 1
    for key in ("input_ids", "attention_mask", "word_ids"):
        if key in batch:
            batch[key] = batch[key][:, start:stop]
    for key in ("labels", "control"):
        # token labels are trimmed with the tokens; word labels are per word, not per token
        if key in batch and batch[key].dim() == 2 and "word_ids" not in batch:
            batch[key] = batch[key][:, start:stop]
    return batch
