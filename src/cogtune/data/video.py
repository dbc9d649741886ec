"""Decoding, frame selection, resizing and cropping of training clips.

The planning functions (`resample_indices`, `Span`, `plan_resize_crop`) are pure; `read_clip` is
the thin part that touches files: it reads a source only as far as the clip needs, and holds one
source frame at a time, so its cost follows the clip, not the source.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import math
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import av
import numpy as np
import torch
import torch.nn.functional as F

from cogtune.errors import CogtuneError, first_line


class ClipSkipped(CogtuneError):
    """A clip that cannot be used; the message is the reason recorded in the index, `kind` the
    short category the preprocess summary counts."""

    def __init__(self, message: str, kind: str = "unreadable"):
        super().__init__(message)
        self.kind = kind


def largest_4k_plus_1(frames: int) -> int:
    """The CogVideoX VAE takes 4k+1 frames: the largest such count not above `frames`."""
    if frames < 1:
        raise ValueError("need at least one frame")
    return (frames - 1) // 4 * 4 + 1


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
                         skip_start: int = 0, skip_end: int = 0) -> list[int]:
    """Source frame indices of a constant-rate clip: `resample_indices` at times i / source_fps,
    cut to `max_frames`, or to the largest 4k+1 the clip holds when it is shorter."""
    candidates = resample_indices([i / source_fps for i in range(num_source_frames)], target_fps, skip_start,
                                  skip_end)
    return candidates[:largest_4k_plus_1(min(max_frames, len(candidates)))]


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
    return frames.div_(127.5).sub_(1.0)  # in place: one float copy of the frames, not three


def to_clip_size(frames_uint8: np.ndarray, plan: ResizeCrop, height: int, width: int, rows: int = 64) -> torch.Tensor:
    """Decoded frames as shown, [F, H, W, 3] uint8 -> [F, 3, height, width] in [-1, 1], resized and
    cropped by plan: what training clips and the first frame of an image-to-video model both go through.

    The same numbers as `resize_crop(to_model_range(frames), ...)`, in less memory: torch's
    antialiased resize is separable (across, then down), so each frame is made float and resized
    across a band of `rows` rows at a time, the columns the crop keeps are resized down, and no
    frame is ever held in float at its source size (a 4K frame is 100 MB in float, 25 MB as decoded)."""
    count, source_height, source_width, _ = frames_uint8.shape
    out = torch.empty(count, 3, height, width)
    columns = slice(plan.left, plan.left + width)
    for number in range(count):
        frame = frames_uint8[number]
        across = torch.empty(1, 3, source_height, width)
        for top in range(0, source_height, rows):
            band = to_model_range(frame[None, top:top + rows])
            if plan.resize_width != source_width:
                band = F.interpolate(band, size=(band.shape[2], plan.resize_width), mode="bilinear",
                                     antialias=True, align_corners=False)
            across[:, :, top:top + rows] = band[..., columns]
        if plan.resize_height != source_height:
            across = F.interpolate(across, size=(plan.resize_height, width), mode="bilinear", antialias=True,
                                   align_corners=False)
        out[number] = across[0, :, plan.top:plan.top + height]
    return out.clamp_(-1.0, 1.0)


def _display_matrix(frame) -> tuple[int, int, int, int] | None:
    """(a, b, c, d) of a decoded PyAV frame's display matrix, each -1, 0 or 1, or None when it has
    none or it is not a quarter turn (with or without a mirror)."""
    from av.sidedata.sidedata import Type

    try:
        data = frame.side_data.get(Type.DISPLAYMATRIX)
    except Exception:  # side data PyAV does not know (MV-HEVC's: "29 is not a valid Type") is no matrix
        return None
    if data is None:
        return None
    values = struct.unpack("=9i", bytes(data))
    matrix = tuple(values[i] / 65536 for i in (0, 1, 3, 4))
    if any(abs(v - round(v)) > 1e-3 or abs(round(v)) > 1 for v in matrix):
        return None
    return tuple(int(round(v)) for v in matrix)


@dataclass(frozen=True)
class Orientation:
    """How a video's frames are shown: one of the 8 quarter turns, with or without a mirror, from
    the display matrix (a pixel at (x, y) is shown at (a x + c y, b x + d y), as players do; a
    matrix of another angle is taken as its nearest quarter turn). A stream has one: it is read
    from its first frame only, since reading a frame's side data ties the frame (12 MB at 4K) in a
    reference cycle until the garbage collector runs: 550 MB for 49 frames of 4K."""

    transpose: bool = False  # rows become columns
    flip_rows: bool = False
    flip_cols: bool = False

    @classmethod
    def of(cls, frame) -> "Orientation":
        matrix = _display_matrix(frame)
        if matrix is None:  # no matrix, or not a quarter turn: FFmpeg's angle, counter-clockwise
            try:
                rotation = frame.rotation or 0
            except Exception:  # a frame whose side data PyAV cannot read is shown as stored
                rotation = 0
            return [cls(), cls(True, True, False), cls(False, True, True), cls(True, False, True)][
                round(rotation / 90) % 4]
        a, b, c, d = matrix
        if a == 0 and d == 0:
            return cls(True, b < 0, c < 0)
        return cls(False, d < 0, a < 0)

    def size(self, height: int, width: int) -> tuple[int, int]:
        """The shown height and width of a frame stored at height x width."""
        return (width, height) if self.transpose else (height, width)

    def apply(self, image: np.ndarray) -> np.ndarray:
        """[H, W, 3] as stored -> as shown (a view)."""
        image = image.transpose(1, 0, 2) if self.transpose else image
        image = image[::-1] if self.flip_rows else image
        return image[:, ::-1] if self.flip_cols else image


def _displayed(frame) -> np.ndarray:
    """One decoded PyAV frame as shown: [H, W, 3] uint8."""
    return Orientation.of(frame).apply(frame.to_ndarray(format="rgb24"))


def load_first_frame(path: Path) -> np.ndarray:
    """An image file as shown ([H, W, 3] uint8, its EXIF orientation applied, as diffusers'
    load_image does), or the first frame of a video file as shown (its display rotation applied)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.array(ImageOps.exif_transpose(image).convert("RGB"))
    except UnidentifiedImageError:
        pass
    try:
        with av.open(str(path)) as container:
            return _displayed(next(container.decode(video=0)))
    except (av.error.FFmpegError, StopIteration):
        raise CogtuneError(f"{path} is neither an image nor a video with frames.") from None


