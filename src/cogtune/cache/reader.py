"""Reading a cache in the format of `data_schema`: the manifest, the index, the selection, and the
tensors of the selected samples; and whether a cache fits the model a run trains."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from safetensors import safe_open

from cogtune import data_schema as schema
from cogtune.errors import CogtuneError
from cogtune.families import ModelFamily
from cogtune.util import files


def read_manifest(cache_path: Path) -> schema.Manifest:
    path = Path(cache_path) / schema.MANIFEST_FILE
    if not path.is_file():
        raise CogtuneError(
            f"{cache_path} is not a cogtune cache (no {schema.MANIFEST_FILE}). Run `cogtune preprocess` to build one, "
            "or point --data_cache at a folder it wrote."
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CogtuneError(f"{path} is damaged ({e}); rebuild the cache with `cogtune preprocess`.") from None
    return schema.Manifest.from_json(data, str(cache_path))


def index_parts(cache_path: Path) -> list[Path]:
    """The index parts, first written first."""
    found = []
    for part in (Path(cache_path) / schema.INDEX_DIR).glob("*.parquet"):
        try:
            found.append((part.stat().st_mtime_ns, part.name, part))
        except FileNotFoundError:  # compacted away since the listing
            continue
    return [part for *_, part in sorted(found)]


class PartVanished(Exception):
    """An index part was compacted into another (cache.writer.compact_index) while it was read:
    reading again from a new listing finds its rows in the compacted part."""


def read_part_table(part: Path, columns: list[str] | None = None, **options) -> pa.Table:
    try:
        return pq.read_table(part, columns=columns, **options)
    except FileNotFoundError:
        raise PartVanished(part) from None
    except (pa.ArrowInvalid, OSError, KeyError) as e:
        raise CogtuneError(f"Cache index part {part} is damaged ({e}); delete it and rerun preprocess.") from None


def listing_retried(read):
    """read() again while index parts vanish under it (a compaction by another process ran)."""
    for _ in range(4):
        try:
            return read()
        except PartVanished:
            continue
    return read()


def read_index_part(part: Path) -> list[schema.IndexRow]:
    table = read_part_table(part)
    if table.schema.names != schema.INDEX_SCHEMA.names:
        raise CogtuneError(f"Cache index part {part} has unexpected columns; rebuild the cache.")
    return [schema.IndexRow(**row) for row in table.to_pylist()]


def read_index(cache_path: Path, damaged_parts: list | None = None) -> list[schema.IndexRow]:
    """One row per sample, in the order samples first appeared. A sample written more than once
    (a retried failure, two writers) keeps its first usable row, else its first row. A damaged
    index part raises CogtuneError, or is appended to damaged_parts when that list is given."""
    return listing_retried(lambda: _read_index(cache_path, damaged_parts))


def _read_index(cache_path: Path, damaged_parts: list | None) -> list[schema.IndexRow]:
    rows: dict[str, schema.IndexRow] = {}
    for part in index_parts(cache_path):
        try:
            part_rows = read_index_part(part)
        except CogtuneError:
            if damaged_parts is None:
                raise
            damaged_parts.append(part)
            continue
        for row in part_rows:
            known = rows.get(row.sample_id)
            if known is None or (not known.ok and row.ok):
                rows[row.sample_id] = row
    return list(rows.values())


def encoded_videos(cache_path: Path, shas: Iterable[str]) -> dict[str, dict[int, schema.VideoLatent]]:
    """Source sha256 -> its stored windows (start -> latents; one, at 0, in a cache of heads), for
    those of these videos the cache holds, so that another caption of a video reuses its latents.
    Reads whole rows of those only."""
    shas = list(shas)
    if not shas:
        return {}
    wanted = pa.array(shas, pa.string())

    def read():
        found: dict[str, dict[int, schema.VideoLatent]] = {}
        for part in index_parts(cache_path):
            table = read_part_table(part, filters=pc.is_in(pc.field("source_sha256"), value_set=wanted))
            for row in table.to_pylist():
                if row["status"] == schema.STATUS_OK:
                    windows = found.setdefault(row["source_sha256"], {})
                    windows.setdefault(schema.window_start(row["latent_key"]), schema.IndexRow(**row).video_latent())
        return found

    return listing_retried(read)


def samples_of_videos(cache_path: Path, sources: list[tuple[str, str]], repeats: list[int]
                      ) -> tuple[list[str], list[int]]:
    """The sample ids of every row (each window, or the failure) of these (video sha256, caption)
    pairs, in their order, windows by start; and each one's repeats (its pair's)."""
    wanted = pa.array([f"{sha}\n{caption}" for sha, caption in sources], pa.string())
    columns = index_columns(cache_path, ["sample_id", "source_sha256", "caption", "latent_key"])
    pairs = pc.binary_join_element_wise(columns["source_sha256"], columns["caption"], "\n")
    found = columns.filter(pc.is_in(pairs, value_set=wanted)).to_pylist()
    by_pair: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for row in found:
        start = schema.window_start(row["latent_key"]) if row["latent_key"] else 0
        by_pair.setdefault((row["source_sha256"], row["caption"]), []).append((start, row["sample_id"]))
    ids, times = [], []
    for pair, count in zip(sources, repeats):
        for _, sample_id in sorted(set(by_pair.get(pair, []))):
            ids.append(sample_id)
            times.append(count)
    return ids, times


def read_selection(cache_path: Path, as_arrow: bool = False) -> list[str] | pa.Array | None:
    """The sample ids of the last finished preprocess run (a list, or an Arrow array), or None if
    no run has finished."""
    path = Path(cache_path) / schema.SELECTION_FILE
    if not path.is_file():
        return None
    try:
        column = pq.read_table(path).column("sample_id")
        return column.combine_chunks() if as_arrow else column.to_pylist()
    except (pa.ArrowInvalid, OSError, KeyError) as e:
        raise CogtuneError(f"{path} is damaged ({e}); run `cogtune preprocess` again to rewrite it.") from None


def read_fingerprints(cache_path: Path) -> pa.Table:
    """The sources as the last preprocess runs saw them (FINGERPRINTS_SCHEMA: path, size, mtime_ns,
    content hash); empty when the cache has no fingerprints file or a damaged one (they are only a
    shortcut)."""
    path = Path(cache_path) / schema.FINGERPRINTS_FILE
    try:
        return pq.read_table(path, schema=schema.FINGERPRINTS_SCHEMA)
    except (FileNotFoundError, pa.ArrowInvalid, OSError):
        return schema.FINGERPRINTS_SCHEMA.empty_table()


def index_columns(cache_path: Path, names: list[str]) -> pa.Table:
    """These columns of every index row, parts in index_parts order: no Python object per row."""
    def read():
        return [read_part_table(part, columns=names) for part in index_parts(cache_path)]

    tables = listing_retried(read)
    if not tables:
        return pa.schema([schema.INDEX_SCHEMA.field(name) for name in names]).empty_table()
    return pa.concat_tables(tables).combine_chunks()


def stored_tensor_shards(cache_path: str | Path) -> dict[str, str]:
    """Tensor key -> shard name for every complete shard (reads only the shard headers)."""
    found = {}
    for path in schema.shard_paths(cache_path):
        try:
            with safe_open(str(path), framework="pt") as shard:
                found.update(dict.fromkeys(shard.keys(), path.stem))
        except Exception as e:  # safetensors raises its own error types
            raise CogtuneError(f"Cache shard {path} is damaged ({e}); run `cogtune cache prune --damaged "
                               f"{cache_path}`, then preprocess again.") from None
    return found


# What training reads of a sample (TrainingSamples), and nothing else of the index.
TRAINING_COLUMNS = ("sample_id", "status", "failure_kind", "num_frames", "height", "width", "latent_shape",
                    "latent_shard", "latent_key", "text_shard", "text_key", "image_noise_sigmas")


def _fixed_width(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A string column of keys as a numpy array of fixed-width bytes, without a Python str per row:
    keys of one length lie in the Arrow data buffer one after the other, which is that array."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not len(array):
        return np.zeros(0, "S1")
    lengths = pc.binary_length(array)
    width = max(1, pc.max(lengths).as_py() or 0)
    if array.null_count or pc.min(lengths).as_py() != width:  # not all one length: the slow way
        return array.to_numpy(zero_copy_only=False).astype(f"S{width}")
    start = int(np.frombuffer(array.buffers()[1], np.int32, count=1, offset=array.offset * 4)[0])
    return np.frombuffer(array.buffers()[2], dtype=f"S{width}", count=len(array), offset=start).copy()


_HEX = np.full(256, 255, np.uint8)
_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)


def sort_keys(ids: np.ndarray) -> list[np.ndarray]:
    """Integer columns that sort like the fixed-width ids: 16 hex digits to a uint64 (sample ids
    are hex), which numpy sorts far faster than bytes; the bytes themselves where they are not hex."""
    digits = _HEX[ids.view(np.uint8).reshape(len(ids), -1)] if len(ids) else np.zeros((0, 0), np.uint8)
    if digits.size and digits.max() > 15:
        return [ids]
    keys = []
    for start in range(0, digits.shape[1], 16):
        key = np.zeros(len(ids), np.uint64)
        for column in digits[:, start:start + 16].T:
            key = (key << np.uint64(4)) | column.astype(np.uint64)
        keys.append(key)
    return keys  # most significant first


def group_starts(keys: list[np.ndarray], order: np.ndarray) -> np.ndarray:
    """Where a new value of the keys begins along `order` (a lexsort of them): True at the first
    row of each group."""
    starts = np.zeros(len(order), bool)
    starts[:1] = True
    for key in keys:
        in_order = key[order]
        starts[1:] |= in_order[1:] != in_order[:-1]
    return starts


def _row_keys(rows: np.ndarray) -> np.ndarray:
    """One int64 per row of small non-negative ints ([N, K], K <= 4, each < 2**15), equal where the
    rows are equal and ordered as they are: np.unique on these is far faster than with axis=0."""
    if rows.size and (rows.min() < 0 or rows.max() >= 2**15 or rows.shape[1] > 4):
        return np.unique(rows, axis=0, return_inverse=True)[1].reshape(-1)  # (the slow way; same order)
    keys = np.zeros(len(rows), np.int64)
    for column in rows.T:
        keys = (keys << 16) | column.astype(np.int64)
    return keys


@dataclass(frozen=True, slots=True)
class TrainingSample:
    """What training reads of one sample (a row of TrainingSamples)."""

    sample_id: str
    num_frames: int
    height: int
    width: int
    latent_shape: list[int]
    latent_shard: str
    latent_key: str
    text_shard: str
    text_key: str
    image_variants: int

    def tensors(self, tensors: schema.TensorSet, text_length: int) -> list[tuple[str, str, tuple | None]]:
        return schema.sample_tensors(self, tensors, text_length)


class TrainingSamples:
    """The selected usable samples of a cache as columns, in sample-id order: about 150 bytes a
    sample in a few numpy arrays (fixed-width keys, shard names as codes), which DataLoader workers
    share with the training process without copying, where a list of index rows took 3.6 KB a
    sample and minutes to build at a million. Indexing gives a TrainingSample."""

    def __init__(self, columns: dict[str, np.ndarray], shard_names: list[str], failures: dict[str, int]):
        self.columns, self.shard_names = columns, shard_names
        self.failures = failures  # failure kind -> selected samples that failed so, most first
        self.failed = sum(failures.values())
        self.repeats: np.ndarray | None = None  # times per epoch of each sample; None: once each

    def set_repeats(self, ids: np.ndarray, repeats: np.ndarray) -> None:
        """Each sample's repeats, from the selection's (sample ids as S32, and their repeats)."""
        order = np.argsort(ids)
        self.repeats = repeats[order][np.searchsorted(ids[order], self.columns["sample_id"])].astype(np.int64)

    @classmethod
    def read(cls, cache_path: Path, selection: pa.Array) -> "TrainingSamples":
        """The samples of `selection` (sample ids), from the index parts, in sample-id order. Reads
        one part at a time and keeps only its selected rows, as numpy: no Python object per sample,
        and no more than one part in Arrow at once."""
        return listing_retried(lambda: cls._read(cache_path, selection))

    @classmethod
    def _read(cls, cache_path: Path, selection: pa.Array) -> "TrainingSamples":
        parts = index_parts(cache_path)
        # Which rows are selected, for all parts in one lookup (one hash set of the selection, not
        # one per part): the sample id column alone is small.
        ids = [read_part_table(part, columns=["sample_id"])["sample_id"] for part in parts]
        lengths = [len(column) for column in ids]
        chunks = [chunk for column in ids for chunk in column.chunks]
        selected = (pc.is_in(pa.chunked_array(chunks, pa.string()), value_set=selection).to_numpy(zero_copy_only=False)
                    if chunks else np.zeros(0, bool))
        selected_rows = np.split(selected, np.cumsum(lengths)[:-1]) if parts else []
        del ids, chunks, selected
        selection = pc.unique(selection)
        found: dict[str, list[np.ndarray]] = {}
        shard_names: dict[str, int] = {}  # shard name -> code, in the order first seen
        kinds: dict[str, int] = {}  # failure kind -> code, likewise
        for order, (part, in_selection) in enumerate(zip(parts, selected_rows)):
            rows = np.nonzero(in_selection)[0]
            if not len(rows):
                continue
            table = read_part_table(part, columns=list(TRAINING_COLUMNS))
            if len(table) != len(in_selection):
                raise PartVanished(part)  # replaced under the same name: list and read again
            table = table.take(pa.array(rows)).combine_chunks()
            for name in ("latent_shard", "text_shard"):
                for shard in pc.unique(table[name].drop_null()).to_pylist():
                    shard_names.setdefault(shard, len(shard_names))
            code = pa.array(list(shard_names), pa.string())
            failures = table["failure_kind"].fill_null("unreadable")  # (rows of caches before kinds were kept)
            for kind in pc.unique(failures).to_pylist():
                kinds.setdefault(kind, len(kinds))
            shape_type = table["latent_shape"].type
            shapes = pc.list_flatten(table["latent_shape"].fill_null(pa.scalar([0, 0, 0, 0], shape_type)))
            columns = {
                "sample_id": _fixed_width(table["sample_id"]),
                "latent_key": _fixed_width(table["latent_key"].fill_null("")),
                "text_key": _fixed_width(table["text_key"].fill_null("")),
                "latent_shard": pc.index_in(table["latent_shard"], value_set=code).fill_null(-1)
                .to_numpy(zero_copy_only=False).astype(np.int32),
                "text_shard": pc.index_in(table["text_shard"], value_set=code).fill_null(-1)
                .to_numpy(zero_copy_only=False).astype(np.int32),
                "latent_shape": shapes.to_numpy(zero_copy_only=False).astype(np.int32).reshape(len(table), 4),
                "size": np.stack([table[name].fill_null(0).to_numpy(zero_copy_only=False).astype(np.int32)
                                  for name in ("num_frames", "height", "width")], axis=-1).reshape(len(table), 3),
                "image_variants": pc.list_value_length(table["image_noise_sigmas"]).fill_null(0)
                .to_numpy(zero_copy_only=False).astype(np.int16),
                "ok": pc.equal(table["status"], schema.STATUS_OK).fill_null(False).to_numpy(zero_copy_only=False),
                "kind": pc.index_in(failures, value_set=pa.array(list(kinds), pa.string()))
                .to_numpy(zero_copy_only=False).astype(np.int16),
                "part": np.full(len(table), order, np.int32), "row": rows,
            }
            for name, column in columns.items():
                found.setdefault(name, []).append(column)
            del table
        if not found:
            empty = {"sample_id": np.zeros(0, "S32"), "latent_key": np.zeros(0, "S32"), "text_key": np.zeros(0, "S32"),
                     "latent_shard": np.zeros(0, np.int32), "text_shard": np.zeros(0, np.int32),
                     "latent_shape": np.zeros((0, 4), np.int32), "size": np.zeros((0, 3), np.int32),
                     "image_variants": np.zeros(0, np.int16), "ok": np.zeros(0, bool), "kind": np.zeros(0, np.int16),
                     "part": np.zeros(0, np.int32),
                     "row": np.zeros(0, np.int64)}
            found = {name: [column] for name, column in empty.items()}
        columns = {}
        for name in list(found):  # a column at a time, so that at most one is held twice
            parts = found.pop(name)
            columns[name] = np.concatenate(parts) if len(parts) > 1 else parts[0]
            del parts
        # One row per sample: its first usable row, else its first row (as read_index keeps them),
        # found by sorting (sample id, failed, part, row) as integers.
        keys = sort_keys(columns["sample_id"])
        order = np.lexsort((columns.pop("row"), columns.pop("part"), ~columns["ok"], *reversed(keys)))
        starts = group_starts(keys, order)  # where a new sample id begins in that order
        del keys
        first = order[starts]
        missing = len(selection) - len(first)
        if missing:
            raise CogtuneError(f"{cache_path}: {missing} selected samples have no index row (the cache is damaged). "
                               "Run `cogtune preprocess` again to rewrite them.")
        ok = columns.pop("ok")[first]
        usable = first[ok]
        failed_kinds = np.bincount(columns.pop("kind")[first[~ok]], minlength=len(kinds))
        names_of_kinds = list(kinds)
        failures = sorted(((names_of_kinds[k], int(n)) for k, n in enumerate(failed_kinds) if n),
                          key=lambda item: (-item[1], item[0]))
        # Shard codes in the order of the names, so that they do not depend on the parts' order.
        names = sorted(shard_names)
        recode = np.zeros(len(shard_names) + 1, np.int32)  # (a code of -1, no shard, stays -1)
        recode[-1] = -1
        for new, name in enumerate(names):
            recode[shard_names[name]] = new
        for name in list(columns):  # likewise
            columns[name] = columns[name][usable]
        for name in ("latent_shard", "text_shard"):
            columns[name] = recode[columns[name]]
        return cls(columns, names, failures=dict(failures))

    def __len__(self) -> int:
        return len(self.columns["sample_id"])

    def __getitem__(self, index: int) -> TrainingSample:
        c = self.columns
        frames, height, width = (int(v) for v in c["size"][index])
        return TrainingSample(
            sample_id=c["sample_id"][index].decode(), num_frames=frames, height=height, width=width,
            latent_shape=c["latent_shape"][index].tolist(), latent_shard=self.shard_names[c["latent_shard"][index]],
            latent_key=c["latent_key"][index].decode(), text_shard=self.shard_names[c["text_shard"][index]],
            text_key=c["text_key"][index].decode(), image_variants=int(c["image_variants"][index]))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def latent_shapes(self) -> list[tuple]:
        return [tuple(shape) for shape in self.columns["latent_shape"].tolist()]

    @property
    def shape_groups(self) -> list[int]:
        """A number per sample, the same for samples of the same latent shape (what batching needs)."""
        return np.unique(_row_keys(self.columns["latent_shape"]), return_inverse=True)[1].reshape(-1).tolist()

    @property
    def buckets(self) -> dict[str, int]:
        """Bucket name (FRAMESxHEIGHTxWIDTH) -> samples, in name order."""
        keys, first, counts = np.unique(_row_keys(self.columns["size"]), return_index=True, return_counts=True)
        sizes = self.columns["size"][first].tolist()
        return dict(sorted(("x".join(map(str, size)), int(n)) for size, n in zip(sizes, counts)))

    @property
    def clip_sizes(self) -> set[tuple[int, int, int]]:
        _, first = np.unique(_row_keys(self.columns["size"]), return_index=True)
        return {tuple(size) for size in self.columns["size"][first].tolist()}

    @property
    def digest(self) -> str:
        """Which samples these are: their count and a digest of their ids (in id order)."""
        ids = np.ascontiguousarray(self.columns["sample_id"])
        digest = hashlib.sha256(ids.tobytes())
        if self.repeats is not None:  # other repeats are another run
            digest.update(np.ascontiguousarray(self.repeats, dtype="<i8").tobytes())
            return f"{len(ids)} samples ({int(self.repeats.sum())} per epoch), sha256 {digest.hexdigest()[:16]}"
        return f"{len(ids)} samples, sha256 {digest.hexdigest()[:16]}"

    @property
    def nbytes(self) -> int:
        return sum(column.nbytes for column in self.columns.values())


@dataclass
class Cache:
    """A finished cache opened for reading: the selected samples, in the order of their sample ids
    (content keys), and lazy tensor access."""

    path: Path
    manifest: schema.Manifest
    samples: list[schema.IndexRow] | TrainingSamples  # the selected samples with status ok
    failed: list[schema.IndexRow] = field(default_factory=list)  # (empty when opened for training)
    failed_count: int = 0
    verify_checksums: bool = False  # check each tensor read against its shard's recorded sha256
    _handles: dict = field(default_factory=dict, repr=False)
    _checksums: dict = field(default_factory=dict, repr=False)  # shard name -> {key: sha256}

    @classmethod
    def open(cls, path: str | Path, for_training: bool = False) -> "Cache":
        """The cache at path. for_training: the samples as TrainingSamples (columns; no failed rows,
        only their count in `failed_count`), which is what a run over a million samples can hold."""
        path = Path(path)
        manifest = read_manifest(path)
        selection = read_selection(path, as_arrow=for_training)
        if selection is None:
            raise CogtuneError(
                f"{path} has no {schema.SELECTION_FILE}: its preprocess run did not finish. Run `cogtune preprocess` "
                "again with the same settings; it resumes where it stopped."
            )
        if for_training:
            samples = TrainingSamples.read(path, selection)
            repeats = read_selection_repeats(path)
            if repeats is not None:
                samples.set_repeats(*repeats)
            return cls(path=path, manifest=manifest, samples=samples, failed_count=samples.failed,
                       verify_checksums=True)
        selected = set(selection)
        rows = [row for row in read_index(path) if row.sample_id in selected]
        missing = selected - {row.sample_id for row in rows}
        if missing:
            raise CogtuneError(
                f"{path}: {len(missing)} selected samples have no index row (the cache is damaged). "
                "Run `cogtune preprocess` again to rewrite them."
            )
        # In the order of their content keys: training shuffles positions in this list, so it must
        # not depend on which process wrote a sample, when, or on the index parts' modification times.
        rows.sort(key=lambda row: row.sample_id)
        failed = [row for row in rows if not row.ok]
        return cls(path=path, manifest=manifest, samples=[row for row in rows if row.ok], failed=failed,
                   failed_count=len(failed))

    def _shard(self, name: str):
        handle = self._handles.get(name)
        if handle is None:
            path = schema.shard_path(self.path, name)
            try:
                handle = safe_open(str(path), framework="pt")
                stamp = (handle.metadata() or {}).get(schema.FINGERPRINT_METADATA)
            except Exception as e:  # safetensors raises its own error types
                raise CogtuneError(f"Cache shard {path} cannot be read ({e}); run `cogtune cache verify "
                                   f"{self.path}`.") from None
            if stamp is not None and stamp != self.manifest.fingerprint:  # (shards of version 5 have none)
                raise CogtuneError(f"Cache shard {path} belongs to another cache (fingerprint {stamp}, this cache's "
                                   f"is {self.manifest.fingerprint}): it was copied in by hand. Remove it, run "
                                   f"`cogtune cache prune --damaged {self.path}`, and preprocess again.")
            self._handles[name] = handle
        return handle

    def _tensor(self, shard_name: str, key: str, sample_id: str) -> torch.Tensor:
        """A stored tensor; with verify_checksums, refused unless it hashes to what its shard
        recorded when it was written (a flipped byte is never trained on)."""
        shard = self._shard(shard_name)
        tensor = shard.get_tensor(key)
        if self.verify_checksums:
            recorded = self._checksums.get(shard_name)
            if recorded is None:
                try:
                    recorded = json.loads((shard.metadata() or {}).get(schema.CHECKSUMS_METADATA, "{}"))
                except json.JSONDecodeError:
                    recorded = {}
                self._checksums[shard_name] = recorded
            if schema.sha256_tensor(tensor) != recorded.get(key):
                raise CogtuneError(
                    f"Sample {sample_id}: tensor {key} in {schema.shard_path(self.path, shard_name)} does not match the "
                    f"checksum recorded when it was written (the file is corrupt). Run `cogtune cache verify {self.path}`, "
                    f"then `cogtune cache prune --damaged {self.path}` and preprocess again; checkpoints are intact.")
        return tensor

    def stored_tensor(self, shard_name: str, key: str) -> torch.Tensor:
        """A tensor by shard and key (checked as every read is), for copying into another cache."""
        return self._tensor(shard_name, key, key)

    def video_tensors(self, row: schema.IndexRow) -> dict[str, torch.Tensor]:
        """A sample's video tensors by name (TensorSet.video), each [C, F, H, W]."""
        return {name: self._tensor(row.latent_shard, schema.video_tensor_key(row.latent_key, name), row.sample_id)
                for name in self.manifest.tensors.video}

    @property
    def image_noise_variants(self) -> int:
        """Noised first-frame encodings per video: 0 for a text-to-video cache."""
        return self.manifest.settings.image_noise_variants

    def first_frame_tensors(self, row: schema.IndexRow) -> dict[str, torch.Tensor]:
        """Every noised first-frame encoding's tensors by name (TensorSet.first_frame), each [K, C, 1, H, W]."""
        return {name: torch.stack([self._tensor(row.latent_shard, schema.first_frame_tensor_key(row.latent_key, k, name),
                                                row.sample_id) for k in range(row.image_variants)])
                for name in self.manifest.tensors.first_frame}

    def caption_tensors(self, row: schema.IndexRow) -> dict[str, torch.Tensor]:
        """A sample's caption tensors by name (TensorSet.caption), each [text length, ...]."""
        return {name: self._tensor(row.text_shard, schema.caption_tensor_key(row.text_key, name), row.sample_id)
                for name in self.manifest.tensors.caption}

    def __getstate__(self):  # DataLoader workers reopen shards themselves
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state


