"""What a file's bytes say before any decoding: its first header, whether decord can be trusted
with it (an MP4 box parser for the display matrix and handler), whether it is a video at all,
and how much decoding it costs."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import av

from cogtune.data.video.frames import Span


PLAUSIBLE_FPS = (1.0, 240.0)


# Frames a decoder may hand out before one shown earlier (B-frames: H.264 allows 16). Of the times
# read so far, all but the last this many are final: no frame read later is shown before them.
REORDER_DEPTH = 16


# 8-bit YUV, which decord turns into the RGB PyAV does, to the bit. Not 10-bit: there its older
# FFmpeg converts differently (1.2 levels on average, 75 at colour edges).
DECORD_PIXEL_FORMATS = ("yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p")


class _Fallback(Exception):
    """This reader cannot be trusted with this file; the reason says why."""


@dataclass(frozen=True)
class _Header:
    """What a container's header says, read without decoding a frame."""

    frames: float  # the frame count, or duration x rate; 0 when it says neither
    rate: float
    height: int  # as stored, before any display rotation
    width: int
    pix_fmt: str | None


def _header(path: Path) -> _Header | None:
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return None
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            seconds = float((stream.duration or 0) * (stream.time_base or 0)) or (container.duration or 0) / 1e6
            frames = float(stream.frames or seconds * rate)
            return _Header(frames, rate, stream.height or 0, stream.width or 0, stream.codec_context.pix_fmt)
    except Exception:  # FFmpeg's errors, and streams PyAV does not fully know (a Dolby Vision AV1 stream has no
        return None    # height): the decoders then find out what can be read


def decode_budget(span: Span, height: int, width: int) -> int:
    """The most memory reading a clip may take: twice the clip in float, plus one source frame of
    height x width in float."""
    frames, clip_height, clip_width = span.largest(height, width)
    return 2 * frames * 3 * clip_height * clip_width * 4 + height * width * 3 * 4


def _decord_suits(path: Path, span: Span | None) -> bool:
    """Whether decord may read the file: only where the whole source, decoded, fits the memory a
    clip may take. decord reads every packet of a file to open it (450 MB for the first second of
    a 10-minute 1080p file), and its decoding thread runs ahead of the caller, holding what it
    decodes: up to the whole file (2 GB for 8 s of 4K while the frames are resized). Without a
    span (no clip to measure against) it is tried first."""
    if span is None or span.largest is None:
        return True
    header = _header(path)
    if header is None or header.frames <= 0 or not header.height or not header.width:
        return False  # a size nobody can tell: PyAV, whose memory does not depend on it
    decoded = header.frames * header.height * header.width * 3
    return decoded <= min(decode_budget(span, header.height, header.width),
                          decode_budget(span, header.width, header.height))  # as stored, or turned


def _mp4_boxes(f, start: int, end: int):
    """(kind, content start, end) of each box between start and end of an MP4/MOV file."""
    position = start
    while position + 8 <= end:
        f.seek(position)
        head = f.read(16)
        if len(head) < 8:
            return
        size, kind = struct.unpack(">I4s", head[:8])
        header = 8
        if size == 1 and len(head) == 16:
            size, header = struct.unpack(">Q", head[8:])[0], 16
        elif size == 0:
            size = end - position
        if size < header:
            return
        yield kind, position + header, min(position + size, end)
        position += size


def _mp4_matrix(f, kind: bytes, start: int) -> tuple[int, int, int, int]:
    """(a, b, c, d) of the matrix in an mvhd or tkhd box (16.16 fixed point)."""
    f.seek(start)
    version = f.read(1)[0]
    if version > 1:
        raise ValueError(f"{kind!r} version {version}")
    f.seek(start + {b"mvhd": (36, 48), b"tkhd": (40, 52)}[kind][version])  # after times, ids, volume
    values = struct.unpack(">9i", f.read(36))
    return values[0], values[1], values[3], values[4]


def _mp4_mirrors(path: Path) -> bool:
    """Whether an MP4/MOV's display matrix (its first video track's tkhd, times the movie's mvhd,
    as FFmpeg combines them) mirrors the picture: a negative determinant. Read from the boxes,
    without decoding a frame; any file that is not an MP4/MOV carries no such matrix. Boxes that
    cannot be read count as mirroring: PyAV, which applies the matrix itself, reads the file."""
    try:
        return _mp4_matrix_mirrors(path)
    except (struct.error, IndexError, ValueError):
        return True


def _mp4_matrix_mirrors(path: Path) -> bool:
    sign = 1
    with open(path, "rb") as f:
        if f.read(12)[4:8] not in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"):
            return False
        end = f.seek(0, 2)
        for kind, start, stop in _mp4_boxes(f, 0, end):
            if kind != b"moov":
                continue
            for inner, inner_start, inner_stop in list(_mp4_boxes(f, start, stop)):
                if inner == b"mvhd":
                    a, b, c, d = _mp4_matrix(f, b"mvhd", inner_start)
                    sign = -1 if a * d - b * c < 0 else 1
                elif inner == b"trak":
                    track = {k: s for k, s, _ in _mp4_boxes(f, inner_start, inner_stop)}
                    if b"tkhd" in track and _mp4_handler(f, inner_start, inner_stop) == b"vide":
                        a, b, c, d = _mp4_matrix(f, b"tkhd", track[b"tkhd"])
                        return sign * (a * d - b * c) < 0
    return False


def _mp4_handler(f, start: int, stop: int) -> bytes | None:
    """A trak box's handler type (b"vide" for video), from mdia/hdlr."""
    for kind, media_start, media_stop in list(_mp4_boxes(f, start, stop)):
        if kind == b"mdia":
            for inner, inner_start, _ in list(_mp4_boxes(f, media_start, media_stop)):
                if inner == b"hdlr":
                    f.seek(inner_start + 8)
                    return f.read(4)
    return None


# Leading bytes of files that are certainly not videos. Unknown binary files go to the decoders,
# which skip them with a reason if they cannot read them.
_NOT_VIDEO = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"BM", "a bitmap image"),
              (b"%PDF", "a PDF document"), (b"PK\x03\x04", "a zip archive"), (b"\x1f\x8b", "a gzip archive"),
              (b"ID3", "an MP3 file"), (b"fLaC", "a FLAC file"), (b"\x7fELF", "a program"))


def not_a_video(path: Path) -> str | None:
    """Why a file is certainly not a video, judged from its first bytes, or None if it may be one."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        return "the file is empty"
    if head.startswith(b"RIFF") and head[8:12] not in (b"AVI ", b"AVIX"):
        return "it is a RIFF file but not an AVI (a WAV or WebP?)"
    for signature, what in _NOT_VIDEO:
        if head.startswith(signature):
            return f"it is {what}"
    if b"\x00" not in head:
        try:
            head.decode("utf-8")
            return "it is a text file"
        except UnicodeDecodeError as e:
            if e.start >= len(head) - 3:  # a character cut at the end of what was read
                return "it is a text file"
    return None
