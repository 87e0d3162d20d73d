"""The feature store: pooled features (what the probes read) written once to disk and read
back memory-mapped, so a repeated run, a sweep's later jobs or a run adding probes on other
sites does not run the LM again for what it has already computed.

An *entry* holds, for one split's documents and one site key (submodule, pooling, word
pooling), the pooled feature row of every document (or of every real token / word for
token-level keys), with each row's document and position. Entries do not depend on labels:
which rows a probe keeps (``null_label``) and its targets (labels, control labels) are read
from the dataset when the rows are served, exactly as the trace decides them, so probes that
differ only in labels, ``null_label`` or control twins share one entry.

The key of an entry is a SHA-256 over everything its values depend on:

- the model: a digest of its local files' names, sizes and modification times (weights,
  config and tokenizer files; a hub id's cached snapshot, a packaged model's converted
  copy), every option of ``conf/model`` (dtype, device, device_map, remote) and the torch
  and transformers versions;
- the documents: a digest of the split's token ids and attention mask (and word ids). The
  data file, the tokenizer and every data option that selects or orders rows (filters,
  sample size, split sizes and seed, max_length) act on the features only through them,
  so the key changes whenever they change what the model reads, and not otherwise;
- the site: submodule, pooling, word pooling; and the store's format and feature-code
  version (``FEATURES_VERSION``).

Not in the key: the batch size, which changes features by float rounding only (a run reads
the features of the pass that wrote them, so a repeated run scores exactly as the first).

Files are safetensors (the format of the probe files, no code in them): a JSON header with
each array's dtype, shape and offsets, then the raw arrays, mapped with ``mmap``. A writer
fills a temporary file in the store's directory and renames it into place (``os.replace``:
atomic), so a reader sees a whole entry or none, and two writers of one entry both finish
with a valid file. The header holds the SHA-256 of the data, checked when an entry is
opened: a truncated or altered entry is logged, deleted and computed again, never read.
A writer reserves its file's space before mapping it, so a full disk is a one-line error
(entries already written are kept); a store that cannot be written at all (no permission,
read-only) is logged once, and the run traces the features it lacks without storing them.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import logging
import mmap
import os
import struct
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmprobe.data.dataset import ProbeDataset, batches
from lmprobe.errors import LmProbeError
from lmprobe.probes.poolings import TOKEN_LEVEL
from lmprobe.tracing.features import FeatureKey, PendingFeatures, host_blocks
from lmprobe.tracing.loop import Tracer, trace_batches
from lmprobe.tracing.storekeys import (
    HASH_BLOCK,
    STORE_FORMAT,
    base_key,
    dataset_digest,
    default_dir,
    entry_key,
)

log = logging.getLogger("lmprobe")

DEFAULT_MAX_GB = 20.0
SUFFIX = ".safetensors"
# A temporary file this old is left by a writer that was killed (a live writer is removed
# by its own error handling): eviction removes it.
STALE_TMP_SECONDS = 24 * 3600
_PLACEHOLDER = "0" * 64  # the checksum's place in a header, before the data is hashed
_DTYPES = {"F32": np.dtype("<f4"), "I64": np.dtype("<i8")}
# Errors of a store that has no room (a full disk, a quota, a file size limit): the run
# stops with one line; any other error of writing (no permission, a read-only file system)
# leaves the store unwritten and the run traces what it lacks.
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class CorruptEntry(Exception):
    """An entry that cannot be trusted (truncated, altered, another format)."""


def _size(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GB"
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"


def reserve(fd: int, size: int) -> None:
    """Allocate the first ``size`` bytes of ``fd``'s file on disk, so that a full disk is
    an ``OSError`` here rather than a SIGBUS when a page of a sparse file's map is written:
    ``os.posix_fallocate``, else (a system or file system without it) zeros written."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is not None:
        try:
            fallocate(fd, 0, size)
            return
        except OSError as err:
            if err.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
    zeros = bytes(min(size, HASH_BLOCK))
    done = os.lseek(fd, 0, os.SEEK_END)
    while done < size:
        done += os.pwrite(fd, zeros[: size - done], done)


