"""`cogtune preprocess --preview`: what preprocessing would make of a sample of the clips, before
any GPU time is spent. No model is loaded and nothing is written to the cache.

A sample of the dataset's clips (spread evenly over it) is decoded, resampled, resized and cropped
exactly as preprocess does (the same `clip_windows`, the same size rule, the same seeded random
crop), and each bucket gets a contact sheet: one row per sample (a clip, or each of its windows with
--frame_extraction), the source frame the sample starts at with the crop window drawn on it, then
frames of the sample spread from its first to its last. Wrong crops, rotated phone videos and wrong
frame rates show at a glance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cogtune import data_schema as schema
from cogtune.config import PreprocessConfig
from cogtune.data.buckets import bucket_name, clip_sizes, configured_buckets
from cogtune.data.sources import VideoPaths, clip_config, load_dataset_records
from cogtune.data.video import ClipSkipped, ResizeCrop, open_video, plan_resize_crop, size_rule
from cogtune.errors import CogtuneError, first_line
from cogtune.families import ModelConfigs
from cogtune.preprocess.encode import clip_rng, clip_windows
from cogtune.util import files
from cogtune.util.media import contact_sheet

FRAMES_SHOWN = 6
SOURCE_RED = (255, 40, 40)


def crop_box(plan: ResizeCrop, src_height: int, src_width: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The part of the source frame a clip keeps, in source pixels: (top, left, bottom, right)."""
    scale_y, scale_x = src_height / plan.resize_height, src_width / plan.resize_width
    return (round(plan.top * scale_y), round(plan.left * scale_x), round((plan.top + height) * scale_y),
            round((plan.left + width) * scale_x))


def source_with_box(frame: np.ndarray, box: tuple[int, int, int, int], height: int) -> np.ndarray:
    """The source frame scaled to `height` rows, the crop window drawn on it in red."""
    from PIL import Image, ImageDraw

    scale = height / frame.shape[0]
    image = Image.fromarray(frame).resize((max(1, round(frame.shape[1] * scale)), height), Image.BILINEAR)
    top, left, bottom, right = (round(v * scale) for v in box)
    ImageDraw.Draw(image).rectangle((left, top, right - 1, bottom - 1), outline=SOURCE_RED, width=max(1, height // 48))
    return np.asarray(image)


@dataclass
class Previewed:
    line: str  # one line for the terminal
    bucket: str | None = None
    rows: list[tuple[str, list[np.ndarray]]] | None = None  # one per sample: a clip, or each of its windows


def preview_one(record, config: PreprocessConfig, videos: VideoPaths, rule, frame_step: int) -> Previewed:
    try:
        path, _ = videos.resolve(record)
    except (CogtuneError, OSError) as e:
        return Previewed(f"{record.where}: {first_line(e)}")
    sha = schema.clip_source(files.sha256_file(path), record.clip_settings)
    if record.clip_settings:  # its [[datasets]] table's own clip settings
        config = clip_config(config, record.clip_settings)
        rule = size_rule(config, frame_step)
    try:
        windows = clip_windows(Path(path), config, rule, clip_rng(config, sha))
    except ClipSkipped as e:
        return Previewed(f"{record.where}: skipped ({e.kind}): {e}")
    except Exception as e:  # a decoder crash, as preprocess would record it
        return Previewed(f"{record.where}: skipped (unreadable): {type(e).__name__}: {first_line(e)[:200]}")
    if not windows:
        return Previewed(f"{record.where}: skipped (too short): no window of --max_num_frames {config.max_num_frames}")
    clip = windows[0][1]
    _, frames, height, width = clip.pixels.shape
    plan = plan_resize_crop(clip.source_height, clip.source_width, height, width, config.video_reshape_mode,
                            clip_rng(config, sha))  # the crop preprocess drew, drawn again from the same seed
    box = crop_box(plan, clip.source_height, clip.source_width, height, width)
    firsts = open_video(Path(path)).frames([window.frame_indices[0] for _, window in windows])
    fps = f"{clip.source_fps:g} fps (one frame in {clip.frame_indices[1] - clip.frame_indices[0]})" if (
        config.frame_extraction == "spread" and frames > 1) else f"{config.fps} fps"
    label = (f"{Path(path).name}: {clip.source_width}x{clip.source_height} at {clip.source_fps:g} fps -> "
             f"{len(windows)} sample(s) of {frames} frames of {width}x{height} at {fps}")
    if frames < max(size[0] for size in clip_sizes(config)) and configured_buckets(config) is None:
        label += f"; shorter than --max_num_frames {config.max_num_frames}: a {frames}-frame sample"
    rows = []
    for number, ((start, window), first) in enumerate(zip(windows, firsts)):
        pixels = ((window.pixels.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        picks = np.linspace(0, frames - 1, min(FRAMES_SHOWN, frames)).round().astype(int)
        span = (window.frame_indices[-1] - window.frame_indices[0] + 1) / window.source_fps
        what = f"window {number + 1} of {len(windows)} (start {start})" if len(windows) > 1 else "clip"
        rows.append((f"{Path(path).name}, {what}: source frames {window.frame_indices[0]}-{window.frame_indices[-1]} "
                     f"({span:.1f} s)", [source_with_box(first, box, height), *(pixels[i] for i in picks)]))
    spans = "; ".join(row[0].split(", ", 1)[1] for row in rows)
    return Previewed(f"{record.where}: {label}: {spans}", bucket_name((frames, height, width)), rows)


def preview(config: PreprocessConfig) -> str:
    """Write a contact sheet per bucket for a sample of the clips; returns what to print."""
    records, _ = load_dataset_records(config)
    if not records:
        raise CogtuneError("The dataset has no records to preview.")
    count = min(config.preview_samples, len(records))
    picks = sorted(set(np.linspace(0, len(records) - 1, count).round().astype(int).tolist()))
    out_dir = Path(config.preview_dir or Path(config.cache_root) / "preview")
    files.ensure_writable_dir(out_dir, "--preview_dir")
    frame_step = ModelConfigs.of(config).spec().frame_step  # the model's frame rule (its config files alone)
    videos, rule = VideoPaths(config.allow_symlinks_outside_root), size_rule(config, frame_step)
    previewed = [preview_one(records[i], config, videos, rule, frame_step) for i in picks]
    by_bucket: dict[str, list] = {}
    for item in previewed:
        if item.bucket is not None:
            by_bucket.setdefault(item.bucket, []).extend(item.rows)
    sheets = []
    for bucket, rows in sorted(by_bucket.items()):
        sheets.append(out_dir / f"preview-{bucket}.png")
        contact_sheet(rows, sheets[-1])
    lines = [f"Preview of {len(picks)} of {len(records)} clips, as preprocess would make them (--frame_extraction "
             f"{config.frame_extraction}, crop mode {config.video_reshape_mode}; the red box is the part of the "
             "source kept):"]
    lines += [f"  {item.line}" for item in previewed]
    lines += [f"contact sheet: {path} ({len(by_bucket[path.stem.removeprefix('preview-')])} samples)" for path in sheets]
    return "\n".join(lines)
