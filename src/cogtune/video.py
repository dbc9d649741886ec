"""Decoding, frame selection, resizing and cropping of training clips.

The planning functions (`select_frame_indices`, `plan_resize_crop`) are pure; `read_clip` is the
thin part that touches files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import CogtuneError


class ClipSkipped(CogtuneError):
    """A clip that cannot be used; the message is the reason recorded in the index."""


def largest_4k_plus_1(frames: int) -> int:
    """The CogVideoX VAE takes 4k+1 frames: the largest such count not above `frames`."""
    if frames < 1:
        raise ValueError("need at least one frame")
    return (frames - 1) // 4 * 4 + 1


def select_frame_indices(num_source_frames: int, source_fps: float, target_fps: float, max_frames: int,
                         skip_start: int = 0, skip_end: int = 0) -> list[int]:
    """Source frame indices of a training clip.

    Frames are taken from the start of the clip after `skip_start` frames, and stop before the last
    `skip_end`. A source faster than `target_fps` is resampled to it (frame k is the source frame
    nearest to time k / target_fps). A source at or below `target_fps` keeps every frame: nothing is
    duplicated, so its motion plays faster when the clip is shown at `target_fps`. The count is
    `max_frames`, or the largest 4k+1 the clip holds when it is shorter.
    """
    usable = num_source_frames - skip_start - skip_end
    if usable < 1:
        raise ClipSkipped(
            f"no frames left: the video has {num_source_frames} frames and --skip_frames_start/--skip_frames_end "
            f"drop {skip_start}+{skip_end}"
        )
    step = source_fps / target_fps if source_fps > target_fps else 1.0
    available = math.floor((usable - 1) / step + 1e-9) + 1
    count = largest_4k_plus_1(min(max_frames, available))
    return [skip_start + math.floor(k * step + 0.5) for k in range(count)]


@dataclass(frozen=True)
class ResizeCrop:
    resize_height: int
    resize_width: int
    top: int
    left: int


def plan_resize_crop(src_height: int, src_width: int, height: int, width: int, mode: str,
                     rng: np.random.Generator | None = None) -> ResizeCrop:
    """How to bring a frame to height x width.

    center/random: keep the aspect ratio, resize so the frame covers the target, then crop the
    centre or a random window (rng). none: resize straight to the target.
    """
    if mode == "none":
        return ResizeCrop(height, width, 0, 0)
    scale = max(height / src_height, width / src_width)
    resize_height = max(height, round(src_height * scale))
    resize_width = max(width, round(src_width * scale))
    if mode == "center":
        return ResizeCrop(resize_height, resize_width, (resize_height - height) // 2, (resize_width - width) // 2)
    if mode == "random":
        if rng is None:
            raise ValueError("random crops need an rng")
        top = int(rng.integers(0, resize_height - height + 1))
        left = int(rng.integers(0, resize_width - width + 1))
        return ResizeCrop(resize_height, resize_width, top, left)
    raise ValueError(f"unknown video_reshape_mode {mode!r}")


def resize_crop(frames: torch.Tensor, plan: ResizeCrop, height: int, width: int) -> torch.Tensor:
    """frames: [F, C, H, W] float -> [F, C, height, width]."""
    if frames.shape[-2:] != (plan.resize_height, plan.resize_width):
        frames = F.interpolate(frames, size=(plan.resize_height, plan.resize_width), mode="bilinear",
                               antialias=True, align_corners=False)
    return frames[:, :, plan.top:plan.top + height, plan.left:plan.left + width]


def to_model_range(frames_uint8: np.ndarray) -> torch.Tensor:
    """[F, H, W, 3] uint8 -> [F, 3, H, W] float32 in [-1, 1]."""
    frames = torch.from_numpy(np.ascontiguousarray(frames_uint8)).permute(0, 3, 1, 2).float()
    return frames / 127.5 - 1.0


@dataclass
class Clip:
    pixels: torch.Tensor  # [C, F, H, W] float32 in [-1, 1]
    frame_indices: list[int]
    source_fps: float
    source_height: int
    source_width: int


def read_clip(path: Path, height: int, width: int, fps: float, max_frames: int, skip_start: int, skip_end: int,
              mode: str, rng: np.random.Generator | None) -> Clip:
    """Decode the frames of one training clip and bring them to the training size."""
    import decord

    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    except Exception as e:  # decord raises bare DECORDError/RuntimeError
        raise ClipSkipped(f"cannot open video: {str(e).splitlines()[0][:200]}") from None
    num_frames = len(reader)
    source_fps = float(reader.get_avg_fps())
    if num_frames < 1 or not source_fps > 0:
        raise ClipSkipped(f"the video reports {num_frames} frames at {source_fps} fps")
    indices = select_frame_indices(num_frames, source_fps, fps, max_frames, skip_start, skip_end)
    try:
        frames = reader.get_batch(indices).asnumpy()
    except Exception as e:
        raise ClipSkipped(f"decode error: {str(e).splitlines()[0][:200]}") from None
    if frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[-1] != 3:
        raise ClipSkipped(f"the decoder returned frames of shape {tuple(frames.shape)} for {len(indices)} frames")
    source_height, source_width = frames.shape[1:3]
    pixels = to_model_range(frames)
    plan = plan_resize_crop(source_height, source_width, height, width, mode, rng)
    pixels = resize_crop(pixels, plan, height, width).clamp(-1.0, 1.0)
    return Clip(pixels.permute(1, 0, 2, 3).contiguous(), indices, source_fps, source_height, source_width)
