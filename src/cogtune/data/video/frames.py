"""Which source frames make a clip, as pure functions: resampling to --fps, the span a clip reads,
the windows --frame_extraction cuts, and the frame-count rule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from cogtune.errors import CogtuneError


class ClipSkipped(CogtuneError):
    """A clip that cannot be used; the message is the reason recorded in the index, `kind` the
    short category the preprocess summary counts."""

    def __init__(self, message: str, kind: str = "unreadable"):
        super().__init__(message)
        self.kind = kind


def largest_frame_count(frames: int, frame_step: int) -> int:
    """The largest count of the form frame_step * k + 1 not above `frames` (a model's VAE takes such
    counts: 4k+1 for CogVideoX; its family says)."""
    if frames < 1:
        raise ValueError("need at least one frame")
    return (frames - 1) // frame_step * frame_step + 1


def resample_indices(times: list[float], target_fps: float, skip_start: int = 0, skip_end: int = 0,
                     most: int | None = None) -> list[int]:
    """Indices of every source frame a clip at `target_fps` can use, from the frames' timestamps.

    Frames are taken from the start after `skip_start` frames, and stop before the last `skip_end`.
    A source faster than `target_fps` is resampled: frame k is the source frame nearest to time
    t0 + k / target_fps (ties go to the later frame). A source at or below `target_fps` keeps every
    frame: nothing is duplicated, so its motion plays faster when shown at `target_fps`. Timestamps
    make this right for variable frame rates and for containers whose fps is wrong. "Faster" is
    judged by the mean rate of the first `most` usable frames (all of them when `most` is None): the
    frames a clip of at most `most` frames is made of, so that what comes later in a long source
    does not change the clip, and a source read only as far as the clip needs (`Span.decided_by`)
    gives the clip the whole source gives.
    """
    usable = len(times) - skip_start - skip_end
    if usable < 1:
        raise ClipSkipped(
            f"no frames left: the video has {len(times)} frames and --skip_frames_start/--skip_frames_end "
            f"drop {skip_start}+{skip_end}", kind="too short"
        )
    stamps = np.asarray(times[skip_start:skip_start + usable], dtype=np.float64)
    judged = stamps[:most] if most else stamps
    if usable == 1 or (judged[-1] - judged[0]) * target_fps >= (len(judged) - 1) * (1 - 1e-6):
        return list(range(skip_start, skip_start + usable))
    targets = stamps[0] + np.arange(math.floor((stamps[-1] - stamps[0]) * target_fps + 1e-6) + 1) / target_fps
    after = np.clip(np.searchsorted(stamps, targets - 1e-9), 1, usable - 1)
    nearer_before = (targets - stamps[after - 1]) < (stamps[after] - targets) - 1e-9
    return (skip_start + np.where(nearer_before, after - 1, after)).tolist()


# Frame rates cameras and encoders use; a rate measured from rounded times is taken to be one of
# these where the times fit it.
COMMON_RATES = (8, 10, 12, 12.5, 15, 24000 / 1001, 24, 25, 30000 / 1001, 30, 48, 50, 60000 / 1001, 60, 90, 100,
                120, 240)


def on_the_rate(times: list[float], said: float | None) -> tuple[list[float], float | None]:
    """Frame times as the constant-rate grid they are, where they are one, and its rate.

    Containers round times to their time base (WebM and MKV to 1 ms) and decord hands them out as
    float32, which turns exact ties between frames (a 30 fps source resampled to 24 fps has one
    every 4 frames) into near-ties that go either way, differently per container and decoder.
    Where every time is within 1 ms (and a tenth of a frame) of t0 + i / rate, the grid's times are
    returned, trying the rate the container says, then a common rate near the measured one, then
    the measured one; else the times as they are, and None."""
    stamps = np.asarray(times, dtype=np.float64)
    if len(stamps) < 2 or stamps[-1] <= stamps[0]:
        return list(times), None
    measured = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    near = [rate for rate in COMMON_RATES if abs(rate / measured - 1) < 0.005]
    for rate in (said, *near, measured):
        if not rate:
            continue
        grid = stamps[0] + np.arange(len(stamps)) / rate
        if np.abs(stamps - grid).max() <= min(1e-3, 0.1 / rate):
            return grid.tolist(), float(rate)
    return list(times), None


@dataclass(frozen=True)
class Span:
    """The part of a source one clip is made of: frames at `fps` after the first `skip_start`,
    stopping `skip_end` frames before the source ends, and at most as many as `largest(height,
    width)`, the (frames, height, width) the size rule gives a clip long enough (None: read the
    whole source)."""

    fps: float
    skip_start: int = 0
    skip_end: int = 0
    largest: Callable[[int, int], tuple[int, int, int]] | None = None

    def most(self, height: int, width: int) -> int | None:
        return self.largest(height, width)[0] if self.largest else None

    def decided_by(self, times: list[float], height: int, width: int) -> bool:
        """Whether the first frames of a source, at `times` (sorted), already decide the clip:
        `resample_indices` on them gives the frames it gives on the whole source. They must hold
        more than `most` usable frames, reaching past the time of the last one the clip can take
        (so that each is the nearest there is), and `skip_end` frames after those."""
        most = self.most(height, width)
        if most is None:
            return False
        body = times[self.skip_start:len(times) - self.skip_end]
        return len(body) > most and body[-1] - body[0] >= most / self.fps


def select_frame_indices(num_source_frames: int, source_fps: float, target_fps: float, max_frames: int,
                         skip_start: int = 0, skip_end: int = 0, *, frame_step: int) -> list[int]:
    """Source frame indices of a constant-rate clip: `resample_indices` at times i / source_fps,
    cut to `max_frames`, or to the largest frame_step * k + 1 the clip holds when it is shorter."""
    candidates = resample_indices([i / source_fps for i in range(num_source_frames)], target_fps, skip_start,
                                  skip_end)
    return candidates[:largest_frame_count(min(max_frames, len(candidates)), frame_step)]


SizeRule = Callable[[int, int, int], tuple[int, int, int]]  # (usable frames, height, width) -> (F, H, W)


def spread_indices(count: int, max_frames: int, skip_start: int = 0, skip_end: int = 0) -> list[int]:
    """The source frames the diffusers scripts take (--frame_extraction spread): of the `count`
    frames after `skip_start` and before the last `skip_end`, all when they are at most
    `max_frames`, else every (usable // max_frames)-th from the first, `max_frames` of them, at the
    source's own frame rate (--fps plays no part)."""
    start, end = min(skip_start, count), max(0, count - skip_end)
    if end <= start:
        raise ClipSkipped(f"no frames left: the video has {count} frames and --skip_frames_start/--skip_frames_end "
                          f"drop {skip_start}+{skip_end}", kind="too short")
    step = max(1, (end - start) // max_frames)
    return list(range(start, end, step))[:max_frames]


def window_starts(frames: int, length: int, extraction: str, stride: int = 1, count: int = 1,
                  most: int | None = None) -> list[int]:
    """Where the windows of `length` frames of a clip of `frames` usable frames (at --fps) start:
    head: only at 0; chunk: every `length` frames; slide: every `stride` frames; uniform: `count`
    starts spread evenly from 0 to the last possible one. At most `most` of them, the first."""
    last = frames - length
    if last < 0:
        return []
    if extraction == "head":
        starts = [0]
    elif extraction == "chunk":
        starts = list(range(0, last + 1, length))
    elif extraction == "slide":
        starts = list(range(0, last + 1, stride))
    elif extraction == "uniform":
        starts = sorted({round(last * i / (count - 1)) for i in range(count)}) if count > 1 else [0]
    else:
        raise ValueError(f"unknown frame extraction {extraction!r}")
    return starts[:most]
