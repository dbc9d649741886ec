"""Test clips written here with PyAV: known pixels, any codec, frame times and rotation."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def pattern(count: int, height: int, width: int) -> np.ndarray:
    """[F, H, W, 3] uint8: red/green gradients, a per-frame blue level and a magenta marker in the
    top-left corner (in frame 0 the only pixels with much blue)."""
    y, x = np.mgrid[0:height, 0:width]
    frames = []
    for i in range(count):
        frame = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                          np.full_like(x, i * 10 % 256)], axis=-1).astype(np.uint8)
        frame[: max(2, height // 4), : max(2, width // 4)] = (255, 0, 255)
        frames.append(frame)
    return np.stack(frames)


def write_clip(path: Path, codec: str = "libx264", height: int = 64, width: int = 96, count: int = 48,
               fps: int = 24, pix_fmt: str = "yuv420p", times: list[float] | None = None,
               rotation: int | None = None, container_format: str | None = None,
               options: dict | None = None) -> Path:
    """A clip of `pattern` frames; `times` (seconds) gives each frame's timestamp, `rotation` a
    display-matrix rotation in degrees."""
    with av.open(str(path), "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if options:
            stream.options = options
        if times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i, frame in enumerate(pattern(count, height, width)):
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            if times is not None:
                video_frame.pts, video_frame.time_base = round(times[i] * 1000), Fraction(1, 1000)
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    if rotation:
        set_mp4_rotation(path, rotation)
    return path


def set_mp4_rotation(path: Path, degrees: int) -> None:
    """Write a display-matrix rotation into an MP4's track header (tkhd), as FFmpeg and phones do:
    [cos, -sin, 0, sin, cos, 0, 0, 0, 1] in 16.16 fixed point (the last in 2.30). Done on the bytes, so
    that it works with every PyAV (writing side data needs PyAV 18)."""
    import math

    cos, sin = round(math.cos(math.radians(degrees))), round(math.sin(math.radians(degrees)))
    set_mp4_matrix(path, cos, -sin, sin, cos)


def set_mp4_matrix(path: Path, a: int, b: int, c: int, d: int) -> None:
    """Write the display matrix [a, b, 0, c, d, 0, 0, 0, 1] into an MP4's track header: a pixel at
    (x, y) is shown at (a x + c y, b x + d y). A negative determinant mirrors the picture."""
    import struct

    data = bytearray(path.read_bytes())
    box = data.find(b"tkhd")
    assert box > 0, f"{path} has no track header"
    version = data[box + 4]
    offset = box + 4 + 4 + (8 if version == 0 else 16) + 4 + 4 + (4 if version == 0 else 8) + 8 + 2 + 2 + 2 + 2
    data[offset:offset + 36] = struct.pack(">9i", a << 16, b << 16, 0, c << 16, d << 16, 0, 0, 0, 1 << 30)
    path.write_bytes(bytes(data))


def write_clip_with_lead_in(path: Path, hidden: int = 2, count: int = 24, fps: int = 24) -> Path:
    """An MP4 whose first `hidden` frames have negative times, so that its edit list hides them (as
    cutting a clip without re-encoding does): players start at pattern frame `hidden`."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.codec_context.time_base = Fraction(1, fps)
        for i, frame in enumerate(pattern(count, 64, 96)):
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            video_frame.pts, video_frame.time_base = i - hidden, Fraction(1, fps)
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    assert b"elst" in path.read_bytes(), "no edit list was written"
    return path


def write_long_clip(path: Path, seconds: float, height: int = 64, width: int = 96, fps: int = 24,
                    gop: int = 24, container_format: str | None = None) -> Path:
    """A long clip made quickly: one group of `gop` `pattern` frames is encoded, then muxed again
    and again with later times (no re-encoding), so an hour of 1080p costs seconds to write. Frame k
    shows pattern frame k % gop. PyAV 14 writes such copied packets as 1-byte packets; there every
    frame is encoded instead (frame k shows pattern frame k), which takes longer."""
    once = path.with_name(path.stem + "-gop.mp4")
    write_clip(once, height=height, width=width, count=gop, fps=fps, options={"g": str(gop), "preset": "ultrafast"})
    with av.open(str(once)) as source, av.open(str(path), "w", format=container_format) as target:
        stream = source.streams.video[0]
        out = target.add_stream_from_template(stream)
        period = round(Fraction(gop, fps) / stream.time_base)
        for repeat in range(int(seconds * fps) // gop):
            source.seek(0, stream=stream)
            for packet in source.demux(stream):
                if packet.size:
                    packet.pts, packet.dts = packet.pts + repeat * period, packet.dts + repeat * period
                    packet.stream = out
                    target.mux(packet)
    once.unlink()
    with av.open(str(path)) as written:
        if next(written.demux(video=0)).size > 1:
            return path
    return write_clip(path, height=height, width=width, count=int(seconds * fps) // gop * gop, fps=fps,
                      container_format=container_format, options={"g": str(gop), "preset": "ultrafast"})
