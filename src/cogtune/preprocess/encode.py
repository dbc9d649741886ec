"""The encoders of stage 1, as the model's family runs them: its text encoder for captions and
validation prompts, its VAE for clips, their noised first frames and validation images. Each writes
its tensors through a CacheWriter; the index rows that name them are the caller's
(`preprocess._encode_missing`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from cogtune import data_schema as schema
from cogtune import quantize
from cogtune.cache.writer import CacheWriter, write_tensors
from cogtune.config import PreprocessConfig
from cogtune.data.buckets import bucket_name
from cogtune.data.sources import clip_config
from cogtune.data.video import (Clip, ClipSkipped, first_frame_pixels, not_a_video, read_clip, read_spread_clip,
                                read_windows, size_rule, window_starts)
from cogtune.errors import CogtuneError, Preempted, first_line
from cogtune.families import ModelConfigs
from cogtune.preprocess.plan import failure_limit
from cogtune.util import files, logs
from cogtune.util.devices import encoding_device_and_dtype
from cogtune.util.signals import StopRequests, ignore_stop_signals


class ClipDataset(torch.utils.data.Dataset):
    """Decodes and resizes one video per item, in DataLoader workers when there are any."""

    def __init__(self, jobs: list[tuple[Path, str]], config: PreprocessConfig, clip_settings: dict[str, str],
                 frame_step: int):
        self.jobs, self.config, self.clip_settings, self.frame_step = jobs, config, clip_settings, frame_step
        self._rules = {}  # clip settings -> (config, size rule), built where used (a worker): closures do not pickle

    def __len__(self):
        return len(self.jobs)

    def __getitem__(self, i):
        path, sha = self.jobs[i]
        settings = self.clip_settings.get(sha, "")
        if settings not in self._rules:
            config = clip_config(self.config, settings)  # its dataset's own clip settings, if any
            self._rules[settings] = config, size_rule(config, self.frame_step)
        config, rule = self._rules[settings]
        try:
            problem = not_a_video(path)
            if problem:  # a text file named .mp4: one skipped sample with its reason, as a cut file is
                raise ClipSkipped(f"not a video: {problem}", kind="not a video")
            return sha, clip_windows(path, config, rule, clip_rng(config, sha)), None
        except ClipSkipped as e:
            return sha, None, (e.kind, str(e))
        except Exception as e:  # a decoder crash on one file must not end the run
            return sha, None, ("unreadable", f"{type(e).__name__}: {first_line(e)[:200]}")


def clip_rng(config: PreprocessConfig, sha: str) -> np.random.Generator:
    """The generator of a clip's random crop: a function of the seed and the clip's content only."""
    return np.random.default_rng([config.seed, int(sha[:15], 16)])


def clip_windows(path: Path, config: PreprocessConfig, size, rng: np.random.Generator) -> list[tuple[int, Clip]]:
    """The samples --frame_extraction makes of one video, each with its start: one clip for head (its
    first frames at --fps) and spread (frames over the whole video, as the diffusers scripts take
    them), else the windows read_windows cuts. preprocess and --preview both read clips here."""
    c = config
    if c.frame_extraction == "head":
        return [(0, read_clip(path, size, c.fps, c.skip_frames_start, c.skip_frames_end, c.video_reshape_mode, rng))]
    if c.frame_extraction == "spread":
        return [(0, read_spread_clip(path, size, c.skip_frames_start, c.skip_frames_end, c.video_reshape_mode, rng))]
    return read_windows(path, size, c.fps, c.skip_frames_start, c.skip_frames_end, c.video_reshape_mode, rng,
                        functools.partial(window_starts, extraction=c.frame_extraction, stride=c.frame_stride,
                                          count=c.frame_sample, most=c.max_windows_per_clip))


def _first(batch):
    return batch[0]


def stop_if_requested(stop: StopRequests, writer: CacheWriter) -> None:
    """At a safe point: on SIGTERM/SIGUSR1, save what is encoded and end the run."""
    if stop.signal:
        writer.flush()
        raise Preempted(f"stopped by {stop.signal}; everything encoded so far is saved in {writer.cache_path}. "
                        "Run the same command again to continue.")


def _load_text_encoder(config: PreprocessConfig, models: ModelConfigs):
    """(tokenizer, text encoder on the device) of the pipeline, quantized or offloaded as asked."""
    device, dtype = encoding_device_and_dtype(config.mixed_precision)
    kwargs = {}
    if config.text_encoder_quant_backend != "none":
        quantize.require(config.text_encoder_quant_backend, device, "--text_encoder_quant_backend")
        kwargs["quantization_config"] = quantize.transformers_config(config.text_encoder_quant_backend,
                                                                     config.text_encoder_quant_type, dtype)
    tokenizer, text_encoder = models.spec().load_text_encoder(models, dtype, **kwargs)
    if config.text_encoder_cpu_offload and device.type == "cuda":  # each layer comes to the GPU as it runs
        from accelerate import cpu_offload

        cpu_offload(text_encoder, execution_device=device)
    elif config.text_encoder_quant_backend not in quantize.CUDA_ONLY:  # (bitsandbytes loaded it on the GPU)
        text_encoder.to(device)
    return tokenizer, text_encoder


def free(device: torch.device) -> None:
    """Give the memory of a model just deleted back, so that the next model has all of it."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


