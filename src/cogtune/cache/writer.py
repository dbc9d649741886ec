"""Writing a cache in the format of `data_schema`: shards, index parts, the selection, the
validation inputs, and the lock that writers share and `cogtune cache prune` takes alone."""

from __future__ import annotations

import contextlib
import json
import uuid
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

from cogtune import data_schema as schema
from cogtune.cache.disk import PartVanished, index_parts, read_manifest, read_part_table
from cogtune.errors import CogtuneError
from cogtune.util import locks
from cogtune.util.files import atomic_write, write_json


@contextlib.contextmanager
def cache_lock(cache_path: Path, exclusive: bool = False, user: str = "a preprocess run"):
    """Preprocess and training runs share a cache's lock (`user` says which this is); `cogtune cache
    prune` takes it alone, so it never deletes what a running preprocess writes or a training reads.
    Raises CogtuneError when the lock cannot be had at once, or when the file system has no locks
    (unless COGTUNE_NO_CACHE_LOCK=1 says to go on without one)."""
    cache_path.mkdir(parents=True, exist_ok=True)

    def busy(holder: str) -> str:
        if exclusive:
            return (f"{cache_path} is in use by a preprocess or training run; `cogtune cache prune` waits for none: "
                    "run it again once they have finished.")
        return (f"{cache_path} is being pruned by `cogtune cache prune`" + (f" ({holder})" if holder else "")
                + f"; {user} cannot start now. Run it again once the prune has finished.")

    with locks.flock(cache_path / schema.LOCK_FILE, exclusive, busy,
                     "a cache so that `cogtune cache prune` never deletes what a preprocess writes or a training reads"):
        yield


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A small safetensors file (a validation input), written atomically."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda temp: save_file(tensors, temp, metadata=metadata))


def _write_parquet(path: Path, table: pa.Table) -> None:
    atomic_write(path, lambda temp: pq.write_table(table, temp))


def write_index_part(cache_path: Path, name: str, rows: list[schema.IndexRow]) -> Path:
    path = schema.index_part_path(cache_path, name)
    _write_parquet(path, pa.Table.from_pylist([row.to_json() for row in rows], schema=schema.INDEX_SCHEMA))
    return path


# More index parts than this at the end of a preprocess run are compacted into one (each process
# writes a part per shard it fills: thousands in a large run, each a file for training to open).
MAX_INDEX_PARTS = 16


def compact_index(cache_path: Path, most: int = MAX_INDEX_PARTS) -> int:
    """Rewrite the index parts as one, in their order, where there are more than `most`; returns
    how many were merged. Safe beside other writers and readers: the merged part is written before
    any part it holds is deleted (a crash between leaves rows twice, which readers keep once), parts
    written meanwhile are left alone, and a reader whose part vanishes reads a new listing
    (reader.listing_retried). A damaged part stops it: `cogtune cache prune` deals with those."""
    parts = index_parts(cache_path)
    if len(parts) <= most:
        return 0
    try:
        tables = [read_part_table(part) for part in parts]
    except (CogtuneError, PartVanished):  # damaged, or another process compacts now
        return 0
    if any(table.schema.names != schema.INDEX_SCHEMA.names for table in tables):
        return 0
    merged = pa.concat_tables([table.cast(schema.INDEX_SCHEMA) for table in tables])
    _write_parquet(schema.index_part_path(cache_path, f"compacted-{uuid.uuid4().hex[:12]}"), merged)
    for part in parts:
        part.unlink(missing_ok=True)
    return len(parts)


def write_selection(cache_path: Path, sample_ids: Iterable[str], repeats: Iterable[int] | None = None,
                    dataset_repeats: list[int] | None = None) -> None:
    """The samples a training run reads. repeats: each one's times per epoch (a sample listed twice
    gets the sum), stored only when one differs from 1; dataset_repeats: the [[datasets]] repeats
    they came from, kept in the file's metadata so that training can tell when they changed."""
    if repeats is None:
        counts = dict.fromkeys(sample_ids, 1)
    else:
        counts: dict[str, int] = {}
        for sample_id, times in zip(sample_ids, repeats):
            counts[sample_id] = counts.get(sample_id, 0) + times
    table = pa.Table.from_pydict({"sample_id": list(counts)}, schema.SELECTION_SCHEMA)
    if any(times != 1 for times in counts.values()):
        table = table.append_column(pa.field("repeats", pa.int32()), pa.array(list(counts.values()), pa.int32()))
    if dataset_repeats is not None:
        table = table.replace_schema_metadata({schema.DATASET_REPEATS_KEY: json.dumps(dataset_repeats)})
    _write_parquet(Path(cache_path) / schema.SELECTION_FILE, table)


