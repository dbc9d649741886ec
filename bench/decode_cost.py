"""What reading one training clip costs against the length and size of its source.

    .venv/bin/python bench/decode_cost.py [--seconds 10 120] [--reader pyav decord]

Writes, with PyAV, clips of 24 fps at 96x160 lasting each of `--seconds`, then times reading 9
frames at 8 fps from their start (what `read_clip` does for a training clip), once per reader:
`pyav` is PyAV reading timestamps from packets (the fallback for files decord cannot be trusted
with), `pyav-decode-all` the old way of decoding every frame for its time, `decord` the fast path.
A cost that does not depend on the source's length gives the same time for every length. Also
prints the peak torch memory of reading 17 frames of a 1080p clip to 32x48. CPU only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the clip writer the tests use


def main() -> None:
    from cogtune.data.video import DecordVideo, PyAVVideo, fixed_size, read_clip, resample_indices, to_model_range
    from cogtune.train.memory import LiveTensorBytes

    from clips import write_clip

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, nargs="+", default=[10, 120])
    parser.add_argument("--reader", nargs="+", default=["pyav", "pyav-decode-all", "decord"])
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cogtune-decode-"))
    readers = {"pyav": PyAVVideo, "pyav-decode-all": lambda p: PyAVVideo(p, from_packets=False),
               "decord": DecordVideo}
    for seconds in args.seconds:
        path = write_clip(root / f"{seconds}s.mp4", height=96, width=160, count=24 * seconds, fps=24)
        for name in args.reader:
            started = time.perf_counter()
            video = readers[name](path)
            indices = resample_indices(video.frame_times, 8)[:9]
            frames = video.frames(indices)
            seconds_taken = time.perf_counter() - started
            print(json.dumps({"source_seconds": seconds, "reader": name, "frames": len(frames),
                              "indices": indices, "seconds": round(seconds_taken, 3)}))
    path = write_clip(root / "1080p.mp4", height=1080, width=1920, count=17, fps=8)
    with LiveTensorBytes() as live:
        clip = read_clip(path, fixed_size(32, 48, 17), 8, 0, 0, "center", None)
    source_frame = to_model_range(video.frames([0])).element_size() * 1080 * 1920 * 3
    print(json.dumps({"peak_torch_bytes_17_frames_1080p_to_32x48": live.peak, "source_frames_in_float":
                      round(live.peak / source_frame, 2), "decoder": clip.decoder}))


if __name__ == "__main__":
    main()
