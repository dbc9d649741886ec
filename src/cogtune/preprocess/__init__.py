"""Stage 1: dataset records -> decoded clips -> VAE moments and T5 embeddings -> the cache.

Only what the cache does not hold yet is encoded: a video whose content hash has latents, or a
caption whose text has an embedding, is reused, and a clip that failed before is not tried again
(`cogtune cache prune` forgets failures). The VAE and T5 are loaded only when there is something
for them to do, one after the other. SIGTERM or SIGUSR1 make the run save what it has encoded and
stop (exit status 75); running it again continues.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cogtune import data_schema as schema
from cogtune.cache.identity import cache_identity, record_preprocess_run
from cogtune.config import PreprocessConfig, precision_dtype
from cogtune.data.buckets import bucket_name, configured_buckets, size_rule
from cogtune.data.sources import load_records
from cogtune.data.video import (Clip, ClipSkipped, decode_cost, load_first_frame, not_a_video, plan_resize_crop,
                                read_clip, resize_crop, to_model_range)
from cogtune.errors import CogtuneError, Preempted
from cogtune.families import ModelConfigs, load_vae
from cogtune.util import files, logs
from cogtune.util.distributed import Processes, balance, is_main_process, processes
from cogtune.util.signals import StopRequests, ignore_stop_signals


@dataclass
class PreprocessResult:
    cache_dir: Path
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
    is_main_process: bool = True
    validation_files: int = 0  # validation prompt embeddings and image latents written this run

    def summary(self) -> str:
        return (
            f"cache: {self.cache_dir}\n"
            f"samples: {self.samples} ok, {self.failed} skipped"
            + "".join(f"\n  skipped, {kind}: {count}" for kind, count in self.skipped_by_kind.items())
            + "\nbuckets: " + ", ".join(f"{name} ({count})" for name, count in self.buckets.items()) + "\n"
            f"encoded: {self.encoded_videos} videos, {self.encoded_captions} captions; "
            f"reused from the cache: {self.reused_videos} videos, {self.reused_captions} captions "
            f"({self.seconds:.1f} s)"
            + (f"\nvalidation: {self.validation_files} prompt embedding(s) or image latent(s) encoded"
               if self.validation_files else "")
            + (f"\n{self.known_failures} clips failed in an earlier run and were not tried again; "
               "`cogtune cache prune` forgets failures so that the next run retries them" if self.known_failures
               else "")
        )


class _Source:
    """Content fingerprints of source files, reusing the hash of a file whose size and mtime are unchanged."""

    def __init__(self, index_rows: list[dict]):
        self.known = {(r["source_path"], r["source_size"], r["source_mtime_ns"]): r["source_sha256"]
                      for r in index_rows}

    def fingerprint(self, path: Path) -> tuple[int, int, str]:
        stat = path.stat()
        sha = self.known.get((str(path), stat.st_size, stat.st_mtime_ns)) or files.sha256_file(path)
        return stat.st_size, stat.st_mtime_ns, sha


class ClipDataset(torch.utils.data.Dataset):
    """Decodes and resizes one video per item, in DataLoader workers when there are any."""

    def __init__(self, jobs: list[tuple[Path, str]], config: PreprocessConfig):
        self.jobs = jobs
        self.config = config
        self._size = None  # built where it is used (a worker), as closures do not pickle

    def __len__(self):
        return len(self.jobs)

    def __getitem__(self, i):
        path, sha = self.jobs[i]
        c = self.config
        rng = np.random.default_rng([c.seed, int(sha[:15], 16)])  # a clip's crop depends only on it and the seed
        if self._size is None:
            self._size = size_rule(c)
        try:
            clip = read_clip(path, self._size, c.fps, c.skip_frames_start, c.skip_frames_end,
                             c.video_reshape_mode, rng)
            return sha, clip, None
        except ClipSkipped as e:
            return sha, None, (e.kind, str(e))
        except Exception as e:  # a decoder crash on one file must not end the run
            return sha, None, ("unreadable", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")


def _first(batch):
    return batch[0]


def _device_and_dtype(precision: str) -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():  # one GPU per process of a node
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))), precision_dtype(precision)
    # bf16/fp16 3D convolutions are pathologically slow on CPUs: encode in fp32 there.
    return torch.device("cpu"), torch.float32


def run(config: PreprocessConfig) -> PreprocessResult:
    logs.configure(config.log_format, enabled=is_main_process())
    with StopRequests() as stop:
        return _run(config, stop)


def _run(config: PreprocessConfig, stop: StopRequests) -> PreprocessResult:
    started = time.time()
    records = load_records(config.instance_data_root, config.dataset_name, config.caption_column,
                           config.video_column, config.id_token, config.dataset_config_name, config.cache_dir,
                           config.allow_symlinks_outside_root)
    models = ModelConfigs.of(config)
    spec = models.spec()  # refuses what is not a CogVideoX model before any encoding
    validation_pairs = config.checked_validation_pairs(spec)
    for size in configured_buckets(config) or [(config.max_num_frames, config.height, config.width)]:
        spec.check_clip_size(*size, config.ignore_learned_positional_embeddings)
    identity = cache_identity(config, models)
    files.ensure_writable_dir(Path(config.cache_root), "--cache_root")
    cache_dir = Path(config.cache_root) / identity.name
    procs = processes()
    if procs.is_main:  # what a later `cogtune train` of the same config trains on
        record_preprocess_run(config, identity)
    with schema.cache_lock(cache_dir):  # shared with other writers; keeps `cogtune cache prune` out
        counts = _encode_missing(records, config, models, identity, cache_dir, stop, procs)
        if procs.is_main:
            counts["validation_files"] = encode_validation(config, models, cache_dir, validation_pairs)
        else:
            counts["validation_files"] = 0
    counts = {key: sum(c[key] for c in procs.gather(counts)) for key in counts}

    cache = schema.Cache.open(cache_dir)
    return PreprocessResult(
        cache_dir=cache_dir.resolve(), samples=len(cache.samples), failed=len(cache.failed),
        skipped_by_kind=dict(Counter(row["failure_kind"] or "unreadable" for row in cache.failed).most_common()),
        buckets=dict(sorted(Counter(row["bucket"] for row in cache.samples).items())),
        seconds=time.time() - started, is_main_process=procs.is_main, **counts,
    )


def _encode_missing(records, config: PreprocessConfig, models: ModelConfigs, identity: schema.CacheIdentity,
                    cache_dir: Path, stop: StopRequests, procs: Processes) -> dict:
    """Encode what the cache lacks for these records, then record them as the selection; returns
    what this process encoded and reused. With several processes, each fingerprints, encodes and
    writes its own share: captions dealt out in turn, videos balanced by decode cost."""
    def new_writer():
        return schema.CacheWriter(cache_dir, identity, config.shard_size_mb, writer_id=f"r{procs.rank}")

    writer = new_writer() if procs.is_main else None
    procs.barrier()  # the main process wrote the manifest; the others check it against theirs
    writer = writer or new_writer()
    # Every process reads the cache before any writes to it: the gather below waits for all.
    index_rows = schema.read_index(cache_dir)
    done = {r["sample_id"]: r for r in index_rows}  # encoded, or failed in an earlier run
    latent_rows = {r["latent_key"]: r for r in index_rows if r["status"] == schema.STATUS_OK}
    stored_tensors = schema.stored_tensor_shards(cache_dir)

    # Plan: fingerprint every source (each process a share), then see what is missing. A new file
    # that is plainly no video (text, an image) is a mistake in the dataset: say so before any work.
    sources = _Source(index_rows)
    mine = {}
    for i in logs.progress(range(procs.rank, len(records), procs.world_size), desc="fingerprinting", unit="file",
                           leave=False, disable=not procs.is_main):
        size, mtime_ns, sha = sources.fingerprint(records[i].video)
        unseen = schema.sample_id(sha, records[i].caption) not in done
        mine[i] = (size, mtime_ns, sha, not_a_video(records[i].video) if unseen else None)
    fingerprints = {i: f for part in procs.gather(mine) for i, f in part.items()}
    planned = []  # (record, size, mtime_ns, sha, sample_id)
    for i, record in enumerate(records):
        size, mtime_ns, sha, not_video = fingerprints[i]
        if not_video:
            raise CogtuneError(f"{record.where}: {record.video} is not a video ({not_video}). Fix the dataset row or "
                               "remove it; nothing has been encoded yet.")
        planned.append((record, size, mtime_ns, sha, schema.sample_id(sha, record.caption)))
    missing = [p for p in planned if p[4] not in done]
    captions_needed = sorted({p[0].caption for p in missing
                              if schema.text_tensor_key(schema.caption_key(p[0].caption)) not in stored_tensors})
    videos_needed = list({p[3]: p[0].video for p in missing if schema.video_key(p[3]) not in latent_rows}.items())

    text_shards = dict(stored_tensors)
    my_captions = captions_needed[procs.rank::procs.world_size]
    if my_captions:
        text_shards.update(_encode_captions(my_captions, config, models, writer, stop))
    if procs.world_size > 1 and captions_needed:  # learn where the other processes stored theirs
        writer.flush()
        procs.barrier()
        text_shards = schema.stored_tensor_shards(cache_dir)
    my_videos = videos_needed
    if procs.world_size > 1 and videos_needed:
        mine = {i: decode_cost(path) for i, (_, path) in enumerate(videos_needed) if i % procs.world_size == procs.rank}
        costs = {i: cost for part in procs.gather(mine) for i, cost in part.items()}
        owner = balance([costs[i] for i in range(len(videos_needed))], procs.world_size)
        my_videos = [video for video, rank in zip(videos_needed, owner) if rank == procs.rank]

    by_video: dict[str, list] = {}
    for p in missing:
        by_video.setdefault(p[3], []).append(p)

    def add_rows(entries, latent_row: dict | None, failure: tuple[str, str] | None):
        for record, size, mtime_ns, sha, sid in entries:
            row = schema.row_template()
            row.update(sample_id=sid, source_path=str(record.video), source_size=size, source_mtime_ns=mtime_ns,
                       source_sha256=sha, caption=record.caption, caption_sha256=files.sha256_text(record.caption))
            if failure is not None:
                kind, message = failure
                row.update(status=schema.STATUS_FAILED, failure_kind=kind, reason=f"{record.where}: {message}",
                           image_noise_sigmas=[])
            else:
                for column in ("frame_indices", "source_fps", "source_height", "source_width", "num_frames",
                               "height", "width", "bucket", "decoder", "latent_shape", "latent_shard", "latent_key",
                               "image_noise_sigmas"):
                    row[column] = latent_row[column]
                text_key = schema.caption_key(record.caption)
                row.update(status=schema.STATUS_OK, reason="", text_key=text_key,
                           text_shard=text_shards[schema.text_tensor_key(text_key)])
            writer.add_row(row)

    # Samples whose video is already encoded only need a row.
    if procs.is_main:
        for sha, entries in by_video.items():
            if schema.video_key(sha) in latent_rows:
                add_rows(entries, latent_rows[schema.video_key(sha)], None)

    failed = 0
    if my_videos:
        image_variants = identity.settings["image_noise_variants"]
        failed = _encode_videos(my_videos, config, models, by_video, writer, add_rows, image_variants, stop)
    writer.flush()
    procs.barrier()  # every process's rows are written before the selection names them
    if procs.is_main:
        writer.write_selection(p[4] for p in planned)
    procs.barrier()
    main = procs.is_main
    return dict(
        encoded_videos=len(my_videos) - failed, encoded_captions=len(my_captions),
        reused_videos=main * len({p[3] for p in planned if schema.video_key(p[3]) in latent_rows}),
        reused_captions=main * (len({p[0].caption for p in planned}) - len(captions_needed)),
        known_failures=main * sum(p[4] in done and done[p[4]]["status"] != schema.STATUS_OK for p in planned),
    )


def _stop_if_requested(stop: StopRequests, writer: schema.CacheWriter) -> None:
    """At a safe point: on SIGTERM/SIGUSR1, save what is encoded and end the run."""
    if stop.signal:
        writer.flush()
        raise Preempted(f"stopped by {stop.signal}; everything encoded so far is saved in {writer.cache_dir}. "
                        "Run the same command again to continue.")


def _load_text_encoder(config: PreprocessConfig, models: ModelConfigs):
    """(tokenizer, T5 encoder on the device) of the pipeline."""
    from transformers import AutoTokenizer, T5EncoderModel

    device, dtype = _device_and_dtype(config.mixed_precision)
    tokenizer = models.load_part(AutoTokenizer, "tokenizer", weights=False)
    text_encoder = models.load_part(T5EncoderModel, "text_encoder", dtype=dtype).to(device).eval()
    return tokenizer, text_encoder


@torch.no_grad()
def _embed_texts(texts: list[str], tokenizer, text_encoder, max_length: int) -> tuple[torch.Tensor, int]:
    """T5 embeddings of texts padded to max_length, as the pipelines make them; and how many were
    truncated."""
    tokens = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                       add_special_tokens=True, return_tensors="pt")
    full_lengths = tokenizer(texts, add_special_tokens=True, return_length=True)["length"]
    embeds = text_encoder(tokens.input_ids.to(text_encoder.device))[0]
    return embeds, sum(length > max_length for length in full_lengths)


def _encode_captions(captions: list[str], config: PreprocessConfig, models: ModelConfigs,
                     writer: schema.CacheWriter, stop: StopRequests, batch_size: int = 8) -> dict[str, str]:
    """T5-encode captions padded to the model's text length; returns tensor key -> shard."""
    tokenizer, text_encoder = _load_text_encoder(config, models)
    max_length = models.transformer["max_text_seq_length"]
    store_dtype = schema.DTYPES[config.latent_dtype]
    shards, truncated = {}, 0
    for start in logs.progress(range(0, len(captions), batch_size), desc="encoding captions", unit="batch"):
        batch = captions[start:start + batch_size]
        embeds, cut = _embed_texts(batch, tokenizer, text_encoder, max_length)
        truncated += cut
        for caption, embed in zip(batch, embeds):
            key = schema.text_tensor_key(schema.caption_key(caption))
            shards[key] = writer.add_tensor(key, embed.to(store_dtype))
            if writer.should_flush():
                writer.flush()
        _stop_if_requested(stop, writer)
    if truncated:
        logs.message(f"warning: {truncated} caption(s) are longer than {max_length} tokens and were truncated.")
    del text_encoder
    return shards


