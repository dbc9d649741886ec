"""What reading one training clip costs, against the length and the resolution of its source.

    .venv/bin/python bench/decode_cost.py [--seconds 10 120 600] [--height 1080 --width 1920]
                                          [--memory 480x720 1080x1920 2160x3840] [--out bench/results/decode-cost]

Length: writes clips of 24 fps (one group of frames encoded once and muxed again and again, so a
10-minute 1080p file takes seconds to write), then times reading the first second of each as a
training clip (9 frames at 8 fps, 32x48, `read_clip`, which picks the reader) and counts the bytes
read from the file (Linux: /proc/self/io). For comparison it also opens each with decord, which
reads every packet of a file to open it, and with PyAV reading every packet's time (what the
PyAV path did before it stopped where the clip ends). A cost independent of the length gives the
same figures for every length. The page cache is warm: on a cold or network disk, the bytes read
are what costs.

Memory: for each source size, 49 frames brought to 480x720 (and 17 to 32x48), each in a process
of its own: the peak of numpy memory (tracemalloc) plus torch memory (`LiveTensorBytes`, another
run), against the goal of twice the output in float plus one source frame in float; and the
process's resident memory growth (sampled), which also holds FFmpeg's own frame buffers. Linux, CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the clip writers the tests use


def bytes_read() -> int | None:
    try:
        return int(next(line for line in open("/proc/self/io") if line.startswith("rchar")).split()[1])
    except (OSError, StopIteration):
        return None


def cost(path: Path, name: str) -> dict:
    from cogtune.data.video import DecordVideo, PyAVVideo, fixed_size, read_clip

    before, started = bytes_read(), time.perf_counter()
    if name == "read_clip":
        clip = read_clip(path, fixed_size(32, 48, 9, 4), 8, 0, 0, "center", None)
        detail = {"decoder": clip.decoder, "indices": clip.frame_indices}
    elif name == "decord-open":
        detail = {"frames": len(DecordVideo(path).frame_times)}
    else:  # pyav-every-packet
        detail = {"frames": len(PyAVVideo(path).frame_times)}
    seconds = time.perf_counter() - started
    read = bytes_read()
    return {"seconds": round(seconds, 3), "mb_read": round((read - before) / 1e6, 1) if before is not None else None,
            **detail}


def memory(path: Path, frames: int, height: int, width: int, source: tuple[int, int]) -> dict:
    """In this process (a child of the main one): numpy and torch peaks of one read_clip."""
    import tracemalloc

    from cogtune.data.video import fixed_size, read_clip
    from cogtune.util.tensor_bytes import LiveTensorBytes

    with RssPeak() as rss:
        read_clip(path, fixed_size(height, width, frames, 4), 8, 0, 0, "center", None)
    tracemalloc.start()
    clip = read_clip(path, fixed_size(height, width, frames, 4), 8, 0, 0, "center", None)
    numpy_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    with LiveTensorBytes() as live:
        read_clip(path, fixed_size(height, width, frames, 4), 8, 0, 0, "center", None)
    output = clip.pixels.numel() * 4
    source_frame = source[0] * source[1] * 3 * 4
    goal = 2 * output + source_frame
    mib = 1 << 20
    return {"source": f"{source[0]}x{source[1]}", "clip": f"{frames}x{height}x{width}", "decoder": clip.decoder,
            "numpy_peak_mib": round(numpy_peak / mib, 1), "torch_peak_mib": round(live.peak / mib, 1),
            "together_mib": round((numpy_peak + live.peak) / mib, 1), "goal_mib": round(goal / mib, 1),
            "rss_growth_mib": round(rss.growth / mib, 1)}


class RssPeak:
    """The growth of this process's resident memory while active, sampled every 2 ms (ru_maxrss
    cannot tell: importing torch peaks higher than a decode)."""

    def __enter__(self):
        import threading

        self.page = resource.getpagesize()
        self.start = self.peak = self._rss()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _sample(self):
        while not self.done.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self._rss())
        self.growth = self.peak - self.start


def main() -> None:
    from clips import write_long_clip

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, nargs="+", default=[10, 120, 600])
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--memory", nargs="*", default=["480x720", "1080x1920", "2160x3840"])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "decode-cost")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)  # path frames height width source
    args = parser.parse_args()
    if args.child:
        path, frames, height, width, source = args.child
        print(json.dumps(memory(Path(path), int(frames), int(height), int(width),
                                tuple(int(v) for v in source.split("x")))))
        return

    root = Path(tempfile.mkdtemp(prefix="cogtune-decode-"))
    cost(write_long_clip(root / "warm-up.mp4", 2, height=64, width=96), "read_clip")  # first-call costs aside
    lengths = []
    for seconds in args.seconds:
        path = write_long_clip(root / f"{seconds}s.mp4", seconds, height=args.height, width=args.width, gop=48)
        for name in ("read_clip", "decord-open", "pyav-every-packet"):
            row = {"source_seconds": seconds, "file_mb": round(path.stat().st_size / 1e6, 1), "reader": name,
                   **cost(path, name)}
            print(json.dumps(row), flush=True)
            lengths.append(row)
        path.unlink()
    memories = []
    for size in args.memory:
        source = tuple(int(v) for v in size.split("x"))
        path = write_long_clip(root / f"{size}.mp4", 8, height=source[0], width=source[1], fps=24, gop=48)
        for frames, height, width in ((49, 480, 720), (17, 32, 48)):
            child = [sys.executable, __file__, "--child", str(path), str(frames), str(height), str(width), size]
            row = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout)
            print(json.dumps(row), flush=True)
            memories.append(row)
        path.unlink()
    write_report(args, lengths, memories)


def write_report(args, lengths: list[dict], memories: list[dict]) -> None:
    import torch

    machine = f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}"
    lines = ["# What reading one training clip costs (`bench/decode_cost.py`)", "",
             f"Machine: {machine}. Page cache warm.", "",
             f"## The first second of a {args.height}x{args.width} source of each length", "",
             "9 frames at 8 fps brought to 32x48 by `read_clip`; beside it, opening the file with decord, and "
             "PyAV reading every packet's time (the PyAV path before it stopped where the clip ends).", "",
             "| source | file (MB) | reader | seconds | MB read | decoder |", "|---|---|---|---|---|---|"]
    for row in lengths:
        lines.append(f"| {row['source_seconds']} s | {row['file_mb']} | {row['reader']} | {row['seconds']} | "
                     f"{row['mb_read']} | {row.get('decoder', '')} |")
    lines += ["", "## Memory of one decode", "",
              "numpy (tracemalloc) and torch (`LiveTensorBytes`) peaks, each in its own run in a fresh process; the "
              "goal is twice the output in float plus one source frame in float. RSS growth (sampled every 2 ms, "
              "another run) also holds FFmpeg's own frame buffers and the allocator's slack.", "",
              "| source | clip | decoder | numpy peak (MiB) | torch peak (MiB) | together (MiB) | goal (MiB) | "
              "RSS growth (MiB) |", "|---|---|---|---|---|---|---|---|"]
    for row in memories:
        lines.append(f"| {row['source']} | {row['clip']} | {row['decoder']} | {row['numpy_peak_mib']} | "
                     f"{row['torch_peak_mib']} | {row['together_mib']} | {row['goal_mib']} | "
                     f"{row['rss_growth_mib']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "length": lengths, "memory": memories},
                                                        indent=1) + "\n")
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
