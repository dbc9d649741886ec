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

    With its AVX-512 code (seen on an AMD EPYC; the Xeons where the suite failed have AVX-512 too), libx264 wrote other
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


LABEL_SIZE = 14  # pixels: a font size people read without zooming in
LINE_HEIGHT = LABEL_SIZE + 4


def label_font():
    """Pillow's own TrueType font (DejaVu-like, shipped with Pillow 10.1 and newer) at LABEL_SIZE; the
    old bitmap font only where FreeType is missing."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=LABEL_SIZE)
    except (TypeError, OSError, ImportError):  # Pillow 10.0, or no FreeType
        return ImageFont.load_default()


def wrapped(label: str, width: int, font) -> list[str]:
    """A label in lines that fit `width` pixels, broken between words (a word longer than a line is
    broken where it must be)."""
    lines, line = [], ""
    for word in label.split():
        candidate = f"{line} {word}".strip()
        if font.getlength(candidate) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
        while font.getlength(line) > width and len(line) > 1:  # a word wider than the sheet
            cut = max(1, next(i for i in range(len(line), 0, -1) if font.getlength(line[:i]) <= width))
            lines.append(line[:cut])
            line = line[cut:]
    return [*lines, line] if line else lines or [""]


def contact_sheet(rows: list[tuple[str, list[np.ndarray]]], path: str | Path) -> None:
    """A PNG with one row per entry: its label above its images ([H, W, 3] uint8, side by side), the
    label in a readable font and wrapped to the sheet's width, never cut."""
    from PIL import Image, ImageDraw

    font = label_font()
    heights = [max(image.shape[0] for image in images) for _, images in rows]
    width = max(sum(image.shape[1] for image in images) for _, images in rows)
    labels = [wrapped(label, width - 4, font) for label, _ in rows]
    sheet = Image.new("RGB", (width, sum(heights) + sum(LINE_HEIGHT * len(lines) for lines in labels)), "white")
    draw = ImageDraw.Draw(sheet)
    top = 0
    for (_, images), lines, height in zip(rows, labels, heights):
        for number, line in enumerate(lines):
            draw.text((2, top + 1 + number * LINE_HEIGHT), line, fill="black", font=font)
        top += LINE_HEIGHT * len(lines)
        left = 0
        for image in images:
            sheet.paste(Image.fromarray(np.ascontiguousarray(image)), (left, top))
            left += image.shape[1]
        top += height
    atomic_write(Path(path), lambda temp: sheet.save(temp, format="PNG"))