@torch.no_grad()
def encode_validation(config: PreprocessConfig, models: ModelConfigs, cache_dir: Path,
                      pairs: list[tuple[str, str | None]]) -> int:
    """Encode the validation prompts of `pairs` (checked by checked_validation_pairs) and the empty
    negative prompt with T5 and, for image-to-video models, their images with the VAE, into the
    cache's validation folder, so that training can generate without either. Only what is
    missing is encoded; returns how many files were written."""
    if not pairs:
        return 0
    images = [image for _, image in pairs if image]
    written = 0
    texts = [text for text in dict.fromkeys(["", *(prompt for prompt, _ in pairs)])
             if not schema.validation_text_path(cache_dir, text).is_file()]
    if texts:
        tokenizer, text_encoder = _load_text_encoder(config, models)
        embeds, truncated = _embed_texts(texts, tokenizer, text_encoder, models.transformer["max_text_seq_length"])
        for text, embed in zip(texts, embeds):
            schema.write_tensors(schema.validation_text_path(cache_dir, text), {"prompt_embeds": embed.float()},
                                 {"prompt": text})
        written += len(texts)
        if truncated:
            logs.message(f"warning: {truncated} validation prompt(s) are longer than the model's text length and "
                         "were truncated.")
        del text_encoder
    pending = {}
    for image in images:
        sha = files.sha256_file(image)
        path = schema.validation_image_path(cache_dir, sha, config.height, config.width)
        if not path.is_file():
            pending[path] = image
    if pending:
        device, dtype = _device_and_dtype(config.mixed_precision)
        vae = load_vae(models, config, device, dtype)
        for path, image in pending.items():
            pixels = validation_pixels(image, config.height, config.width)  # [C, 1, H, W]
            posterior = vae.encode(pixels[None].to(device, dtype)).latent_dist
            schema.write_tensors(path, {"mean": posterior.mean[0].float(), "logvar": posterior.logvar[0].float()},
                                 {"image": str(image)})
        written += len(pending)
        del vae
    return written


