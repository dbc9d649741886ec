"""What a preprocess run has to do: fingerprint every source file, see what the cache already
holds, and share the rest among the processes.

Built for datasets of a million clips: each process resolves, stats and (where the file changed)
hashes only its share of the sources, and what the cache holds is read as Arrow columns, never as
a Python object per index row."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cogtune import data_schema as schema
from cogtune.cache.disk import index_columns
from cogtune.data.sources import Record, VideoPaths
from cogtune.data.video import decode_cost
from cogtune.errors import CogtuneError
from cogtune.util import files, logs
from cogtune.util.distributed import Processes, balance

INDEX_COLUMNS = ["sample_id", "status", "latent_key", "source_path", "source_size", "source_mtime_ns",
                 "source_sha256"]


@dataclass
class CacheHolds:
    """What a preprocess run needs to know of the cache, as Arrow arrays."""

    done: pa.Array  # sample ids with an index row (encoded, or failed in an earlier run)
    usable: pa.Array  # sample ids with a usable row
    latents: pa.Array  # video keys whose latents are stored
    fingerprints: pa.Table  # the fingerprints file (FINGERPRINTS_SCHEMA)
    known: pa.Table  # sources as last seen: the fingerprints file, then the index rows

    @classmethod
    def read(cls, cache_path: Path, fingerprints: pa.Table) -> "CacheHolds":
        index = index_columns(cache_path, INDEX_COLUMNS)
        ok = pc.equal(index["status"], schema.STATUS_OK).fill_null(False)
        rows = index.select(schema.FINGERPRINTS_SCHEMA.names).drop_null().cast(schema.FINGERPRINTS_SCHEMA)
        # A row's source_sha256 is its clips' identity (schema.clip_source), the content's only at the
        # top-level clip settings: the fingerprints file, written before any row, speaks for its paths.
        rows = rows.filter(pc.invert(pc.is_in(rows["source_path"], value_set=fingerprints["source_path"])))
        return cls(done=_array(pc.unique(index["sample_id"])), usable=_array(index["sample_id"].filter(ok)),
                   latents=_array(pc.unique(index["latent_key"].filter(ok))),
                   fingerprints=fingerprints, known=pa.concat_tables([fingerprints, rows]))


def _array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _in(values: list[str] | pa.Array, value_set: pa.Array) -> list[bool]:
    return pc.is_in(pa.array(values, pa.string()), value_set=value_set).to_pylist()


@dataclass(frozen=True)
class PlannedSample:
    """A dataset record with the content identity of its video file."""

    record: Record
    source: schema.SampleSource

    @property
    def video_key(self) -> str:
        return schema.video_key(self.source.source_sha256)


@dataclass
class Plan:
    sample_ids: list[str]  # every record's, in dataset order: the selection of this run
    sample_sources: list[tuple[str, str]]  # every record's (video sha256, caption), in dataset order
    missing: list[PlannedSample]  # the samples without an index row
    captions_needed: list[str]  # captions without a stored embedding
    videos_needed: list[tuple[str, Path]]  # (sha256, path) of videos without stored latents
    reused_videos: int
    reused_captions: int
    known_failures: int  # failed in an earlier run, not tried again
    by_video: dict[str, list[PlannedSample]] = field(default_factory=dict)  # missing samples per video sha256
    clip_settings: dict[str, str] = field(default_factory=dict)  # clip source -> its dataset's own clip settings
    hashed: int = 0  # source files read whole for their hash, by all processes
    fingerprints: pa.Table | None = None  # the fingerprints file after this run; None: unchanged


def plan(records: list[Record], holds: CacheHolds, stored_tensors: dict[str, str], tensors: schema.TensorSet,
         procs: Processes, allow_symlinks_outside_root: bool = False) -> Plan:
    """Fingerprint every source (each process resolves, stats and hashes a share) and see what the
    cache lacks. A new file that is plainly no video (text, an image) is a mistake in the dataset:
    say so before any work."""
    share = range(procs.rank, len(records), procs.world_size)
    mine, error, videos = [], None, VideoPaths(allow_symlinks_outside_root)
    for i in logs.progress(share, desc="checking sources", unit="file", leave=False, disable=not procs.is_main):
        try:
            path, info = videos.resolve(records[i])
        except CogtuneError as e:
            error = (i, str(e))
            break
        except OSError as e:
            error = (i, f"{records[i].where}: {records[i].video} cannot be read ({e.strerror}).")
            break
        mine.append((path, info.st_size, info.st_mtime_ns))
    errors = [e for e in procs.gather(error) if e is not None]
    if errors:  # every process raises the first one, in dataset order
        raise CogtuneError(min(errors)[1])
    paths, sizes, mtimes = (list(column) for column in zip(*mine)) if mine else ([], [], [])
    shas, hashed = _content_hashes(paths, sizes, mtimes, holds.known)
    keys = [schema.clip_source(sha, records[i].clip_settings) for i, sha in zip(share, shas)]
    ids = [schema.sample_id(key, records[i].caption) for i, key in zip(share, keys)]
    done = _in(ids, holds.done)  # an index row already: encoded, or failed before
    parts = procs.gather((paths, sizes, mtimes, shas, ids, keys, done, hashed))
    # Every record's columns in dataset order: record i is item i // world_size of process i % world_size.
    def in_order(column: int) -> list:
        values = [None] * len(records)
        for rank, part in enumerate(parts):
            values[rank::procs.world_size] = part[column]
        return values

    paths, sizes, mtimes, shas, ids, keys, have_row = (in_order(column) for column in range(7))
    missing = [  # source_sha256: the clips' identity (the content's sha256 at the top-level clip settings)
        PlannedSample(records[i], schema.SampleSource(sample_id=ids[i], source_path=paths[i], source_size=sizes[i],
                                                      source_mtime_ns=mtimes[i], source_sha256=keys[i],
                                                      caption=records[i].caption))
        for i in range(len(records)) if not have_row[i]]
    captions_needed = sorted({s.source.caption for s in missing
                              if not all(key in stored_tensors
                                         for key in schema.caption_tensor_keys(s.source.caption, tensors))})
    by_video: dict[str, list[PlannedSample]] = {}
    for s in missing:
        by_video.setdefault(s.source.source_sha256, []).append(s)
    encoded = _in([schema.video_key(sha) for sha in by_video], holds.latents)
    video_shas = pa.array(keys, pa.string())
    distinct_videos = pc.unique(pc.utf8_slice_codeunits(video_shas, 0, 32)) if shas else pa.array([], pa.string())
    return Plan(
        sample_ids=ids, sample_sources=[(key, record.caption) for key, record in zip(keys, records)],
        clip_settings={key: record.clip_settings for key, record in zip(keys, records) if record.clip_settings},
        missing=missing, captions_needed=captions_needed,
        videos_needed=[(sha, Path(group[0].source.source_path)) for (sha, group), stored in zip(by_video.items(), encoded)
                       if not stored],
        reused_videos=pc.sum(pc.is_in(distinct_videos, value_set=holds.latents)).as_py() or 0,
        reused_captions=len({record.caption for record in records}) - len(captions_needed),
        known_failures=sum(have and not ok for have, ok in zip(have_row, _in(ids, holds.usable))),
        by_video=by_video, hashed=sum(part[7] for part in parts),
        fingerprints=_updated(holds.fingerprints, paths, sizes, mtimes, shas) if procs.is_main else None,
    )


def _content_hashes(paths: list[str], sizes: list[int], mtimes: list[int], known: pa.Table) -> tuple[list[str], int]:
    """The sha256 of each of these files: the one recorded for its path, size and mtime where there
    is one (an Arrow join, no Python object per recorded file), else read whole (counted in the
    second value)."""
    keys = ["source_path", "source_size", "source_mtime_ns"]
    mine = pa.table({"source_path": pa.array(paths, pa.string()), "source_size": pa.array(sizes, pa.int64()),
                     "source_mtime_ns": pa.array(mtimes, pa.int64()),
                     "order": pa.array(np.arange(len(paths), dtype=np.int64))})
    recorded = known.group_by(keys, use_threads=False).aggregate([("source_sha256", "min")])  # a key once
    joined = mine.join(recorded, keys=keys, join_type="left outer", use_threads=False)
    shas = [None] * len(paths)
    for order, sha in zip(joined["order"].to_pylist(), joined["source_sha256_min"].to_pylist()):
        shas[order] = sha
    hashed = 0
    for i, sha in enumerate(shas):
        if sha is None:
            shas[i] = files.sha256_file(Path(paths[i]))
            hashed += 1
    return shas, hashed


def _updated(fingerprints: pa.Table, paths: list[str], sizes: list[int], mtimes: list[int],
             shas: list[str]) -> pa.Table | None:
    """The fingerprints file after this run, by path (this run's entries for the paths it saw, the
    file's for the others), or None where that is what the file holds already."""
    seen = pa.table({"source_path": pa.array(paths, pa.string()), "source_size": pa.array(sizes, pa.int64()),
                     "source_mtime_ns": pa.array(mtimes, pa.int64()), "source_sha256": pa.array(shas, pa.string())})
    seen = seen.group_by(schema.FINGERPRINTS_SCHEMA.names, use_threads=False).aggregate([])  # a path once
    others = fingerprints.filter(pc.invert(pc.is_in(fingerprints["source_path"], value_set=seen["source_path"])))
    updated = pa.concat_tables([others, seen.select(schema.FINGERPRINTS_SCHEMA.names).cast(schema.FINGERPRINTS_SCHEMA)])
    updated = updated.sort_by([(name, "ascending") for name in schema.FINGERPRINTS_SCHEMA.names])
    return None if updated.equals(fingerprints) else updated


def my_videos(videos: list[tuple[str, Path]], procs: Processes) -> list[tuple[str, Path]]:
    """This process's share of the videos to encode, balanced by decode cost."""
    if procs.world_size == 1 or not videos:
        return videos
    mine = {i: decode_cost(path) for i, (_, path) in enumerate(videos) if i % procs.world_size == procs.rank}
    costs = {i: cost for part in procs.gather(mine) for i, cost in part.items()}
    owner = balance([costs[i] for i in range(len(videos))], procs.world_size)
    return [video for video, rank in zip(videos, owner) if rank == procs.rank]


def failure_limit(max_failures: float | None, clips: int) -> int | None:
    """The number of failed clips a run tolerates: --max_failures N >= 1 (a count), or F < 1 (a
    fraction of the clips this run decodes)."""
    if max_failures is None:
        return None
    return int(max_failures) if max_failures >= 1 else math.floor(max_failures * clips)
