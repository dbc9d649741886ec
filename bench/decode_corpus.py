"""Check cogtune's decoding against an independent decode, on a folder of real media files.

    .venv/bin/python bench/decode_corpus.py [FOLDER ...] [--generated] [--out bench/results/decode-corpus]

Every file under the folders is read as training clips in several settings (8 fps and 24 fps, 9 and
49 frames, from the start and 10 frames in, at a small size that sends it to PyAV and at the
source's size, which lets decord read a small source), through `read_clip`, as preprocess reads
it. Each clip is then made again independently: PyAV decodes every frame from the start, the frames
nearest each target time are found by a plain loop (within 1 ms of the nearest, since containers
round times to 1 ms; a source no faster than the target keeps every frame), the frames are turned
by FFmpeg's rotation angle, made float and resized whole with torch. Each clip is either equal
(every frame one of the nearest, pixels within 1e-5) or skipped with its reason; anything else is
a wrong clip, and the script exits 1.

The independent turn is FFmpeg's angle alone, so a file whose display matrix mirrors is reported
as such (`mirrored`) instead of compared pixel for pixel (tests/unit/data/test_decoding.py checks those).
`--generated` adds files written here of each container and quirk the decoders are known to trip on
(edit lists, rotation, misreported rates, B-frames in AVI, MPEG-TS gaps, variable rates, 10-bit, AV1,
a long source). Use it on your own dataset before spending GPU hours on it.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the clip writers the tests use
import torch
import torch.nn.functional as F

SETTINGS = [  # fps, max frames, skip_frames_start, size ("small" or "source")
    (8, 9, 0, "small"), (8, 49, 0, "small"), (24, 9, 10, "small"), (8, 9, 0, "source"), (24, 49, 0, "source"),
]


def independent_frames(path: Path, keep: int = 600) -> tuple[list[float], list[np.ndarray], bool]:
    """Every frame's time, decoded from the start, the first `keep` frames as shown (turned by
    FFmpeg's angle), and whether the display matrix mirrors. Frames come out in display order;
    some containers label them out of order (AVI with B-frames), so the k-th is at the k-th time."""
    from av.sidedata.sidedata import Type

    times, frames, mirrored = [], [], False
    with av.open(str(path)) as container:
        for frame in container.decode(container.streams.video[0]):
            data = frame.side_data.get(Type.DISPLAYMATRIX)
            if data is not None:
                a, b, _, c, d = struct.unpack("=9i", bytes(data))[:5]
                mirrored = a * d - b * c < 0
            if len(frames) < keep:
                frames.append(np.rot90(frame.to_ndarray(format="rgb24"), round((frame.rotation or 0) / 90) % 4))
            times.append(float(frame.time) if frame.time is not None else (times[-1] + 1 / 30 if times else 0.0))
    return sorted(times), frames, mirrored


def nearest_frames(times: list[float], fps: float, most: int, skip: int) -> list[set[int]]:
    """For each time t0 + k / fps, the frames nearest to it: any frame within 1 ms of the nearest
    distance counts (containers round times to 1 ms, which decides exact ties either way). Every
    frame, one by one, when the first `most` frames are no faster than fps."""
    usable = times[skip:]
    if not usable:
        return []
    window = usable[:most]
    if len(usable) == 1 or (window[-1] - window[0]) * fps >= (len(window) - 1) * (1 - 1e-3):
        return [{skip + i} for i in range(len(usable))]
    picked, k = [], 0
    while usable[0] + k / fps <= usable[-1] + 1e-3:
        target = usable[0] + k / fps
        nearest = min(abs(time - target) for time in usable)
        picked.append({skip + i for i, time in enumerate(usable) if abs(time - target) <= nearest + 1e-3})
        k += 1
    return picked


def check(path: Path) -> list[dict]:
    from cogtune.data.video import ClipSkipped, fixed_size, largest_frame_count, plan_resize_crop, read_clip

    rows = []
    reference = None
    for fps, frames, skip, size in SETTINGS:
        row = {"file": path.name, "fps": fps, "frames": frames, "skip": skip, "size": size}
        try:
            if size == "small":
                height, width = 32, 48
            else:  # the source's size as shown, in multiples of 16, from a first small read
                shown = read_clip(path, fixed_size(32, 32, 1, 4), fps, 0, 0, "center", None)
                height, width = max(16, shown.source_height // 16 * 16), max(16, shown.source_width // 16 * 16)
            clip = read_clip(path, fixed_size(height, width, frames, 4), fps, skip, 0, "center", None)
        except ClipSkipped as e:
            rows.append({**row, "result": "skipped", "reason": str(e).splitlines()[0], "kind": e.kind})
            continue
        except Exception as e:  # a crash is a finding
            rows.append({**row, "result": "crash", "reason": f"{type(e).__name__}: {e}"})
            continue
        try:
            reference = reference or independent_frames(path)
        except (av.error.FFmpegError, IndexError) as e:
            rows.append({**row, "decoder": clip.decoder, "result": "WRONG",
                         "reason": f"read, where an independent decode fails: {e}"})
            continue
        times, images, mirrored = reference
        acceptable = nearest_frames(times, fps, frames, skip)
        acceptable = acceptable[:largest_frame_count(min(frames, len(acceptable)), 4)]
        row.update(decoder=clip.decoder, indices_equal=len(clip.frame_indices) == len(acceptable) and all(
            index in allowed for index, allowed in zip(clip.frame_indices, acceptable)))
        if mirrored or not row["indices_equal"]:
            rows.append({**row, "result": "mirrored" if mirrored else "WRONG"})
            continue
        source = torch.from_numpy(np.stack([np.ascontiguousarray(images[i]) for i in clip.frame_indices]))
        source = source.permute(0, 3, 1, 2).float() / 127.5 - 1
        plan = plan_resize_crop(source.shape[2], source.shape[3], height, width, "center")
        if source.shape[-2:] != (plan.resize_height, plan.resize_width):
            source = F.interpolate(source, size=(plan.resize_height, plan.resize_width), mode="bilinear",
                                   antialias=True, align_corners=False)
        source = source[:, :, plan.top:plan.top + height, plan.left:plan.left + width].clamp(-1, 1)
        same_shape = tuple(clip.pixels.shape) == (3, *source.shape[:1], height, width)
        difference = float((clip.pixels.permute(1, 0, 2, 3) - source).abs().max()) if same_shape else float("inf")
        equal = row["indices_equal"] and difference <= 1e-5
        rows.append({**row, "max_difference": difference, "result": "equal" if equal else "WRONG"})
    return rows


def generated(folder: Path) -> Path:
    """A file of each known quirk, as the tests write them."""
    from clips import set_mp4_rotation, write_clip, write_clip_with_lead_in, write_long_clip

    folder.mkdir(parents=True, exist_ok=True)
    vfr = [i * 0.04 for i in range(30)] + [1.2 + k * 0.125 for k in range(1, 40)]
    gap = [i * 0.04 for i in range(40)] + [2.1 + k * 0.04 for k in range(40)]
    write_clip(folder / "h264.mp4", count=90, fps=30)
    write_clip(folder / "bframes.mp4", count=150, fps=30, options={"bf": "3", "g": "30"})
    write_clip(folder / "rotated.mp4", count=60, fps=30, rotation=90)
    write_clip(folder / "rotated.mov", count=60, fps=30, rotation=270)
    set_mp4_rotation(write_clip(folder / "upside-down.mp4", count=60, fps=30), 180)
    write_clip_with_lead_in(folder / "edit-list.mp4", hidden=4, count=60)
    write_clip(folder / "said60.mkv", count=90, fps=60, times=[i / 30 for i in range(90)], container_format="matroska")
    write_clip(folder / "said31.mkv", count=240, fps=31, times=[i * 1001 / 30000 for i in range(240)],
               container_format="matroska")
    write_clip(folder / "vp9.webm", "libvpx-vp9", count=60, fps=30)
    write_clip(folder / "bframes.avi", count=90, fps=25, container_format="avi", options={"bf": "2"})
    write_clip(folder / "xvid.avi", "mpeg4", count=90, fps=25, container_format="avi")
    write_clip(folder / "gap.ts", count=80, times=gap, container_format="mpegts")
    write_clip(folder / "vfr.mp4", count=69, times=vfr)
    write_clip(folder / "tenbit.mkv", "libx265", pix_fmt="yuv420p10le", count=30,
               options={"x265-params": "log-level=none"}, container_format="matroska")
    write_clip(folder / "av1.mp4", "libsvtav1", count=30, options={"svtav1-params": "log-level=0"})
    write_long_clip(folder / "long.mp4", 120)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="*")
    parser.add_argument("--generated", action="store_true", help="also files of each known quirk, written here")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args()
    if args.generated:
        import tempfile

        args.folders.append(generated(Path(tempfile.mkdtemp(prefix="cogtune-corpus-"))))
    files = sorted(p for folder in args.folders for p in folder.rglob("*") if p.is_file())
    rows = []
    for path in files:
        for row in check(path):
            print(json.dumps(row), flush=True)
            rows.append(row)
    counts = {}
    for row in rows:
        counts[row["result"]] = counts.get(row["result"], 0) + 1
    print(json.dumps({"files": len(files), "clips": len(rows), **counts}))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"counts": counts, "rows": rows}, indent=1) + "\n")
        lines = ["# Decoding checked against an independent decode (`bench/decode_corpus.py`)", "",
                 f"{len(files)} files, {len(rows)} clips: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())),
                 "", "| file | fps | frames | skip | size | decoder | result | reason or max difference |",
                 "|---|---|---|---|---|---|---|---|"]
        for row in rows:
            detail = row.get("reason") or (f"{row['max_difference']:.2g}" if "max_difference" in row else "")
            lines.append(f"| {row['file']} | {row['fps']} | {row['frames']} | {row['skip']} | {row['size']} | "
                         f"{row.get('decoder', '')} | {row['result']} | {detail} |")
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    sys.exit(1 if counts.get("WRONG") or counts.get("crash") else 0)


if __name__ == "__main__":
    main()
