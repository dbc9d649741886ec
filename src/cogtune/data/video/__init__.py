"""Decoding, frame selection, resizing and cropping of training clips.

    frames.py     which source frames make a clip (pure)
    geometry.py   resize, crop, orientation; first frames as model input
    container.py  what a file's bytes say before decoding
    decoders.py   decord and PyAV behind open_video

The planning functions (`resample_indices`, `Span`, `plan_resize_crop`) are pure; `read_clip` is
the thin part that touches files: it reads a source only as far as the clip needs, and holds one
source frame at a time, so its cost follows the clip, not the source."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cogtune.data.buckets import Bucket, assign_bucket, configured_buckets
from cogtune.data.video.container import REORDER_DEPTH, _Fallback, decode_budget, not_a_video
from cogtune.data.video.decoders import DecordVideo, PyAVVideo, decode_cost, open_video
from cogtune.data.video.frames import (ClipSkipped, SizeRule, Span, largest_frame_count, on_the_rate, resample_indices,
                                       select_frame_indices, spread_indices, window_starts)
from cogtune.data.video.geometry import (ResizeCrop, first_frame_pixels, plan_resize_crop, resize_crop, to_clip_size,
                                         to_model_range)

__all__ = ["REORDER_DEPTH", "Clip", "ClipSkipped", "DecordVideo", "PyAVVideo", "ResizeCrop", "SizeRule", "Span",
           "decode_budget", "decode_cost", "first_frame_pixels", "fixed_size", "largest_frame_count", "not_a_video",
           "on_the_rate", "open_video", "plan_resize_crop", "read_clip", "read_spread_clip", "read_windows",
           "resample_indices", "resize_crop", "size_rule", "select_frame_indices", "spread_indices", "to_clip_size",
           "to_model_range", "window_starts"]


@dataclass
class Clip:
    pixels: torch.Tensor  # [C, F, H, W] float32 in [-1, 1]
    frame_indices: list[int]
    source_fps: float
    source_height: int
    source_width: int
    decoder: str = "decord"


def fixed_size(height: int, width: int, max_frames: int, frame_step: int) -> SizeRule:
    """One training size: max_frames, or the largest frame_step * k + 1 a shorter clip holds."""
    return lambda available, _h, _w: (largest_frame_count(min(max_frames, available), frame_step), height, width)


def read_spread_clip(path: Path, size: SizeRule, skip_start: int, skip_end: int, mode: str,
                     rng: np.random.Generator | None) -> Clip:
    """One clip of frames spread over the whole source as the diffusers scripts spread them
    (spread_indices, as many as the size rule allows, then the largest 4k+1), resized and cropped
    as every clip is. The whole source's frame times are read."""
    return _read_one_clip(path, size, None, mode, rng, lambda video: spread_indices(
        len(video.frame_times), size(sys.maxsize, video.height, video.width)[0], skip_start, skip_end))


def read_windows(path: Path, size: SizeRule, fps: float, skip_start: int, skip_end: int, mode: str,
                 rng: np.random.Generator | None, starts_of) -> list[tuple[int, Clip]]:
    """The windows of one source as clips, each with its start: `starts_of(frames, length)` says
    where they start among the source's usable frames at `fps` (window_starts), `size` how long they
    are and their pixel size (from the whole source: every window of a clip lands in one bucket).
    The source is read once, each frame wanted by a window decoded and resized once; every window
    has the one crop."""
    def decode(video):
        candidates = resample_indices(video.frame_times, fps, skip_start, skip_end)
        length, height, width = size(len(candidates), video.height, video.width)
        starts = starts_of(len(candidates), length)
        wanted = sorted({candidates[start + k] for start in starts for k in range(length)})
        plan = plan_resize_crop(video.height, video.width, height, width, mode, rng)
        resized = {}
        for index, frame in zip(wanted, video.iter_frames(wanted)):
            resized[index] = to_clip_size(frame[None], plan, height, width)[0]
            del frame
        windows = []
        for start in starts:
            indices = candidates[start:start + length]
            pixels = torch.stack([resized[i] for i in indices], dim=1)
            windows.append((start, Clip(pixels, indices, float(video.fps), int(video.height), int(video.width),
                                        video.name)))
        return windows

    return _decoded(path, None, rng, decode)


def _decoded(path: Path, span: Span | None, rng: np.random.Generator | None, decode):
    """decode(video) on the reader open_video picks; when that reader fails mid-clip, again on the
    one nothing misleads (PyAV decoding every frame), with the same random crop."""
    state = rng.bit_generator.state if rng is not None else None
    try:
        return decode(open_video(path, span))
    except _Fallback:
        if rng is not None:
            rng.bit_generator.state = state
        return decode(PyAVVideo(path, span, from_packets=False))


def read_clip(path: Path, size: SizeRule, fps: float, skip_start: int, skip_end: int, mode: str,
              rng: np.random.Generator | None) -> Clip:
    """Decode the frames of one training clip and bring them to the size `size` picks for it,
    reading the source only as far as the clip needs."""
    span = Span(fps, skip_start, skip_end, largest=lambda height, width: size(sys.maxsize, height, width))
    return _read_one_clip(path, size, span, mode, rng, lambda video: resample_indices(
        video.frame_times, fps, skip_start, skip_end, span.most(video.height, video.width)))


def _read_one_clip(path: Path, size: SizeRule, span: Span | None, mode: str, rng: np.random.Generator | None,
                   candidates_of) -> Clip:
    """One clip of the source frames `candidates_of(video)` picks (the first of them the size rule
    takes), each resized and cropped as it is decoded."""
    def decode(video):
        candidates = candidates_of(video)
        num_frames, height, width = size(len(candidates), video.height, video.width)
        indices = candidates[:num_frames]
        plan = plan_resize_crop(video.height, video.width, height, width, mode, rng)
        # Each frame is resized as it is decoded, so memory follows the output size, not the source's.
        pixels = torch.empty(3, len(indices), height, width)
        number = 0  # not enumerate: its tuple would hold the last frame while the next is decoded
        for frame in video.iter_frames(indices):
            pixels[:, number] = to_clip_size(frame[None], plan, height, width)[0]
            number += 1
            del frame  # one source frame at a time
        return video, indices, pixels

    video, indices, pixels = _decoded(path, span, rng, decode)
    return Clip(pixels, indices, float(video.fps), int(video.height), int(video.width), video.name)


# --- the size each clip is brought to -------------------------------------------------------


def size_rule(config, frame_step: int) -> SizeRule:
    """How preprocess sizes each clip: by bucket, or at the one configured size; a clip of fewer usable
    frames than --min_num_frames is skipped as too short (a 0.3 s clip would be a 1-frame sample)."""
    sized = _sized(config, frame_step)
    least = config.min_num_frames

    def rule(available: int, height: int, width: int) -> Bucket:
        if available < least:
            raise ClipSkipped(f"too short: {available} usable frame(s) at --fps, fewer than --min_num_frames {least}",
                              kind="too short")
        return sized(available, height, width)

    return rule


def _sized(config, frame_step: int) -> SizeRule:
    buckets = configured_buckets(config)
    if buckets is None:
        return fixed_size(config.height, config.width, config.max_num_frames, frame_step)

    def rule(available: int, height: int, width: int) -> Bucket:
        bucket = assign_bucket(buckets, available, height, width)
        if bucket is None:
            shortest = min(b[0] for b in buckets)
            raise ClipSkipped(f"too short: {available} usable frames at --fps, the shortest bucket has {shortest}",
                              kind="too short")
        return bucket

    return rule