def first_frame_pixels(path: str | Path, height: int, width: int) -> torch.Tensor:
    """The first frame an image-to-video model is given, from an image or a video: as shown,
    resized to cover height x width and centre-cropped as training clips are, [3, 1, height, width]
    in [-1, 1]. Preprocess (validation images), in-training validation and `cogtune infer` all use it."""
    frame = load_first_frame(Path(path))[None]  # [1, H, W, 3]
    plan = plan_resize_crop(frame.shape[1], frame.shape[2], height, width, "center")
    return to_clip_size(frame, plan, height, width).permute(1, 0, 2, 3)


# --- decoders ---------------------------------------------------------------------------------

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


class DecordVideo:
    """decord (the diffusers scripts' reader), for sources that are small next to the clip
    (`_decord_suits`), trusted only while it agrees with itself (it applies rotation). It reads
    every frame's time on opening, so `frame_times` is the whole source."""

    name = "decord"

    def __init__(self, path: Path):
        try:
            import decord
        except ImportError:  # no wheel for this platform (aarch64, say): PyAV decodes everything
            raise _Fallback("decord is not installed") from None
        if _mp4_mirrors(path):
            raise _Fallback("its display matrix mirrors the picture (decord applies only its rotation)")
        header = _header(path)
        if header is None or header.pix_fmt not in DECORD_PIXEL_FORMATS:
            raise _Fallback(f"pixel format {header and header.pix_fmt}: decord converts it to RGB unlike FFmpeg today")
        try:
            self.reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        except Exception as e:  # decord raises bare DECORDError/RuntimeError
            raise _Fallback(f"cannot open: {first_line(e)[:120]}") from None
        count = len(self.reader)
        self.fps = float(self.reader.get_avg_fps())
        if count < 1 or not PLAUSIBLE_FPS[0] <= self.fps <= PLAUSIBLE_FPS[1]:
            raise _Fallback(f"reports {count} frames at {self.fps:g} fps")
        try:
            stamps = self.reader.get_frame_timestamp(range(count))[:, 0]
        except Exception as e:
            raise _Fallback(f"no timestamps: {first_line(e)[:120]}") from None
        if stamps[0] < -1e-6:  # decord shows the frames an MP4 edit list hides (at negative times)
            raise _Fallback("an edit list hides frames before time 0")
        steps = np.diff(stamps)
        if count > 2 and (steps.min() <= 0 or steps.max() > 1.5 * steps.min() + 1e-3):
            raise _Fallback("variable frame rate")
        # Frames are picked by their own timestamps: containers misreport the average rate (an MKV
        # of 30 fps frames said to be 60 fps), and a slightly wrong one drifts along the clip.
        span = float(stamps[-1] - stamps[0])
        self.frame_times, rate = on_the_rate([float(t) for t in stamps], self.fps)
        self.fps = rate or ((count - 1) / span if count > 1 and span > 0 else self.fps)
        self.height, self.width = self._frame(0).shape[:2]

    def _frame(self, index: int) -> np.ndarray:
        try:
            frames = self.reader.get_batch([index]).asnumpy()
        except Exception as e:
            raise _Fallback(f"decode error: {first_line(e)[:120]}") from None
        if frames.ndim != 4 or frames.shape[0] != 1 or frames.shape[-1] != 3:
            raise _Fallback(f"returned frames of shape {tuple(frames.shape)}")
        return frames[0]

    def iter_frames(self, indices: list[int]):
        """The frames at indices, [H, W, 3] uint8 each, decoded one at a time (decord reads on
        from where it is, so this costs no more than asking for them together)."""
        for index in indices:
            yield self._same_size(self._frame(index))  # no name holds a frame while the next is decoded

    def _same_size(self, frame: np.ndarray) -> np.ndarray:
        if frame.shape[:2] != (self.height, self.width):
            raise _Fallback(f"frame size changed to {frame.shape[:2]}")
        return frame

    def frames(self, indices: list[int]) -> np.ndarray:
        return np.stack(list(self.iter_frames(indices)))


