"""Stage 1: dataset records -> decoded clips -> VAE moments and T5 embeddings -> the cache.
`plan` finds what the cache lacks, `encode` runs T5 and the VAE; this module writes the rows.

Only what the cache does not hold yet is encoded: a video whose content hash has latents, or a
caption whose text has an embedding, is reused, and a clip that failed before is not tried again
(`cogtune cache prune` forgets failures). The VAE and T5 are loaded only when there is something
for them to do, one after the other. SIGTERM or SIGUSR1 make the run save what it has encoded and
stop (exit status 75); running it again continues.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections import Counter
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cogtune import data_schema as schema
from cogtune.cache.identity import CacheIdentity, cache_identity, record_preprocess_run
from cogtune.cache.disk import encoded_videos, read_fingerprints, samples_of_videos, stored_tensor_shards
from cogtune.cache.reader import Cache, sibling_caches, sibling_tensor_reader
from cogtune.cache.tool import is_unfinished_and_empty
from cogtune.cache.writer import CacheWriter, cache_lock, compact_index, write_fingerprints
from cogtune.config import PreprocessConfig
from cogtune.data.buckets import clip_sizes, configured_buckets
from cogtune.data.sources import dataset_clip_configs, dataset_tables, load_dataset_records
from cogtune.data.validation import checked_validation_entries
from cogtune.errors import CogtuneError
from cogtune.families import ModelConfigs
from cogtune.preprocess.encode import encode_captions, encode_validation, encode_videos
from cogtune.preprocess.memory import choose_vae_memory, vae_room_problem
from cogtune.preprocess.plan import CacheHolds, my_videos, plan
from cogtune.util import files, logs
from cogtune.util.devices import encoding_device_and_dtype
from cogtune.util.tensor_bytes import gib
from cogtune.util.distributed import Processes, is_main_process, processes
from cogtune.util.signals import StopRequests


@dataclass
class PreprocessResult:
    cache_path: Path
    samples: int
    failed: int
    skipped_by_kind: dict
    buckets: dict  # bucket name -> samples
    encoded_videos: int
    encoded_captions: int
    reused_videos: int
    reused_captions: int
    known_failures: int  # failed in an earlier run, not tried again
    seconds: float
    copied_videos: int = 0  # videos whose latents a sibling cache held, copied instead of encoded
    copied_captions: int = 0
    hashed: int = 0  # source files read whole for their content hash (the others were unchanged)
    sources: int = 0  # dataset records
    is_main_process: bool = True
    validation_files: int = 0  # validation prompt embeddings and image latents written this run
    stages: dict = field(default_factory=dict)  # "captions"/"videos" -> StageFigures of this process
    short: dict = field(default_factory=dict)  # without buckets: bucket name -> samples shorter than --max_num_frames
    max_num_frames: int = 0
    windows: dict = field(default_factory=dict)  # --frame_extraction with windows: windows a clip gave -> clips

    def summary(self) -> str:
        return (
            f"cache: {self.cache_path}\n"
            f"samples: {self.samples} ok, {self.failed} skipped"
            + "".join(f"\n  skipped, {kind}: {count}" for kind, count in self.skipped_by_kind.items())
            + "\nbuckets: " + ", ".join(f"{name} ({count})" for name, count in self.buckets.items())
            + (f"\nwindows: {sum(self.windows.values())} clips gave {sum(n * c for n, c in self.windows.items())}; "
               "per clip: " + ", ".join(f"{n} ({c} clip{'s' if c > 1 else ''})" for n, c in sorted(self.windows.items()))
               if self.windows else "") + "\n"
            f"encoded: {self.encoded_videos} videos, {self.encoded_captions} captions; "
            f"reused from the cache: {self.reused_videos} videos, {self.reused_captions} captions "
            f"({self.seconds:.1f} s)\n"
            + (f"copied from other caches of these settings (no encoding): {self.copied_videos} videos, "
               f"{self.copied_captions} captions\n" if self.copied_videos or self.copied_captions else "") +
            f"hashed: {self.hashed} of {self.sources} source files (the others unchanged since last hashed)"
            + (f"\nvalidation: {self.validation_files} prompt embedding(s) or image latent(s) encoded"
               if self.validation_files else "")
            + (f"\n{self.known_failures} clips failed in an earlier run and were not tried again; "
               "`cogtune cache prune` forgets failures so that the next run retries them" if self.known_failures
               else "")
            + "".join(f"\n{figures.line(name)}" for name, figures in self.stages.items())
            + (f"\nshorter than --max_num_frames {self.max_num_frames}: {sum(self.short.values())} sample(s), each kept "
               f"as the largest 4k+1 frames its clip holds ({', '.join(f'{n} ({c})' for n, c in self.short.items())}); "
               "a batch holds one size, so they train in batches of their own. Use buckets, or a lower "
               "--max_num_frames, to choose; `cogtune preprocess --preview` shows them." if self.short else "")
        )


@dataclass
class StageFigures:
    """What one encoding stage of this process took: its items, its wall time (loading its model and,
    for videos, decoding included) and its peak GPU memory (torch.cuda.max_memory_allocated over the
    stage; None on a CPU)."""

    items: int
    seconds: float = 0.0
    peak_gpu_mib: float | None = None

    def line(self, name: str) -> str:
        model, unit = {"captions": ("T5", "captions"), "videos": ("VAE", "clips")}[name]
        peak = "" if self.peak_gpu_mib is None else f", peak GPU memory {self.peak_gpu_mib / 1024:.2f} GiB"
        return (f"{model}: {self.items} {unit} in {self.seconds:.1f} s "
                f"({self.items / max(self.seconds, 1e-9):.2f} {unit}/s{peak})")


@contextmanager
def measured(stages: dict, name: str, items: int, device: torch.device):
    """Time the stage and, on a GPU, take its peak memory alone (the peak is reset at its start)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started, figures = time.perf_counter(), StageFigures(items)
    yield
    if cuda:
        torch.cuda.synchronize(device)
        figures.peak_gpu_mib = torch.cuda.max_memory_allocated(device) / 2**20
    figures.seconds = time.perf_counter() - started
    stages[name] = figures