def validation_pixels(image: str | Path, height: int, width: int) -> torch.Tensor:
    """A validation image (or a video's first frame) resized to cover height x width and centre-cropped,
    as the training clips are: [3, 1, height, width] in [-1, 1]."""
    frame = np.array(load_first_frame(Path(image)))[None]  # [1, H, W, 3] uint8
    plan = plan_resize_crop(frame.shape[1], frame.shape[2], height, width, "center")
    return resize_crop(to_model_range(frame), plan, height, width).permute(1, 0, 2, 3)


def first_frame_noise(seed: int, sha: str, variants: int) -> tuple[list[float], torch.Generator]:
    """The noise sigmas exp(N(-3, 0.5)) of a clip's first-frame encodings, and the generator that
    then draws their noise: a function of the seed and the clip's content only."""
    generator = torch.Generator().manual_seed(int(files.sha256_text(f"first frame {seed} {sha}")[:15], 16))
    sigmas = torch.exp(torch.randn(variants, generator=generator, dtype=torch.float64) * 0.5 - 3.0)
    return sigmas.tolist(), generator


def noised_first_frames(pixels: torch.Tensor, sigmas: list[float], generator: torch.Generator) -> torch.Tensor:
    """[C, F, H, W] clip -> [K, C, 1, H, W]: its first frame plus Gaussian noise of each sigma."""
    first = pixels[:, :1].float()
    noise = torch.randn((len(sigmas), *first.shape), generator=generator)
    return first[None] + noise * torch.tensor(sigmas, dtype=torch.float32).view(-1, 1, 1, 1, 1)


