"""The two decoders: decord where it can be trusted with a file, PyAV otherwise, behind open_video."""

from __future__ import annotations

import bisect
import contextlib
import itertools
from pathlib import Path

import av
import numpy as np

from cogtune.data.video.container import (DECORD_PIXEL_FORMATS, PLAUSIBLE_FPS, REORDER_DEPTH, _decord_suits, _Fallback,
                                          _header, _mp4_mirrors)
from cogtune.data.video.frames import ClipSkipped, Span, on_the_rate
from cogtune.data.video.geometry import Orientation
from cogtune.errors import first_line


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