def check_clip_rules(config: PreprocessConfig, spec) -> None:
    """The clip sizes, buckets and [[datasets]] clip settings, by the model family's frame and size rules."""
    spec.check_clip_settings(config, configured_buckets(config))
    for number, own in enumerate(dataset_clip_configs(config), start=1):
        if own is not config:  # a [[datasets]] table with clip settings of its own
            spec.check_clip_settings(own, configured_buckets(own), f"[[datasets]] table {number}: ")


def run(config: PreprocessConfig) -> PreprocessResult:
    logs.configure(config.log_format, enabled=is_main_process())
    with StopRequests() as stop:
        return _run(config, stop)


def _run(config: PreprocessConfig, stop: StopRequests) -> PreprocessResult:
    started = time.time()
    models = ModelConfigs.of(config)
    spec = models.spec()  # refuses a pipeline no family reads, before any encoding
    check_clip_rules(config, spec)
    records, repeats = load_dataset_records(config)  # each process resolves its share in plan()
    validation_entries = checked_validation_entries(config, spec, (config.max_num_frames, config.height, config.width))
    for size in clip_sizes(config):
        spec.check_clip_size(*size, config.ignore_learned_positional_embeddings)
    procs = processes()
    if config.vae_batch_size > 1:
        logs.message(f"note: --vae_batch_size {config.vae_batch_size} is not used: every clip is encoded on its own, "
                     "so that its latents do not depend on the clips beside it.")
    config = auto_vae_memory(config, models, procs)
    identity = cache_identity(config, models)
    files.ensure_writable_dir(Path(config.cache_root), "--cache_root")
    cache_path = Path(config.cache_root) / identity.name_in(config.cache_root)  # (or its version 5 cache)
    if procs.is_main:  # what a later `cogtune train` of the same config trains on
        record_preprocess_run(config, identity)
    stages: dict[str, StageFigures] = {}
    started_here = not (cache_path / schema.MANIFEST_FILE).is_file()
    try:
        with cache_lock(cache_path):  # shared with other writers; keeps `cogtune cache prune` out
            counts = _encode_missing(records, repeats, config, models, identity, cache_path, stop, procs, stages)
            if procs.is_main:
                counts["validation_files"] = encode_validation(config, models, cache_path, validation_entries)
            else:
                counts["validation_files"] = 0
    except BaseException:
        if started_here and procs.is_main:  # a run that stopped before writing anything leaves no empty cache
            _remove_if_empty(cache_path)
        raise
    counts = {key: sum(c[key] for c in procs.gather(counts)) for key in counts}

    selected = Cache.open(cache_path, for_training=True).samples  # columns: cheap at a million samples
    windows = {}
    if any(own.frame_extraction not in ("head", "spread") for own in dataset_clip_configs(config)):  # windows:
        keys = set(selected.columns["latent_key"].tolist())
        names = (str(key, "ascii") if isinstance(key, bytes) else key for key in keys)
        windows = dict(Counter(Counter(name.split("@")[0] for name in names).values()))
    short = {} if configured_buckets(config) else {name: count for name, count in selected.buckets.items()
                                                   if int(name.split("x")[0]) < config.max_num_frames}
    return PreprocessResult(
        cache_path=cache_path.resolve(), samples=len(selected), failed=selected.failed,
        skipped_by_kind=selected.failures, buckets=selected.buckets,
        seconds=time.time() - started, is_main_process=procs.is_main, stages=stages, short=short,
        max_num_frames=config.max_num_frames, windows=windows, **counts,
    )