class PyAVVideo:
    """The careful path: FFmpeg through PyAV, with timestamps the decoder itself confirms.

    Frame times come from the packets (no frame is decoded for them), sorted, since frames are shown
    in order of their times, and only as far as `span` needs: reading the first second of an
    hour-long file costs about a second of it (`frame_times` is then the first part of the source).
    Decoding then starts at the key frame before the first frame wanted (a seek, where one is worth
    it), stops at the last, and checks that every frame it passes is at a time the packets said;
    when one is not (edit lists, frames without times, packets that are no frame, a damaged file),
    `_Fallback` is raised and `PyAVVideo(path, span, from_packets=False)` reads the times by
    decoding frames from the start, which nothing can mislead. Frames are turned as the container's
    display matrix says."""

    name = "pyav"

    def __init__(self, path: Path, span: Span | None = None, from_packets: bool = True):
        self.path, self.span, self.from_packets = path, span, from_packets
        self.frame_times, self.error = [], None
        self.pts: list[int] = []  # the packets' own timestamps, sorted, beside frame_times
        self.height = self.width = 0
        self.orientation = Orientation()
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise ClipSkipped("cannot open video: the file has no video stream", kind="no video stream")
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                rate = float(stream.average_rate or stream.guessed_rate or 0) or None
                if from_packets:
                    self._times_from_packets(container, stream)
                else:
                    self._times_from_frames(container, stream, rate)
        except av.error.FFmpegError as e:
            if from_packets:
                raise _Fallback(f"cannot demux: {e.strerror or e}") from None
            raise ClipSkipped(f"cannot open video: {e.strerror or e}") from None
        if not self.frame_times:
            raise ClipSkipped(f"cannot decode any frame{': ' + self.error if self.error else ''}")
        span = self.frame_times[-1] - self.frame_times[0]
        # The container's rate first: a source read only in part gets the grid the whole would.
        self.frame_times, on_rate = on_the_rate(self.frame_times, rate)
        self.fps = on_rate or ((len(self.frame_times) - 1) / span if span > 0 else (rate or 0.0))

    def _decided(self, count: int, times) -> bool:
        """Whether the `count` times read so far (`times()` gives them, sorted) settle the clip, so
        reading can stop. Asked every 8 frames; without a span, never."""
        return (self.span is not None and self.span.largest is not None and count % 8 == 0
                and count > REORDER_DEPTH and self.height > 0
                and self.span.decided_by(times()[:-REORDER_DEPTH], self.height, self.width))

    def _times_from_packets(self, container, stream) -> None:
        stamps: list[tuple[float, int]] = []
        for packet in container.demux(stream):
            if packet.size == 0 or getattr(packet, "is_discard", False):  # end of stream; hidden by an edit list
                continue
            if packet.pts is None or packet.time_base is None:
                raise _Fallback("a packet without a timestamp")
            if not self.height:  # the first frame gives the size as shown
                for frame in stream.codec_context.decode(packet):
                    self._set_size(frame)
                    break
            bisect.insort(stamps, (float(packet.pts * packet.time_base), packet.pts))
            if self._decided(len(stamps), lambda: [t for t, _ in stamps]):
                stamps = stamps[:-REORDER_DEPTH]
                break
        if not stamps:
            raise _Fallback("no video packets")
        if not self.height:
            for frame in stream.codec_context.decode(None):  # a stream of one frame: it comes out at the end
                self._set_size(frame)
                break
        if not self.height:
            raise _Fallback("no packet decodes to a frame")
        self.frame_times, self.pts = [t for t, _ in stamps], [p for _, p in stamps]

    def _times_from_frames(self, container, stream, rate: float | None) -> None:
        times = self.frame_times
        for frame in self._decode(container, stream):
            if frame.time is not None:
                times.append(float(frame.time))
            else:
                times.append(times[-1] + 1 / (rate or 30) if times else 0.0)
            if len(times) == 1:
                self._set_size(frame)
            if self._decided(len(times), lambda: sorted(times)):
                times.sort()
                del times[-REORDER_DEPTH:]  # the latest times may not be final yet
                break
        # Frames come out in display order, but some containers label them out of order (AVI with
        # B-frames: 1, 3, 4, 2, ...): the k-th frame shown is at the k-th smallest time.
        times.sort()

    def _set_size(self, frame) -> None:
        """From the first frame: how frames are shown, and their size as shown."""
        self.orientation = Orientation.of(frame)
        self.height, self.width = self.orientation.size(frame.height, frame.width)

    def _decode(self, container, stream):
        """Frames in display order, stopping quietly at the first decode error (a truncated or
        damaged file keeps the frames before it)."""
        try:
            yield from container.decode(stream)
        except av.error.FFmpegError as e:
            self.error = f"decode error after {len(self.frame_times)} frames: {e.strerror or e}"

    def iter_frames(self, indices: list[int]):
        """The frames at indices (ascending, an index may repeat), [H, W, 3] uint8 each, as they are
        decoded: only one source frame is held at a time."""
        wanted = sorted(indices)
        if wanted != list(indices):
            raise ValueError("frame indices must be ascending")
        if not wanted:
            return
        position = 0
        with contextlib.ExitStack() as opened:
            frames, number = self._frames_from(opened, wanted[0])
            while position < len(wanted):
                try:
                    frame = next(frames)
                except (StopIteration, av.error.FFmpegError) as e:
                    if self.from_packets:
                        raise _Fallback(f"frame {number + 1} of {len(self.frame_times)} cannot be decoded") from None
                    if isinstance(e, StopIteration):
                        break
                    raise
                number += 1
                if self.from_packets and (number >= len(self.pts) or frame.pts != self.pts[number]):
                    raise _Fallback(f"frame {number} is not at the time its packet said")
                if number == wanted[position]:
                    image = self.orientation.apply(frame.to_ndarray(format="rgb24"))
                    while position < len(wanted) and wanted[position] == number:
                        yield image
                        position += 1
                    del image  # not held while the next frame is decoded
        if position != len(wanted):
            raise ClipSkipped(f"decode error: got {position} of {len(wanted)} frames on the second pass")

    def _frames_from(self, opened: contextlib.ExitStack, first_wanted: int):
        """Decoded frames, starting at the key frame before frame `first_wanted` where a seek is
        worth it (more than two seconds in) and lands there, else at the start; and the display
        number of the frame before the first. Some containers (MPEG-TS) seek only roughly: a seek
        that lands past the frame, or on a time the packets did not give, is not used."""
        container = opened.enter_context(av.open(str(self.path)))
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if not self.from_packets or self.frame_times[first_wanted] - self.frame_times[0] < 2.0:
            return container.decode(stream), -1
        try:
            container.seek(self.pts[first_wanted], backward=True, any_frame=False, stream=stream)
            frames = container.decode(stream)
            key = next(frame for frame in frames if frame.key_frame)
            found = bisect.bisect_left(self.pts, key.pts) if key.pts is not None else len(self.pts)
            if found <= first_wanted and self.pts[found] == key.pts:
                return itertools.chain([key], frames), found - 1
        except (av.error.FFmpegError, StopIteration):
            pass
        container = opened.enter_context(av.open(str(self.path)))
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return container.decode(stream), -1

    def frames(self, indices: list[int]) -> np.ndarray:
        return np.stack(list(self.iter_frames(indices)))


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