CAPTION_BATCH = 8  # captions tokenized (and checked for stop requests) together; T5 runs on each alone


def encode_captions(captions: list[str], config: PreprocessConfig, models: ModelConfigs,
                     writer: CacheWriter, stop: StopRequests, batch_size: int = CAPTION_BATCH) -> dict[str, str]:
    """T5-encode captions padded to the model's text length, each on its own; returns tensor key -> shard."""
    spec = models.spec()
    tokenizer, text_encoder = _load_text_encoder(config, models)
    store_dtype = schema.DTYPES[config.latent_dtype]
    shards, truncated = {}, 0
    for start in logs.progress(range(0, len(captions), batch_size), desc="encoding captions", unit="batch"):
        batch = captions[start:start + batch_size]
        embeds, cut = spec.embed_texts(batch, tokenizer, text_encoder)
        truncated += cut
        for caption, embed in zip(batch, embeds):
            for name, tensor in embed.items():
                key = schema.caption_tensor_key(schema.caption_key(caption), name)
                shards[key] = writer.add_tensor(key, tensor.to(store_dtype))
            if writer.should_flush():
                writer.flush()
        stop_if_requested(stop, writer)
    if truncated:
        logs.message(f"warning: {truncated} caption(s) are longer than {spec.text_length} tokens and were truncated.")
    del text_encoder
    free(encoding_device_and_dtype(config.mixed_precision)[0])  # T5 is gone before the VAE loads
    return shards


@torch.no_grad()
def encode_validation(config: PreprocessConfig, models: ModelConfigs, cache_path: Path, entries: list) -> int:
    """Encode the prompts of the validation `entries` (checked by checked_validation_entries, each with
    its size) and the empty prompt (the negative prompt, and what --caption_dropout_technique empty
    trains on, so it is always stored) with T5 and, for image-to-video models, their images with the
    VAE at each one's size, into the cache's validation folder, so that training can generate without
    either. Only what is missing is encoded; returns how many files were written."""
    written = 0
    texts = [text for text in dict.fromkeys(["", *(entry.prompt for entry in entries)])
             if not schema.validation_text_path(cache_path, text).is_file()]
    if texts:
        tokenizer, text_encoder = _load_text_encoder(config, models)
        embeds, truncated = models.spec().embed_texts(texts, tokenizer, text_encoder)
        for text, embed in zip(texts, embeds):
            write_tensors(schema.validation_text_path(cache_path, text), {k: t.float() for k, t in embed.items()},
                                 {"prompt": text})
        written += len(texts)
        if truncated:
            logs.message(f"warning: {truncated} validation prompt(s) are longer than the model's text length and "
                         "were truncated.")
        del text_encoder
    pending, spec = {}, models.spec()
    for entry in entries:
        if entry.image:
            path = schema.validation_image_path(cache_path, files.sha256_file(entry.image), entry.height, entry.width,
                                                entry.num_frames if spec.first_frame_depends_on_frames else None)
            if not path.is_file():
                pending[path] = entry
    if pending:
        device, dtype = encoding_device_and_dtype(config.mixed_precision)
        vae = spec.load_vae(models, device, dtype, config.enable_slicing, config.enable_tiling)
        encoders = spec.first_frame_encoders(models, vae, device, dtype)
        for path, entry in pending.items():
            pixels = first_frame_pixels(entry.image, entry.height, entry.width)  # [C, 1, H, W]
            encoded = spec.encode_first_frame(encoders, pixels[None].to(device, dtype), entry.num_frames)
            write_tensors(path, {name: tensor.float() for name, tensor in encoded.items()},
                                 {"image": str(entry.image)})
        written += len(pending)
        del vae
    return written


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


@dataclass(frozen=True)
class Encoded:
    """One video done: the stored latents of each of its windows (by start; one, at 0, with
    --frame_extraction head), or why it could not be used."""

    sha256: str
    path: Path
    windows: dict[int, schema.VideoLatent]
    failure: tuple[str, str] | None = None  # (kind, message)