def copy_captions(captions: list[str], siblings: list[Path], writer: CacheWriter,
                  text_shards: dict[str, str]) -> tuple[list[str], int]:
    """The captions whose embeddings a sibling cache holds, copied into this one (their shards go into
    text_shards); returns the captions left to encode, and how many were copied."""
    keys = {caption: schema.caption_tensor_keys(caption, writer.manifest.tensors) for caption in captions}
    for sibling in siblings:
        if not keys:
            break
        with _read_lock(sibling) as readable:
            if not readable:
                continue
            stored, reader = stored_tensor_shards(sibling), sibling_tensor_reader(sibling)
            for caption, caption_keys in list(keys.items()):
                if all(key in stored for key in caption_keys):
                    for key in caption_keys:
                        text_shards[key] = writer.add_tensor(key, reader.stored_tensor(stored[key], key))
                    del keys[caption]
                    if writer.should_flush():
                        writer.flush()
    return [caption for caption in captions if caption in keys], len(captions) - len(keys)


def copy_videos(videos: list[tuple[str, Path]], siblings: list[Path], writer: CacheWriter
                ) -> tuple[list[tuple[str, Path]], dict[str, dict[int, schema.VideoLatent]]]:
    """The videos whose latents (every window, and the first-frame encodings) a sibling cache holds,
    copied into this one; returns the videos left to encode, and the copied ones' windows."""
    copied: dict[str, dict[int, schema.VideoLatent]] = {}
    for sibling in siblings:
        wanted = [sha for sha, _ in videos if sha not in copied]
        if not wanted:
            break
        with _read_lock(sibling) as readable:
            if not readable:
                continue
            reader = sibling_tensor_reader(sibling)
            for sha, windows in encoded_videos(sibling, wanted).items():
                mine = {}
                for start, video in windows.items():
                    keys = schema.video_tensor_keys(video.latent_key, writer.manifest.tensors,
                                                    len(video.image_noise_sigmas))
                    shards = {writer.add_tensor(key, reader.stored_tensor(video.latent_shard, key)) for key in keys}
                    (shard,) = shards  # a video's tensors go into one shard, as when it is encoded
                    mine[start] = dataclasses.replace(video, latent_shard=shard)
                copied[sha] = mine
                if writer.should_flush():
                    writer.flush()
    return [(sha, path) for sha, path in videos if sha not in copied], copied


@contextmanager
def _read_lock(cache_path: Path):
    """A sibling cache held against `cogtune cache prune` while it is copied from; False (skip it)
    while it is being pruned."""
    with ExitStack() as held:
        try:
            held.enter_context(cache_lock(cache_path, user="copying its encodings into another cache"))
        except CogtuneError:
            yield False
            return
        yield True


def _remove_if_empty(cache_path: Path) -> None:
    """A cache this run created and wrote nothing to (a bad dataset found before any encoding): gone."""
    if (cache_path / schema.MANIFEST_FILE).is_file() and is_unfinished_and_empty(cache_path):
        shutil.rmtree(cache_path, ignore_errors=True)


def auto_vae_memory(config: PreprocessConfig, models: ModelConfigs, procs: Processes) -> PreprocessConfig:
    """--auto_tiling on a GPU: the settings with tiling switched on when the VAE would not fit the free
    memory otherwise (T5 is freed before the VAE loads, so what is free now is what the VAE gets).
    Tiling is recorded as if given on the command line, so that `cogtune train` of the same config
    finds the tiled cache."""
    device = encoding_device_and_dtype(config.mixed_precision)[0]
    if not config.auto_tiling or device.type != "cuda":
        return config
    tiled = cache_identity(dataclasses.replace(config, enable_tiling=True), models)
    started = (Path(config.cache_root) / tiled.name_in(config.cache_root) / schema.MANIFEST_FILE).is_file()
    free = torch.cuda.mem_get_info(device)[0]
    choice = choose_vae_memory(config, models, free, started)
    # All processes write one cache: tiling is on when any of them needs it.
    tiling = any(procs.gather(choice.tiling))
    if tiling == config.enable_tiling:
        return config
    why = "a tiled cache of these settings was started before" if started else (
        f"the VAE needs about {gib(choice.need)} with it, and {gib(free)} is free")
    logs.message(f"--auto_tiling: VAE tiling on: {why}.")
    command_line = tuple(sorted({*config.command_line, "enable_tiling"}))
    return dataclasses.replace(config, enable_tiling=True, command_line=command_line)