def write_fingerprints(cache_path: Path, fingerprints: pa.Table) -> None:
    """Replace the cache's fingerprints file (see data_schema.FINGERPRINTS_FILE) with this table
    (FINGERPRINTS_SCHEMA)."""
    _write_parquet(Path(cache_path) / schema.FINGERPRINTS_FILE, fingerprints.cast(schema.FINGERPRINTS_SCHEMA))


class CacheWriter:
    """Appends encoded tensors and index rows to a cache, one complete shard at a time."""

    def __init__(self, cache_path: Path, manifest: schema.Manifest, shard_size_mb: float, writer_id: str = "w0"):
        self.cache_path = Path(cache_path)
        self.writer_id = writer_id
        self.shard_bytes = int(shard_size_mb * 1024 * 1024)
        self._tensors: dict[str, torch.Tensor] = {}
        self._rows: list[schema.IndexRow] = []
        self._pending_bytes = 0
        self._part_name = self._new_part_name()
        self.manifest = manifest  # (a cache of format version 5: its own, read as version 6)
        if (self.cache_path / schema.MANIFEST_FILE).exists():
            stored = read_manifest(self.cache_path)
            found = stored.identity_json(weights=True)
            if found["model"][schema.WEIGHTS_DIGEST] is None:  # written before weights were told apart
                found["model"][schema.WEIGHTS_DIGEST] = manifest.model.weights_sha256
            differences = schema.describe_differences(manifest.identity_json(weights=True), found)
            if differences:
                raise CogtuneError(
                    f"{self.cache_path} holds a cache with other settings:\n  " + "\n  ".join(differences)
                    + "\nUse another --cache_root, or delete that folder."
                )
            self.manifest = stored
        else:
            write_json(self.cache_path / schema.MANIFEST_FILE, manifest.to_json())

    def _new_part_name(self) -> str:
        return f"{self.writer_id}-{uuid.uuid4().hex[:12]}"

    def add_tensor(self, key: str, tensor: torch.Tensor) -> str:
        """Queue a tensor; returns the shard name it will be stored in."""
        tensor = tensor.detach().to("cpu").contiguous()
        self._tensors[key] = tensor
        self._pending_bytes += tensor.numel() * tensor.element_size()
        return self._part_name

    def add_row(self, row: schema.IndexRow) -> None:
        self._rows.append(row)

    def should_flush(self) -> bool:
        return self._pending_bytes >= self.shard_bytes

    def flush(self) -> None:
        """Make everything queued so far visible: the shard first, then its index part."""
        if not self._tensors and not self._rows:
            return
        name = self._part_name
        if self._tensors:
            tensors = self._tensors
            metadata = {"format_version": str(schema.FORMAT_VERSION),
                        schema.FINGERPRINT_METADATA: self.manifest.fingerprint,
                        schema.FAMILY_METADATA: self.manifest.model.family,
                        schema.CHECKSUMS_METADATA: json.dumps({key: schema.sha256_tensor(t)
                                                               for key, t in tensors.items()})}
            atomic_write(schema.shard_path(self.cache_path, name),
                         lambda temp: save_file(tensors, temp, metadata=metadata))
        if self._rows:
            write_index_part(self.cache_path, name, self._rows)
        self._tensors, self._rows, self._pending_bytes = {}, [], 0
        self._part_name = self._new_part_name()

    def write_selection(self, sample_ids: Iterable[str], repeats: Iterable[int] | None = None,
                        dataset_repeats: list[int] | None = None) -> None:
        """Record the samples of a finished run; training reads exactly these."""
        self.flush()
        write_selection(self.cache_path, sample_ids, repeats, dataset_repeats)