@torch.no_grad()
def encode_videos(videos: list[tuple[str, Path]], config: PreprocessConfig, models: ModelConfigs,
                  writer: CacheWriter, image_variants: int, stop: StopRequests,
                  clip_settings: dict[str, str] | None = None) -> Iterator[Encoded]:
    """Decode clips in DataLoader workers and VAE-encode them one at a time (and, for image-to-video
    models, their noised first frames). Yields each video once its tensors are queued in the writer
    (or it failed), so that the caller adds its index rows before the writer's next flush."""
    if not videos:  # nothing to encode: no VAE to load
        return
    paths = dict(videos)
    jobs = [(path, sha) for sha, path in videos]
    limit = failure_limit(config.max_failures, len(jobs))
    loader = torch.utils.data.DataLoader(ClipDataset(jobs, config, clip_settings or {}, models.spec().frame_step), batch_size=1, collate_fn=_first,
                                         num_workers=config.dataloader_num_workers,
                                         worker_init_fn=ignore_stop_signals)
    clips = iter(loader)  # the decode workers start now, before the VAE exists: none holds a copy of it
    device, dtype = encoding_device_and_dtype(config.mixed_precision)
    spec = models.spec()
    vae = spec.load_vae(models, device, dtype, config.enable_slicing, config.enable_tiling)
    first_frame_encoders = spec.first_frame_encoders(models, vae, device, dtype) if image_variants else None
    store_dtype = schema.DTYPES[config.latent_dtype]

    windows_left: dict[str, int] = {}  # video -> its windows not encoded yet
    done: dict[str, dict[int, schema.VideoLatent]] = {}  # video -> its windows encoded so far

    def encode(sha: str, start: int, clip: Clip) -> Iterator[Encoded]:
        # Each clip, and each of its noised first frames, through the VAE on its own: the cache is
        # content-addressed, and a batch of several gives other bytes (convolution kernels block
        # and sum by the batch's shape, on CPUs and GPUs alike).
        key = schema.window_key(sha, start)
        encoded = spec.encode_pixels(vae, clip.pixels[None].to(device, dtype))
        shards = {writer.add_tensor(schema.video_tensor_key(key, name), tensor.to(store_dtype))
                  for name, tensor in encoded.items()}
        latent_shape = list(encoded[spec.tensors.video[0]].shape)
        sigmas = []
        if image_variants:
            if spec.noised_first_frame:
                sigmas, generator = first_frame_noise(config.seed, schema.window_source(sha, start), image_variants)
                images = noised_first_frames(clip.pixels, sigmas, generator)
            else:  # the first frame as it is: one encoding, noise 0
                sigmas, images = [0.0], clip.pixels[:, :1][None].float()
            for variant in range(len(sigmas)):
                first = spec.encode_first_frame(first_frame_encoders, images[variant:variant + 1].to(device, dtype),
                                                clip.pixels.shape[1])
                shards |= {writer.add_tensor(schema.first_frame_tensor_key(key, variant, name), tensor.to(store_dtype))
                           for name, tensor in first.items()}
        (shard,) = shards  # a window's tensors go into one shard (the writer flushes between windows only)
        frames, height, width = clip.pixels.shape[1:]
        done.setdefault(sha, {})[start] = schema.VideoLatent(
            frame_indices=clip.frame_indices, source_fps=clip.source_fps, source_height=clip.source_height,
            source_width=clip.source_width, num_frames=frames, height=height, width=width,
            bucket=bucket_name((frames, height, width)), decoder=clip.decoder, latent_shape=latent_shape,
            latent_shard=shard, latent_key=key, image_noise_sigmas=sigmas,
        )
        windows_left[sha] -= 1
        if not windows_left[sha]:  # the video's rows go in together: a stop never leaves part of them
            del windows_left[sha]
            yield Encoded(sha, paths[sha], done.pop(sha))
        if writer.should_flush():
            writer.flush()

    failed = 0
    progress = logs.progress(clips, total=len(jobs), desc="encoding videos", unit="clip")
    for read, (sha, windows, failure) in enumerate(progress, start=1):
        if windows is None:
            failed += 1
            logs.message(f"skipped {paths[sha]}: {failure[1]}", path=str(paths[sha]), reason=failure[1])
            yield Encoded(sha, paths[sha], {}, failure)
            if limit is not None and failed > limit:
                writer.flush()  # everything encoded so far stays in the cache for the next run
                raise CogtuneError(
                    f"Stopped: {failed} of the {read} clips read so far could not be used, more than "
                    f"--max_failures {config.max_failures:g} allows (last: {paths[sha]}: {failure[1]}). "
                    "The clips encoded so far are kept; fix or remove the bad files (their reasons are in the "
                    "cache index) and run again to continue."
                )
        else:
            windows_left[sha] = len(windows)
            for start, clip in windows:
                yield from encode(sha, start, clip)
        progress.set_postfix(failed=failed)
        stop_if_requested(stop, writer)