def failure_limit(max_failures: str | None, clips: int) -> int | None:
    """The number of failed clips a run tolerates: --max_failures N (a count), or F < 1 (a fraction
    of the clips this run decodes)."""
    if max_failures is None:
        return None
    value = float(max_failures)
    return int(value) if value >= 1 else math.floor(value * clips)


@torch.no_grad()
def _encode_videos(videos: list[tuple[str, Path]], config: PreprocessConfig, models: ModelConfigs, by_video: dict,
                   writer: schema.CacheWriter, add_rows, image_variants: int, stop: StopRequests) -> int:
    """Decode clips in DataLoader workers and VAE-encode them in batches of --vae_batch_size clips
    of one bucket (and, for image-to-video models, their noised first frames); returns how many
    could not be used."""
    jobs = [(path, sha) for sha, path in videos]
    limit = failure_limit(config.max_failures, len(jobs))
    loader = torch.utils.data.DataLoader(ClipDataset(jobs, config), batch_size=1, collate_fn=_first,
                                         num_workers=config.dataloader_num_workers,
                                         worker_init_fn=ignore_stop_signals)
    clips = iter(loader)  # the decode workers start now, before the VAE exists: none holds a copy of it
    device, dtype = _device_and_dtype(config.mixed_precision)
    vae = load_vae(models, config, device, dtype)
    store_dtype = schema.DTYPES[config.latent_dtype]

    def encode(pending: list[tuple[str, Clip]]) -> None:
        pixels = torch.stack([clip.pixels for _, clip in pending]).to(device, dtype)
        posterior = vae.encode(pixels).latent_dist
        for number, (sha, clip) in enumerate(pending):
            key = schema.video_key(sha)
            mean, logvar = posterior.mean[number].to(store_dtype), posterior.logvar[number].to(store_dtype)
            mean_key, logvar_key = schema.latent_tensor_keys(key)
            shard = writer.add_tensor(mean_key, mean)
            writer.add_tensor(logvar_key, logvar)
            sigmas = []
            if image_variants:
                sigmas, generator = first_frame_noise(config.seed, sha, image_variants)
                images = noised_first_frames(clip.pixels, sigmas, generator)
                image_posterior = vae.encode(images.to(device, dtype)).latent_dist
                for variant in range(image_variants):
                    image_mean_key, image_logvar_key = schema.image_latent_tensor_keys(key, variant)
                    writer.add_tensor(image_mean_key, image_posterior.mean[variant].to(store_dtype))
                    writer.add_tensor(image_logvar_key, image_posterior.logvar[variant].to(store_dtype))
            frames, height, width = clip.pixels.shape[1:]
            latent_row = dict(
                frame_indices=clip.frame_indices, source_fps=clip.source_fps, source_height=clip.source_height,
                source_width=clip.source_width, num_frames=frames, height=height, width=width,
                bucket=bucket_name((frames, height, width)), decoder=clip.decoder, latent_shape=list(mean.shape),
                latent_shard=shard, latent_key=key, image_noise_sigmas=sigmas,
            )
            add_rows(by_video[sha], latent_row, None)
            if writer.should_flush():
                writer.flush()

    failed = 0
    pending: dict[tuple, list] = {}  # bucket -> decoded clips waiting for a full VAE batch

    def encode_pending() -> None:
        for batch in pending.values():
            encode(batch)
        pending.clear()

    progress = logs.progress(clips, total=len(jobs), desc="encoding videos", unit="clip")
    for read, (sha, clip, failure) in enumerate(progress, start=1):
        if clip is None:
            failed += 1
            logs.message(f"skipped {by_video[sha][0][0].video}: {failure[1]}", path=str(by_video[sha][0][0].video),
                         reason=failure[1])
            add_rows(by_video[sha], None, failure)
            if limit is not None and failed > limit:
                encode_pending()
                writer.flush()  # everything encoded so far stays in the cache for the next run
                raise CogtuneError(
                    f"Stopped: {failed} of the {read} clips read so far could not be used, more than "
                    f"--max_failures {config.max_failures} allows (last: {by_video[sha][0][0].video}: {failure[1]}). "
                    "The clips encoded so far are kept; fix or remove the bad files (their reasons are in the "
                    "cache index) and run again to continue."
                )
        else:
            bucket = tuple(clip.pixels.shape[1:])
            pending.setdefault(bucket, []).append((sha, clip))
            if len(pending[bucket]) >= config.vae_batch_size:
                encode(pending.pop(bucket))
        progress.set_postfix(failed=failed)
        _stop_if_requested(stop, writer)  # decoded clips still waiting for a VAE batch are decoded again next run
    encode_pending()
    return failed
