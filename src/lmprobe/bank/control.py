"""Control tasks (Hewitt & Liang, 2019): the control labels of each split, for the
probes' control twins."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from lmprobe.errors import LmProbeError

log = logging.getLogger("lmprobe")


class ControlTasks:
    """A part of ``ProbeBank`` (``lmprobe.bank.bank``): its methods use the bank's state."""

    CONTROL_SPLITS = ("train", "val", "test")

    def control_labels(self, dataset: Any, split: str) -> torch.Tensor | None:
        """The control task's labels of ``dataset`` (None without control twins or data; the
        training split first), for its owner to give it (``set_control_labels``); the bank
        keeps only its control table. Sequence-level: a seeded permutation of the split's own
        labels. Token-level: each token type (input id) gets a seeded random label drawn
        from the training labels' distribution, the same in every split. Word-level: the
        same per word type (``dataset.word_types``, the lower-cased word), as Hewitt & Liang
        define control tasks for words."""
        if not self.control_of or dataset is None:
            return None
        labels = dataset.labels
        if getattr(dataset, "word_level", False) and dataset.word_types is None:
            raise LmProbeError(
                "control tasks on word-level data need each word's type: build the dataset "
                "with word_types (lmprobe.data.words.encode_words gives them) or set control=false"
            )
        if labels.dim() == 1:
            tag = self.CONTROL_SPLITS.index(split)
            order = np.random.default_rng((self.seed, tag)).permutation(len(labels))
            return labels[torch.from_numpy(order)]
        if split == "train" or self._control_table is None:
            config = self.configs[next(iter(self.control_of.values()))]
            values = torch.as_tensor(dataset.label_values(config.null_label))
            self._control_classes, counts = np.unique(values.numpy(), return_counts=True)
            self._control_p = counts / counts.sum()
            self._control_table = np.empty(0, dtype=np.int64)
        word_level = getattr(dataset, "word_level", False)
        # a control label per type: the input id of a token, the word type of a word
        types = dataset.word_types if word_level else dataset.input_ids
        real = dataset.word_present if word_level else dataset.attention_mask.bool()
        size = int(types.max()) + 1
        if size > len(self._control_table):  # a prefix of the same seeded draw
            draw = np.random.default_rng(self.seed).choice(
                len(self._control_classes), size=size, p=self._control_p
            )
            self._control_table = self._control_classes[draw]
        table = torch.from_numpy(self._control_table)
        return torch.where(real, table[types.clamp(min=0)], dataset.labels)