def read_validation_inputs(cache_path: Path, entries: list
                           ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[tuple, dict[str, torch.Tensor]]]:
    """The cached caption tensors of every validation prompt and of "" (the negative prompt), and the
    first-frame tensors of every validation image at its entry's height x width, by (image, height,
    width); a CogtuneError naming whatever preprocess has not encoded."""
    from safetensors.torch import load_file

    text_paths = {text: schema.validation_text_path(cache_path, text) for text in [*(e.prompt for e in entries), ""]}
    image_paths = {(e.image, e.height, e.width): schema.validation_image_path(cache_path, files.sha256_file(e.image),
                                                                             e.height, e.width)
                   for e in entries if e.image is not None}
    missing = [repr(text) if text else "the empty negative prompt" for text, path in text_paths.items()
               if not path.is_file()]
    missing += [f"image {image} at {height}x{width}" for (image, height, width), path in image_paths.items()
                if not path.is_file()]
    if missing:
        raise CogtuneError(
            f"The cache {cache_path} holds no encoding of these validation inputs: {', '.join(missing)}. Run "
            "`cogtune preprocess` with the same --validation_prompt (and --validation_images) or --validation_file: "
            "it encodes only "
            "what is missing, so that training never needs a text encoder."
        )
    embeds = {text: load_file(path) for text, path in text_paths.items()}
    images = {image: load_file(path) for image, path in image_paths.items()}
    return embeds, images


