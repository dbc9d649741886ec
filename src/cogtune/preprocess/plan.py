"""What a preprocess run has to do: fingerprint every source file, see what the cache already
holds, and share the rest among the processes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from cogtune import data_schema as schema
from cogtune.data.sources import Record
from cogtune.data.video import decode_cost, not_a_video
from cogtune.errors import CogtuneError
from cogtune.util import files, logs
from cogtune.util.distributed import Processes, balance


class SourceFingerprints:
    """Content hashes of source files, reusing the hash of a file whose size and mtime are unchanged
    since an index row or the fingerprints file (read_fingerprints) recorded them."""

    def __init__(self, index_rows: list[schema.IndexRow], recorded: dict[tuple[str, int, int], str] | None = None):
        self.known = dict(recorded or {})
        self.known.update({(r.source_path, r.source_size, r.source_mtime_ns): r.source_sha256 for r in index_rows})
        self.hashed = 0  # files read whole for their hash in this run

    def fingerprint(self, path: Path) -> tuple[int, int, str]:
        stat = path.stat()
        sha = self.known.get((str(path), stat.st_size, stat.st_mtime_ns))
        if sha is None:
            sha = files.sha256_file(path)
            self.hashed += 1
        return stat.st_size, stat.st_mtime_ns, sha


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
    samples: list[PlannedSample]  # every record, in dataset order: the selection of this run
    missing: list[PlannedSample]  # the samples without an index row
    captions_needed: list[str]  # captions without a stored embedding
    videos_needed: list[tuple[str, Path]]  # (sha256, path) of videos without stored latents
    reused_videos: int
    reused_captions: int
    known_failures: int  # failed in an earlier run, not tried again
    by_video: dict[str, list[PlannedSample]] = field(default_factory=dict)  # missing samples per video sha256
    hashed: int = 0  # source files read whole for their hash, by all processes
    fingerprints: dict[tuple[str, int, int], str] = field(default_factory=dict)  # as the fingerprints file should be


def plan(records: list[Record], index_rows: list[schema.IndexRow], stored_tensors: dict[str, str],
         procs: Processes, recorded: dict[tuple[str, int, int], str] | None = None) -> Plan:
    """Fingerprint every source (each process a share; `recorded`: the cache's fingerprints file)
    and see what the cache lacks. A new file that is plainly no video (text, an image) is a mistake
    in the dataset: say so before any work."""
    done = {row.sample_id: row for row in index_rows}  # encoded, or failed in an earlier run
    latents = {row.latent_key for row in index_rows if row.ok}
    sources = SourceFingerprints(index_rows, recorded)
    mine = {}
    for i in logs.progress(range(procs.rank, len(records), procs.world_size), desc="fingerprinting", unit="file",
                           leave=False, disable=not procs.is_main):
        size, mtime_ns, sha = sources.fingerprint(records[i].video)
        unseen = schema.sample_id(sha, records[i].caption) not in done
        mine[i] = (size, mtime_ns, sha, not_a_video(records[i].video) if unseen else None)
    hashed = sum(procs.gather(sources.hashed))
    fingerprints = {i: f for part in procs.gather(mine) for i, f in part.items()}
    samples = []
    for i, record in enumerate(records):
        size, mtime_ns, sha, not_video = fingerprints[i]
        if not_video:
            raise CogtuneError(f"{record.where}: {record.video} is not a video ({not_video}). Fix the dataset row or "
                               "remove it; nothing has been encoded yet.")
        samples.append(PlannedSample(record, schema.SampleSource(
            sample_id=schema.sample_id(sha, record.caption), source_path=str(record.video), source_size=size,
            source_mtime_ns=mtime_ns, source_sha256=sha, caption=record.caption)))
    missing = [s for s in samples if s.source.sample_id not in done]
    captions_needed = sorted({s.source.caption for s in missing
                              if schema.text_tensor_key(schema.caption_key(s.source.caption)) not in stored_tensors})
    by_video: dict[str, list[PlannedSample]] = {}
    for s in missing:
        by_video.setdefault(s.source.source_sha256, []).append(s)
    return Plan(
        samples=samples, missing=missing, captions_needed=captions_needed,
        videos_needed=[(sha, group[0].record.video) for sha, group in by_video.items()
                       if schema.video_key(sha) not in latents],
        reused_videos=len({s.source.source_sha256 for s in samples if s.video_key in latents}),
        reused_captions=len({s.source.caption for s in samples}) - len(captions_needed),
        known_failures=sum(s.source.sample_id in done and not done[s.source.sample_id].ok for s in samples),
        by_video=by_video, hashed=hashed, fingerprints=_updated(recorded or {}, samples),
    )


def _updated(recorded: dict[tuple[str, int, int], str], samples: list[PlannedSample]) -> dict:
    """The fingerprints file after this run: one entry per path, this run's where it saw the path."""
    seen = {(s.source.source_path, s.source.source_size, s.source.source_mtime_ns): s.source.source_sha256
            for s in samples}
    paths = {path for path, _, _ in seen}
    return {**{key: sha for key, sha in recorded.items() if key[0] not in paths}, **seen}


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
