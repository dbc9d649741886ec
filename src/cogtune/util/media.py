"""Writing videos: the mp4 files of `cogtune infer`, the validation videos and the demo clips."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import numpy as np

from cogtune.util.files import atomic_write


@functools.cache
def x264_options() -> dict[str, str]:
    """libx264's options: quality 18, and on CPUs with AVX-512 its AVX2 code instead.

    With its AVX-512 code (an AMD EPYC here, the Intel Xeons users run on), libx264 wrote other
    packets for the same frames now and then (about 1 video in 50 while other threads were busy,
    as they are when training writes its validation videos; never with AVX2 or without assembly in
    1,200 writes each), so the same video was not always the same file, and two runs that
    generate the same frames did not decode to the same pixels."""
    options = {"crf": "18"}
    if platform.machine().lower() in ("x86_64", "amd64"):
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        except OSError:
            flags = []
        if "avx512f" in flags and {"avx2", "fma", "bmi2"} <= set(flags):
            options["x264-params"] = "asm=AVX2"
    return options


def write_mp4(path: str | Path, frames: np.ndarray, fps: float) -> None:
    """Write [F, H, W, 3] uint8 frames to an H.264 mp4 (MPEG-4 part 2 where libx264 is missing); the
    same frames give the same file."""
    import av

    def write(temp):
        with av.open(temp, mode="w", format="mp4") as container:
            try:
                stream = container.add_stream("libx264", rate=round(fps))
                stream.options = x264_options()
            except Exception:  # an FFmpeg build without libx264
                stream = container.add_stream("mpeg4", rate=round(fps))
            stream.height, stream.width = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2
            stream.pix_fmt = "yuv420p"
            for frame in frames:
                image = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[: stream.height, : stream.width]),
                                                   format="rgb24")
                container.mux(stream.encode(image))
            container.mux(stream.encode())

    atomic_write(Path(path), write)


def contact_sheet(rows: list[tuple[str, list[np.ndarray]]], path: str | Path) -> None:
    """A PNG with one row per entry: its label above its images ([H, W, 3] uint8, side by side)."""
    from PIL import Image, ImageDraw

    label_height = 14
    heights = [max(image.shape[0] for image in images) for _, images in rows]
    width = max(sum(image.shape[1] for image in images) for _, images in rows)
    sheet = Image.new("RGB", (width, sum(heights) + label_height * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    top = 0
    for (label, images), height in zip(rows, heights):
        draw.text((2, top + 1), label[:200], fill="black")
        left = 0
        for image in images:
            sheet.paste(Image.fromarray(np.ascontiguousarray(image)), (left, top + label_height))
            left += image.shape[1]
        top += label_height + height
    atomic_write(Path(path), lambda temp: sheet.save(temp, format="PNG"))