def read_empty_prompt_embeds(cache_path: Path) -> dict[str, torch.Tensor]:
    """The cached caption tensors of the empty prompt, by name."""
    from safetensors.torch import load_file

    path = schema.validation_text_path(cache_path, "")
    if not path.is_file():
        raise CogtuneError(
            f"The cache {cache_path} holds no embedding of the empty prompt, which --caption_dropout_technique empty "
            "trains on (it was written before preprocess stored it). Run `cogtune preprocess` with the same settings "
            "once more: it encodes that one prompt and nothing else. Or use --caption_dropout_technique zero.")
    return load_file(path)


def read_selection_repeats(cache_path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The selection's sample ids (S32) and repeats, or None when every sample is trained once."""
    path = Path(cache_path) / schema.SELECTION_FILE
    if "repeats" not in pq.read_schema(path).names:  # (the file's footer only)
        return None
    table = pq.read_table(path)
    return (table["sample_id"].to_numpy(zero_copy_only=False).astype("S32"),
            table["repeats"].to_numpy(zero_copy_only=False).astype(np.int64))


def read_dataset_repeats(cache_path: Path) -> list[int] | None:
    """The [[datasets]] repeats of the preprocess run that wrote the selection (None: no datasets)."""
    metadata = pq.read_schema(Path(cache_path) / schema.SELECTION_FILE).metadata or {}
    value = metadata.get(schema.DATASET_REPEATS_KEY)
    return json.loads(value) if value else None


def check_compatible(manifest: schema.Manifest, model: dict, cache_path: Path) -> None:
    """Refuse a cache whose tensors came from another family, other encoders or other encoder weights
    than model's (ModelConfigs.identity())."""
    built_for = manifest.model
    expected = {"family": model["family"], "components": model["components"]}
    if built_for.weights_sha256 is not None and model.get(schema.WEIGHTS_DIGEST) is not None:
        expected[schema.WEIGHTS_DIGEST] = model[schema.WEIGHTS_DIGEST]  # the same configs, other weights
    differences = schema.describe_differences(expected, {k: getattr(built_for, k) for k in expected})
    if differences:
        raise CogtuneError(
            f"The cache {cache_path} was built for another model: {built_for.pretrained_model_name_or_path}, "
            f"a {built_for.description} model, not {model['pretrained_model_name_or_path']}, a "
            f"{model['description']} model. Their encoders differ:\n  " + "\n  ".join(differences)
            + "\nPreprocess the data with the model you train, or train the model the cache was built for."
        )


def check_for_training(manifest: schema.Manifest, model: dict, spec: ModelFamily, cache_path: Path) -> None:
    """Refuse a cache that the model to train cannot use: another VAE or T5, the other kind of model
    (text- or image-to-video), another text length."""
    check_compatible(manifest, model, cache_path)
    variants = manifest.settings.image_noise_variants
    if spec.image_conditioned and not variants:
        raise CogtuneError(
            f"The cache {cache_path} was built for a text-to-video model and holds no first-frame latents, but "
            f"the model to train is a {spec.description} model. Preprocess the data with this model first."
        )
    if variants and not spec.image_conditioned:
        raise CogtuneError(
            f"The cache {cache_path} was built for an image-to-video model, but the model to train is a "
            f"{spec.description} model. Preprocess the data with this model first."
        )
    if manifest.tensors != spec.tensors:
        raise CogtuneError(
            f"The cache {cache_path} holds the tensors {manifest.tensors.to_json()}, but a {spec.description} model "
            f"trains on {spec.tensors.to_json()}. Preprocess the data with this model first.")
    cached_text_length = manifest.settings.text_length
    if cached_text_length != spec.text_length:
        raise CogtuneError(
            f"The cache {cache_path} holds text embeddings of {cached_text_length} tokens but the transformer takes "
            f"{spec.text_length}."
        )


def sibling_caches(cache_path: Path, manifest: schema.Manifest) -> list[Path]:
    """The other caches beside this one (under its cache root) of the same model and tensor settings,
    whose datasets differ: they hold the same bytes for the same content, since every encoding depends
    only on the content, the model and these settings. Newest first."""
    wanted = manifest.identity_json()
    siblings = []
    for other in Path(cache_path).parent.glob(f"*/{schema.MANIFEST_FILE}"):
        if other.parent.resolve() == Path(cache_path).resolve():
            continue
        try:
            theirs = read_manifest(other.parent).identity_json()
        except CogtuneError:  # another release's or damaged: not ours to copy from
            continue
        if all(theirs[key] == wanted[key] for key in ("model", "settings", "tensors")):
            siblings.append(other.parent)
    return sorted(siblings, key=lambda path: (path / schema.MANIFEST_FILE).stat().st_mtime, reverse=True)


def sibling_tensor_reader(cache_path: Path) -> "Cache":
    """A reader of a sibling cache's tensors by shard and key, each checked against its checksum."""
    return Cache(path=Path(cache_path), manifest=read_manifest(cache_path), samples=[], verify_checksums=True)
