"""A cache's files as data_schema lays them out: the manifest, the index parts (read again when a
concurrent compaction removes one), the selection, the source fingerprints and which shard holds
each stored tensor."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from safetensors import safe_open

from cogtune import data_schema as schema
from cogtune.errors import CogtuneError


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