def _encode_missing(records, repeats: list[int], config: PreprocessConfig, models: ModelConfigs, identity: CacheIdentity,
                    cache_path: Path, stop: StopRequests, procs: Processes, stages: dict) -> dict:
    """Encode what the cache lacks for these records, then record them as the selection; returns
    what this process encoded and reused, and puts each stage's figures into `stages`. With several
    processes, each fingerprints, encodes and writes its own share: captions dealt out in turn,
    videos balanced by decode cost."""
    def new_writer():
        return CacheWriter(cache_path, identity.manifest(), config.shard_size_mb, writer_id=f"r{procs.rank}")

    writer = new_writer() if procs.is_main else None
    procs.barrier()  # the main process wrote the manifest; the others check it against theirs
    writer = writer or new_writer()
    # Every process reads the cache before any writes to it: the gather in plan() waits for all.
    holds = CacheHolds.read(cache_path, read_fingerprints(cache_path))
    stored_tensors = stored_tensor_shards(cache_path)
    work = plan(records, holds, stored_tensors, writer.manifest.tensors, procs, config.allow_symlinks_outside_root)
    del holds
    if procs.is_main and work.fingerprints is not None:  # hashes are saved before any encoding
        write_fingerprints(cache_path, work.fingerprints)

    text_shards = dict(stored_tensors)
    siblings = sibling_caches(cache_path, identity.manifest())  # the same encodings, for other datasets
    my_captions = work.captions_needed[procs.rank::procs.world_size]
    my_captions, copied_captions = copy_captions(my_captions, siblings, writer, text_shards)
    device = encoding_device_and_dtype(config.mixed_precision)[0]
    if my_captions:
        with measured(stages, "captions", len(my_captions), device):
            text_shards.update(encode_captions(my_captions, config, models, writer, stop))
    if procs.world_size > 1 and work.captions_needed:  # learn where the other processes stored theirs
        writer.flush()
        procs.barrier()
        text_shards = stored_tensor_shards(cache_path)

    def add_rows(sha: str, windows: dict[int, schema.VideoLatent], failure: tuple[str, str] | None = None) -> None:
        """The rows of a video's samples: one per window (by its start) and caption, or a failed one each."""
        for sample in work.by_video[sha]:
            if failure is not None:
                kind, message = failure
                writer.add_row(schema.failed_row(sample.source, kind, f"{sample.record.where}: {message}"))
                continue
            text_key = schema.caption_tensor_keys(sample.source.caption, writer.manifest.tensors)[0]
            for start, video in sorted(windows.items()):
                source = dataclasses.replace(sample.source, sample_id=schema.sample_id(
                    schema.window_source(sha, start), sample.source.caption))  # at 0: the record's own
                writer.add_row(schema.ok_row(source, video, text_shards[text_key]))

    # Samples whose video is already encoded only need rows.
    if procs.is_main:
        for sha, windows in encoded_videos(cache_path, work.by_video).items():
            add_rows(sha, windows)

    videos, copied = copy_videos(my_videos(work.videos_needed, procs), siblings, writer)
    for sha, windows in copied.items():
        add_rows(sha, windows)
    if videos and device.type == "cuda":  # T5 is gone: will the VAE fit? (stop now rather than run out midway)
        problem = vae_room_problem(config, models, torch.cuda.mem_get_info(device)[0])
        if problem:
            writer.flush()
            raise CogtuneError(problem)
    failed = 0
    with measured(stages, "videos", len(videos), device) if videos else nullcontext():
        for encoded in encode_videos(videos, config, models, writer, identity.settings.image_noise_variants, stop,
                                     work.clip_settings):
            add_rows(encoded.sha256, encoded.windows, encoded.failure)
            failed += encoded.failure is not None
    writer.flush()
    procs.barrier()  # every process's rows are written before the selection names them
    if procs.is_main:  # the records' samples (with windows, every window of their videos), and their repeats
        one_clip = all(own.frame_extraction in ("head", "spread") for own in dataset_clip_configs(config))
        ids, times = ((work.sample_ids, repeats) if one_clip else
                      samples_of_videos(cache_path, work.sample_sources, repeats))
        if config.datasets:  # repeats: a sample listed twice is drawn twice
            writer.write_selection(ids, times, [table["repeats"] for table in dataset_tables(config)])
        else:  # one dataset, as before: a record listed twice is one sample
            writer.write_selection(ids)
        compact_index(cache_path)
    procs.barrier()
    if not procs.is_main:  # the plan's counts are the same on every process: the main one reports them
        work.reused_videos = work.reused_captions = work.known_failures = work.hashed = 0
    return dict(encoded_videos=len(videos) - failed, encoded_captions=len(my_captions), copied_videos=len(copied),
                copied_captions=copied_captions,
                reused_videos=work.reused_videos, reused_captions=work.reused_captions,
                known_failures=work.known_failures, hashed=work.hashed,
                sources=len(work.sample_ids) if procs.is_main else 0)
