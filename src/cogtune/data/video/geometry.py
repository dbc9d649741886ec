"""Pixels: the resize-and-crop plan (pure), its application, the display orientation a container
records, and the first frame of an image or video as model input."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

from cogtune.errors import CogtuneError


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
