"""Writing videos: the mp4 files of `cogtune infer`, the validation videos and the demo clips."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cogtune.util.files import atomic_write


def write_mp4(path: str | Path, frames: np.ndarray, fps: float) -> None:
    """Write [F, H, W, 3] uint8 frames to an H.264 mp4 (MPEG-4 part 2 where libx264 is missing)."""
    import av

    def write(temp):
        with av.open(temp, mode="w", format="mp4") as container:
            try:
                stream = container.add_stream("libx264", rate=round(fps))
                stream.options = {"crf": "18"}
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
