"""The selected samples of a cache as columns (what a run over a million samples can hold): the
fixed-width keys, their sort order and groups, and the samples training reads."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cogtune import data_schema as schema
from cogtune.cache.disk import PartVanished, index_parts, listing_retried, read_part_table
from cogtune.errors import CogtuneError


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