def open_video(path: Path, span: Span | None = None) -> DecordVideo | PyAVVideo:
    """The first reader that can be trusted with the file: decord where the whole source is small
    next to the clip (`_decord_suits`), PyAV with packet timestamps, PyAV decoding frames for their
    times. With a span, PyAV reads only as far as the clip needs."""
    readers = [DecordVideo, PyAVVideo] if _decord_suits(path, span) else [PyAVVideo]
    for reader in readers:
        try:
            return reader(path) if reader is DecordVideo else reader(path, span)
        except _Fallback:
            pass
    return PyAVVideo(path, span, from_packets=False)


def decode_cost(path: Path) -> float:
    """What decoding a video costs, roughly: its frames x pixels from the container header (no
    frame is decoded); the file size when the header says too little."""
    header = _header(path)
    if header is not None and header.frames > 0 and header.height and header.width:
        return header.frames * header.height * header.width
    return float(path.stat().st_size)


# --- clips --------------------------------------------------------------------------------------


@dataclass
class Clip:
    pixels: torch.Tensor  # [C, F, H, W] float32 in [-1, 1]
    frame_indices: list[int]
    source_fps: float
    source_height: int
    source_width: int
    decoder: str = "decord"


SizeRule = Callable[[int, int, int], tuple[int, int, int]]  # (usable frames, height, width) -> (F, H, W)


def fixed_size(height: int, width: int, max_frames: int) -> SizeRule:
    """One training size: max_frames, or the largest 4k+1 a shorter clip holds."""
    return lambda available, _h, _w: (largest_4k_plus_1(min(max_frames, available)), height, width)


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


def read_spread_clip(path: Path, size: SizeRule, skip_start: int, skip_end: int, mode: str,
                     rng: np.random.Generator | None) -> Clip:
    """One clip of frames spread over the whole source as the diffusers scripts spread them
    (spread_indices, as many as the size rule allows, then the largest 4k+1), resized and cropped
    as every clip is. The whole source's frame times are read."""
    return _read_one_clip(path, size, None, mode, rng, lambda video: spread_indices(
        len(video.frame_times), size(sys.maxsize, video.height, video.width)[0], skip_start, skip_end))


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
