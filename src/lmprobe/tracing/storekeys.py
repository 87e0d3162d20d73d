"""The feature store's keys: what identifies a model's and a data set's features (content
digests of the model's files and of the tokenised documents), and where the store lives."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmprobe.data.dataset import ProbeDataset
from lmprobe.probes.poolings import TOKEN_LEVEL
from lmprobe.tracing.features import FeatureKey
from lmprobe.tracing.models import (
    cache_dir,
    local_model_dir,
)

log = logging.getLogger("lmprobe")

STORE_FORMAT = 1
# Bump when the code that computes features (lmprobe.tracing.features, lmprobe.probes.poolings) changes
# what it returns: every stored entry then becomes a miss.
FEATURES_VERSION = 1
HASH_BLOCK = 16 * 2**20  # bytes hashed per call


def default_dir() -> Path:
    """``$LMPROBE_FEATURE_STORE``, else ``features`` in the cache directory (``cache_dir``)."""
    env = os.environ.get("LMPROBE_FEATURE_STORE")
    return Path(env) if env else cache_dir() / "features"


# ------------------------------------------------------------------------ keys
#: A file's content digest by its (path, size, mtime, inode, ctime): computed once per
#: process, and kept between runs in ``.file_digests.json`` of the default store.
_file_digests: dict[str, str] = {}


def _digest_cache() -> Path:
    return default_dir() / ".file_digests.json"


def file_digest(path: Path) -> str:
    """The sha256 of ``path``'s contents, read once per version of the file: the cache is
    keyed by its size, modification time, inode and status-change time (ctime, which
    rewriting a file changes even when its modification time is set back, as ``cp -p``,
    ``rsync -a`` and tar do)."""
    st = path.stat()  # follows the hub cache's symlinks to the blobs
    key = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_ctime_ns}"
    if not _file_digests:
        with suppress(OSError, ValueError):
            stored = json.loads(_digest_cache().read_text(encoding="utf-8"))
            if isinstance(stored, dict):
                _file_digests.update({k: v for k, v in stored.items() if isinstance(v, str)})
    if key not in _file_digests:
        h = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(HASH_BLOCK):
                h.update(block)
        _file_digests[key] = h.hexdigest()
        with suppress(OSError):  # a cache that cannot be written only costs a re-read
            cache = _digest_cache()
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(_file_digests), encoding="utf-8")
            os.replace(tmp, cache)
    return _file_digests[key]


def files_digest(directory: Path) -> str:
    """Names and contents (``file_digest``) of every file under ``directory`` (hidden ones
    aside), hashed: new weights, a new tokenizer file or a re-converted model change it,
    whatever their sizes and modification times. The weights are read once per version."""
    h = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        h.update(f"{rel.as_posix()}\0{file_digest(path)}\n".encode())
    return h.hexdigest()


# lmprobe's loader, by its name and by the name of lmprobe 0.2 (lmprobe/__init__.py)
LOADER_TARGETS = (
    "lmprobe.tracing.models.load_language_model",
    "lmprobe.models.load_language_model",
)


def model_identity(spec: Mapping[str, Any]) -> dict[str, Any] | None:
    """What identifies the features of the model that ``conf/model`` spec loads, found
    without loading it; None when that cannot be told yet (a hub model not downloaded, a
    packaged model not converted, another loader than lmprobe's)."""
    spec = dict(spec)
    if spec.get("_target_") not in LOADER_TARGETS:
        return None
    directory = local_model_dir(spec.get("name_or_path"))
    if directory is None:
        return None
    import transformers

    options = {k: v for k, v in spec.items() if k not in ("_target_", "name_or_path")}
    if options.get("device") == "auto":  # as load_language_model resolves it
        options["device"] = "cuda" if torch.cuda.is_available() else None
    return {
        "directory": str(directory),
        "files": files_digest(directory),
        "options": options,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def dataset_digest(dataset: ProbeDataset) -> str:
    """The documents the model reads: token ids, attention mask, word ids (row order too).
    A dataset that can say so without padding everything in memory (``PackedDataset``)
    hashes its own documents."""
    own = getattr(dataset, "documents_digest", None)
    if own is not None:
        return own()
    h = hashlib.sha256()
    tensors = {"input_ids": dataset.input_ids, "attention_mask": dataset.attention_mask}
    if dataset.word_ids is not None:
        tensors["word_ids"] = dataset.word_ids
        h.update(f"word slots {dataset.labels.shape[1]}\n".encode())
    for name, tensor in tensors.items():
        array = np.ascontiguousarray(tensor.numpy())
        h.update(f"{name} {array.dtype} {array.shape}\n".encode())
        h.update(array)
    return h.hexdigest()


def base_key(key: FeatureKey) -> FeatureKey:
    """The stored key of ``key``: labels choose rows and targets when rows are served, so
    ``null_label`` and control twins share the features of the plain key."""
    word_pooling = key.word_pooling if key.pooling == TOKEN_LEVEL else None
    return FeatureKey(key.submodule, key.pooling, None, False, word_pooling)


def entry_key(model: Mapping[str, Any], data: str, key: FeatureKey) -> tuple[str, dict]:
    """The entry's name (a SHA-256) and the fields it hashes (kept in the entry's header)."""
    key = base_key(key)
    fields = {
        "format": STORE_FORMAT,
        "features": FEATURES_VERSION,
        "model": dict(model),
        "data": data,
        "submodule": key.submodule,
        "pooling": key.pooling,
        "word_pooling": key.word_pooling,
    }
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest(), fields