def row_layout(dataset: ProbeDataset, key: FeatureKey) -> tuple[np.ndarray, np.ndarray]:
    """(document, position) of each row of ``key``'s entry, in the trace's order: one row
    per document (position -1), or per real token / present word (its column / word slot),
    documents in dataset order, positions ascending."""
    if key.pooling != TOKEN_LEVEL:
        n = len(dataset)
        return np.arange(n, dtype=np.int64), np.full(n, -1, dtype=np.int64)
    keep = dataset.word_present if dataset.word_level else dataset.attention_mask.bool()
    doc, pos = keep.nonzero(as_tuple=True)
    return doc.numpy().astype(np.int64), pos.numpy().astype(np.int64)


class RowIndex:
    """Where each document's rows sit in an entry (rows are grouped by document)."""

    def __init__(self, doc: np.ndarray, n_docs: int) -> None:
        self.counts = np.bincount(doc, minlength=n_docs)
        self.starts = np.searchsorted(doc, np.arange(n_docs))

    def rows(self, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The entry rows of ``docs``, in their order, and which of ``docs`` each is."""
        counts = self.counts[docs]
        which = np.repeat(np.arange(len(docs)), counts)
        first = np.repeat(self.starts[docs] - (np.cumsum(counts) - counts), counts)
        return first + np.arange(len(which)), which


# ---------------------------------------------------------------- file format
def _header(arrays: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """A safetensors header: the arrays' dtypes, shapes and offsets, in this order."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, (dtype, shape) in arrays.items():
        size = int(np.prod(shape)) * _DTYPES[dtype].itemsize
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the spec's padding: arrays start 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def _sha256(buffer: memoryview) -> str:
    h = hashlib.sha256()
    for start in range(0, len(buffer), HASH_BLOCK):
        h.update(buffer[start : start + HASH_BLOCK])
    return h.hexdigest()


class Entry:
    """One stored entry, mapped read-only: ``X`` (rows, width) float32, ``doc``, ``pos``."""

    def __init__(
        self,
        path: Path,
        key: str,
        doc: np.ndarray,
        pos: np.ndarray,
        n_docs: int,
        verify: bool = True,
    ) -> None:
        self.path = path
        # one file object for the header, the checksum and the map: a writer renaming a new
        # file into place meanwhile cannot mix two files
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            head = handle.read(8)
            if len(head) < 8:
                raise CorruptEntry(f"{size} bytes, shorter than a header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CorruptEntry(f"truncated: a {n}-byte header in a {size}-byte file")
            try:
                header = json.loads(handle.read(n))
            except ValueError:
                raise CorruptEntry("its header is not JSON") from None
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        meta = header.pop("__metadata__", None) or {}
        if meta.get("format") != str(STORE_FORMAT):
            raise CorruptEntry(f"store format {meta.get('format')!r}, not {STORE_FORMAT}")
        if meta.get("key") != key:
            raise CorruptEntry("its header names another key")
        data = 8 + n
        end = 0
        arrays = {}
        for name, dtype in (("X", "F32"), ("doc", "I64"), ("pos", "I64")):
            info = header.get(name)
            if not isinstance(info, dict) or info.get("dtype") != dtype:
                raise CorruptEntry(f"array {name!r} is missing or not {dtype}")
            start, stop = info["data_offsets"]
            shape = tuple(info["shape"])
            if start != end or stop - start != int(np.prod(shape)) * _DTYPES[dtype].itemsize:
                raise CorruptEntry(f"array {name!r} has inconsistent offsets")
            arrays[name] = np.frombuffer(
                self._map, _DTYPES[dtype], int(np.prod(shape)), data + start
            ).reshape(shape)
            end = stop
        if data + end != size:
            raise CorruptEntry(f"truncated: {size} bytes where the header says {data + end}")
        if verify and _sha256(memoryview(self._map)[data:]) != meta.get("sha256"):
            raise CorruptEntry("its data does not match its checksum")
        self.X = arrays["X"]
        self.doc, self.pos = np.array(arrays["doc"]), np.array(arrays["pos"])
        if not (np.array_equal(self.doc, doc) and np.array_equal(self.pos, pos)):
            raise CorruptEntry("its rows are not those of the documents")
        self.index = RowIndex(self.doc, n_docs)


class EntryWriter:
    """Fills one entry batch by batch (in any document order) in a temporary file of the
    store's directory, mapped writable; ``commit`` hashes it and renames it into place."""

    def __init__(
        self,
        store: FeatureStore,
        key: str,
        fields: dict,
        doc: np.ndarray,
        pos: np.ndarray,
        n_docs: int,
    ) -> None:
        self.store, self.key, self.fields = store, key, fields
        self.doc, self.pos = doc, pos
        self.index = RowIndex(doc, n_docs)
        self.filled = np.zeros(len(doc), dtype=bool)
        self.tmp: Path | None = None
        self._map: mmap.mmap | None = None
        self._X: np.ndarray | None = None

    def _metadata(self, checksum: str) -> dict[str, str]:
        return {
            "format": str(STORE_FORMAT),
            "key": self.key,
            "fields": json.dumps(self.fields, sort_keys=True, default=str),
            "sha256": checksum,
        }

    def _arrays(self, width: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        n = len(self.doc)
        return {"X": ("F32", (n, width)), "doc": ("I64", (n,)), "pos": ("I64", (n,))}

    def create(self) -> None:
        """The temporary file, empty (an ``OSError`` where the store cannot be written)."""
        fd, tmp = tempfile.mkstemp(prefix=f".{self.key}.", suffix=".tmp", dir=self.store.directory)
        os.close(fd)
        self.tmp = Path(tmp)

    def _open(self, width: int) -> None:
        self.width = width
        header = _header(self._arrays(width), self._metadata(_PLACEHOLDER))
        self.data = len(header)
        if self.tmp is None:
            self.create()
        n = len(self.doc)
        size = self.data + n * width * 4 + 16 * n
        try:
            with open(self.tmp, "r+b") as handle:
                reserve(handle.fileno(), size)
                handle.write(header)
                handle.seek(self.data + n * width * 4)
                handle.write(self.doc.astype("<i8").tobytes())
                handle.write(self.pos.astype("<i8").tobytes())
                handle.flush()
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_WRITE)
        except OSError as err:
            self.abort()
            raise LmProbeError(
                f"feature store: cannot write {_size(size)} for entry {self.key[:12]} in "
                f"{self.store.directory} ({err.strerror or err}); free space there, set "
                f"feature_store.dir to a directory with room, or feature_store=false"
            ) from None
        self._X = np.frombuffer(self._map, np.float32, n * width, self.data).reshape(n, width)

    def fill(
        self, docs: np.ndarray, X: np.ndarray, row_docs: np.ndarray, positions: np.ndarray | None
    ) -> None:
        """Rows ``X`` of a batch of documents ``docs`` (in the batch's order), as the trace
        reports them: each row's document ``row_docs`` and, for token-level entries, its
        ``positions``; both are checked against the entry's layout."""
        rows, _ = self.index.rows(np.asarray(docs))
        if (
            len(rows) != len(X)
            or not np.array_equal(self.doc[rows], row_docs)
            or (positions is not None and not np.array_equal(self.pos[rows], positions))
        ):
            raise LmProbeError(
                f"feature store: the trace gave {len(X)} rows where entry {self.key[:12]} "
                f"expects {len(rows)} (an lmprobe bug: please report it)"
            )
        if self._X is None:
            self._open(X.shape[1])
        self._X[rows] = X
        self.filled[rows] = True

    def commit(self) -> Path:
        if self._X is None or not self.filled.all():
            raise LmProbeError(
                f"feature store: entry {self.key[:12]} is missing "
                f"{int((~self.filled).sum())} rows (an lmprobe bug: please report it)"
            )
        self._map.flush()
        checksum = _sha256(memoryview(self._map)[self.data :])
        header = _header(self._arrays(self.width), self._metadata(checksum))
        assert len(header) == self.data  # the checksum replaced a placeholder of its length
        self._map[: self.data] = header
        self._close()
        # No fsync: an entry cut short by a crash fails its checksum and is computed again.
        path = self.store.path(self.key)
        os.replace(self.tmp, path)
        self.tmp = None
        return path

    def _close(self) -> None:
        self._X = None
        if self._map is not None:
            self._map.close()
            self._map = None

    def abort(self) -> None:
        self._close()
        if self.tmp is not None:
            with suppress(OSError):
                self.tmp.unlink()
            self.tmp = None


class FeatureStore:
    """A directory of entries (``<key>.safetensors``) with a size cap: past ``max_gb`` the
    least recently used entries are deleted (opening an entry marks it used)."""

    def __init__(
        self, directory: str | os.PathLike | None = None, max_gb: float | None = DEFAULT_MAX_GB
    ) -> None:
        self.directory = Path(directory).expanduser() if directory else default_dir()
        if max_gb is not None and (isinstance(max_gb, bool) or not max_gb > 0):
            raise LmProbeError(
                f"feature_store.max_gb={max_gb!r}: use a size in GB > 0 (or null: no cap)"
            )
        self.max_gb = max_gb
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise LmProbeError(
                f"feature_store.dir={str(self.directory)!r} cannot be created "
                f"({err.strerror or err}); set feature_store.dir to a writable directory "
                f"or feature_store=false"
            ) from None

    def path(self, key: str) -> Path:
        return self.directory / f"{key}{SUFFIX}"

    def open(
        self, key: str, doc: np.ndarray, pos: np.ndarray, n_docs: int, verify: bool = True
    ) -> Entry | None:
        """The entry ``key`` if it is there and sound; None (a miss) otherwise. A corrupt
        entry is logged and deleted, so it is computed again."""
        path = self.path(key)
        try:
            entry = Entry(path, key, doc, pos, n_docs, verify)
        except FileNotFoundError:
            return None
        except (CorruptEntry, OSError, ValueError, KeyError, TypeError) as err:
            log.warning("feature store: %s is unusable (%s); computing it again", path, err)
            with suppress(OSError):
                path.unlink()
            return None
        with suppress(OSError):  # least recently used goes first; a read-only store is fine
            os.utime(path)
        return entry

    def writer(
        self, key: str, fields: dict, doc: np.ndarray, pos: np.ndarray, n_docs: int
    ) -> EntryWriter:
        return EntryWriter(self, key, fields, doc, pos, n_docs)

    def evict(self, keep: Iterable[Path] = ()) -> None:
        """Delete least recently used entries until the store fits ``max_gb`` (``keep``:
        entries of the current run, never deleted), and temporary files of dead writers."""
        keep = {Path(p) for p in keep}
        now = time.time()
        entries = []
        for path in self.directory.iterdir():
            try:
                st = path.stat()
            except OSError:
                continue
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                if now - st.st_mtime > STALE_TMP_SECONDS:
                    with suppress(OSError):
                        path.unlink()
                continue
            if path.suffix == SUFFIX:
                entries.append((st.st_mtime, st.st_size, path))
        if self.max_gb is None:
            return
        cap = self.max_gb * 2**30
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= cap:
                break
            if path in keep:
                continue
            with suppress(OSError):
                path.unlink()
            total -= size
        if total > cap:
            log.warning(
                "feature store: this run's features take %.2f GB, more than "
                "feature_store.max_gb=%s; kept for this run, a later run may delete them",
                total / 2**30,
                self.max_gb,
            )


# ------------------------------------------------------------------ serving rows
class StoredFeatures:
    """The stored features of one split, served as a trace would give them for a batch;
    ``traced``: keys the store lacks and could not take, traced by every pass instead."""

    def __init__(
        self,
        dataset: ProbeDataset,
        entries: dict[FeatureKey, Entry],
        traced: Iterable[FeatureKey] = (),
    ) -> None:
        self.dataset = dataset
        self.entries = entries
        self.traced = set(traced)

    def has(self, keys: Iterable[FeatureKey]) -> bool:
        return all(base_key(key) in self.entries for key in keys)

    def covers(self, keys: Iterable[FeatureKey]) -> bool:
        """Every key is stored or traced."""
        return all(base_key(key) in self.entries or base_key(key) in self.traced for key in keys)

    def features(
        self, key: FeatureKey, docs: np.ndarray, index: np.ndarray, label: str, on_nonfinite: str
    ) -> PendingFeatures:
        """The rows of ``key`` for the split's documents ``docs`` (a batch, in its order),
        reported as documents ``index`` (the batch's own numbering): the rows, labels and
        order ``trace_features`` gives for that batch."""
        entry = self.entries[base_key(key)]
        rows, which = entry.index.rows(docs)
        doc = entry.doc[rows]
        at = (doc, entry.pos[rows]) if key.pooling == TOKEN_LEVEL else (doc,)
        labels = self.dataset.labels.numpy()
        keep = slice(None) if key.null_label is None else labels[at] != key.null_label
        given = labels
        if key.control:
            if self.dataset.control_labels is None:
                raise ValueError("control probes need the data's control labels")
            given = self.dataset.control_labels.numpy()
        X = entry.X[rows[keep]]  # a copy: the map stays read-only
        return PendingFeatures(
            torch.from_numpy(X),
            given[at][keep],
            np.asarray(index)[which[keep]],
            key.submodule,
            label,
            on_nonfinite,
        )


class FeatureSource:
    """A run's link to the store: the store, the model's identity, and how to load the
    model (only called when some features are missing)."""

    def __init__(
        self,
        store: FeatureStore,
        model: Mapping[str, Any],
        load_model: Callable[[], Any],
        remote: bool = False,
    ) -> None:
        self.store, self.model, self.load_model, self.remote = store, model, load_model, remote

    def keys(self, dataset: ProbeDataset, keys: Iterable[FeatureKey]) -> dict[FeatureKey, str]:
        """The entry key of each site key for this split's documents."""
        data = dataset_digest(dataset)
        bases = dict.fromkeys(base_key(k) for k in keys)
        return {key: entry_key(self.model, data, key)[0] for key in bases}

    def prepare(
        self,
        splits: Mapping[str, ProbeDataset | None],
        keys: Iterable[FeatureKey],
        batch_size: int = 8,
    ) -> dict[str, StoredFeatures]:
        """Every split's features of ``keys`` from the store, tracing (one pass per split,
        all missing keys at once) only those it lacks."""
        keys = list(dict.fromkeys(base_key(k) for k in keys))
        prepared: dict[str, StoredFeatures] = {}
        unwritable: OSError | None = None
        for split, dataset in splits.items():
            if dataset is None:
                continue
            data = dataset_digest(dataset)
            entries: dict[FeatureKey, Entry] = {}
            missing: dict[FeatureKey, EntryWriter] = {}
            traced: list[FeatureKey] = []
            try:
                for key in keys:
                    name, fields = entry_key(self.model, data, key)
                    doc, pos = row_layout(dataset, key)
                    entry = self.store.open(name, doc, pos, len(dataset))
                    if entry is not None:
                        entries[key] = entry
                        continue
                    writer = self.store.writer(name, fields, doc, pos, len(dataset))
                    try:
                        writer.create()
                    except OSError as err:
                        if err.errno in _NO_ROOM:
                            raise LmProbeError(
                                f"feature store: cannot create an entry in "
                                f"{self.store.directory} ({err.strerror}); free space there, "
                                f"set feature_store.dir to a directory with room, or "
                                f"feature_store=false"
                            ) from None
                        if unwritable is None:
                            log.warning(
                                "feature store: cannot write to %s (%s); the features it "
                                "lacks are traced by every pass, not stored",
                                self.store.directory,
                                err.strerror or err,
                            )
                        unwritable = err
                        traced.append(key)
                        continue
                    missing[key] = writer
                if missing:
                    log.info(
                        "feature store: %d of %d sites of the %s split found; tracing %d "
                        "(%d documents) into %s",
                        len(entries),
                        len(keys),
                        split,
                        len(missing),
                        len(dataset),
                        self.store.directory,
                    )
                    self._fill(split, dataset, missing, batch_size)
                    for key, writer in missing.items():
                        doc, pos = writer.doc, writer.pos
                        entry = self.store.open(writer.key, doc, pos, len(dataset), verify=False)
                        if entry is None:  # deleted between our rename and here
                            raise LmProbeError(
                                f"feature store: entry {writer.key[:12]} vanished right after "
                                f"it was written in {self.store.directory}; set "
                                f"feature_store.dir to a directory no other process cleans, "
                                f"or feature_store=false"
                            )
                        entries[key] = entry
                elif not traced:
                    log.info(
                        "feature store: all %d sites of the %s split found in %s",
                        len(keys),
                        split,
                        self.store.directory,
                    )
            finally:
                for writer in missing.values():
                    writer.abort()
            prepared[split] = StoredFeatures(dataset, entries, traced)
        self.store.evict(e.path for p in prepared.values() for e in p.entries.values())
        return prepared

    def _fill(
        self,
        split: str,
        dataset: ProbeDataset,
        writers: dict[FeatureKey, EntryWriter],
        batch_size: int,
    ) -> None:
        """One pass of the LM over ``dataset`` (longest documents first, as every scoring
        pass) for the sites of ``writers``."""
        keys = list(writers)
        tracer = Tracer(self.load_model(), [k.submodule for k in keys], remote=self.remote)
        # The trace reports each row's "label": labelled with their own column (or word
        # slot), token rows tell the writer where they are; rows are every document, real
        # token or present word (no null_label), so entries do not depend on labels.
        labels = dataset.labels
        if labels.dim() == 2:
            positions = torch.arange(labels.shape[1]).expand(len(dataset), -1)
            view = ProbeDataset(
                dataset.input_ids, dataset.attention_mask, positions, word_ids=dataset.word_ids
            )
        else:
            # one row per document, whatever its label: the same documents with one label
            # each, not a copy of every document padded in memory (``input_ids`` of a
            # streamed ``PackedDataset``), so filling the store keeps memory flat
            view = copy.copy(dataset)
            view.labels = torch.zeros(len(dataset), dtype=torch.long)
            view.control_labels = None
        loader = batches(view, batch_size, by_length=True)
        try:
            for batch, pending in trace_batches(tracer.of(keys), loader, f"{split} batch {{}}"):
                parts = [pending[key] for key in keys]
                # one copy to the host per batch (one wait for the device), not per key; the
                # rows as they are (each is checked for finite values when it is served)
                blocks = host_blocks([p.X for p in parts])
                for key, part, block in zip(keys, parts, blocks, strict=True):
                    X = block.astype(np.float32, copy=False)
                    token = key.pooling == TOKEN_LEVEL
                    docs = batch["index"].numpy()
                    writers[key].fill(docs, X, part.doc, part.y if token else None)
            for writer in writers.values():
                writer.commit()
        finally:
            for writer in writers.values():
                writer.abort()
