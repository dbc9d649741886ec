"""Training sizes: each clip goes to the bucket (frames, height, width) that fits it best.

Buckets come from `--height_buckets` x `--width_buckets` x `--frame_buckets`, or an explicit
`--buckets 49x480x720 49x720x480 ...`. A clip goes to the bucket nearest its aspect ratio, then its
area, among those whose frame count it can fill, and then the longest of those. Batches are built
from one bucket at a time (train.data.epoch_batches).
"""

from __future__ import annotations

import math
import re

from cogtune.data.sources import dataset_clip_configs
from cogtune.errors import CogtuneError

Bucket = tuple[int, int, int]  # frames, height, width


def parse_bucket(text: str, flag: str = "--buckets") -> Bucket:
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*x\s*(\d+)\s*", str(text))
    if not match:
        raise CogtuneError(f"{flag}: {text!r} is not FRAMESxHEIGHTxWIDTH (for example 49x480x720).")
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def bucket_name(bucket: Bucket) -> str:
    return "x".join(map(str, bucket))


def configured_buckets(config) -> list[Bucket] | None:
    """The buckets a preprocess config asks for, checked; None when it asks for one fixed size."""
    grid = (config.height_buckets, config.width_buckets, config.frame_buckets)
    if config.buckets and any(grid):
        raise CogtuneError("Give either --buckets or --height_buckets/--width_buckets/--frame_buckets, not both.")
    if config.buckets:
        buckets = [parse_bucket(text) for text in config.buckets]
    elif any(grid):
        def numbers(values, default, flag):
            try:
                return [int(v) for v in values] if values else [default]
            except ValueError:
                raise CogtuneError(f"{flag} takes whole numbers, got {values}.") from None

        heights = numbers(config.height_buckets, config.height, "--height_buckets")
        widths = numbers(config.width_buckets, config.width, "--width_buckets")
        frames = numbers(config.frame_buckets, config.max_num_frames, "--frame_buckets")
        buckets = [(f, h, w) for f in frames for h in heights for w in widths]
    else:
        return None
    for frames, height, width in buckets:  # (the model's own rules are its family's: check_clip_settings)
        if min(frames, height, width) < 1:
            raise CogtuneError(f"Bucket {frames}x{height}x{width}: frames, height and width must be positive.")
    return sorted(set(buckets))


def clip_sizes(config) -> list[Bucket]:
    """Every (frames, height, width) a preprocess config brings clips to: its buckets, or its one size
    (and the sizes its [[datasets]] tables give their own clips)."""
    sizes = configured_buckets(config) or [(config.max_num_frames, config.height, config.width)]
    for own in dataset_clip_configs(config):
        size = (own.max_num_frames, own.height, own.width)
        if configured_buckets(own) is None and size not in sizes:
            sizes.append(size)
    return sizes


def assign_bucket(buckets: list[Bucket], available_frames: int, height: int, width: int) -> Bucket | None:
    """The bucket for a clip of `available_frames` usable frames and height x width pixels: nearest
    in aspect ratio (on a log scale, so 2:1 and 1:2 are equally far from 1:1), then in area, among
    the buckets whose frame count the clip can fill; the longest of those. None if it fills none."""
    fitting = [b for b in buckets if b[0] <= available_frames]
    if not fitting:
        return None
    aspect, area = math.log(width / height), height * width

    def distance(bucket: Bucket):
        frames, h, w = bucket
        return round(abs(math.log(w / h) - aspect), 9), abs(h * w - area), -frames

    return min(fitting, key=distance)
