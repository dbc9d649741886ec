"""Preprocessing throughput: clips/s with 0 and 2 DataLoader workers on the demo (tiny) model.

    .venv/bin/python bench/preprocess_throughput.py [--clips 32] [--workers 0 2]

Builds the tiny model and `--clips` synthetic clips (96 frames of 240x320 at 24 fps, so decoding
and resizing are real work), then times a fresh `cogtune preprocess` per worker count into its own
cache (nothing is reused). Prints one JSON line per run. CPU only; the tiny VAE is cheap, so this
measures how well decoding overlaps encoding, not the real VAE's speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")


def main() -> None:
    from cogtune import preprocess
    from cogtune.config import make_config
    from cogtune.dev.tiny import COLORS, make_tiny_model, synthetic_frames
    from cogtune.util.media import write_mp4

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="cogtune-bench-"))
    model = make_tiny_model(root / "model")
    data = root / "data"
    (data / "videos").mkdir(parents=True)
    colors = list(COLORS.values())
    for i in range(args.clips):
        write_mp4(data / "videos" / f"{i:05d}.mp4", synthetic_frames(96, 240, 320, colors[i % 4], 1 - 2 * (i % 2)), 24)
    (data / "prompts.txt").write_text("".join(f"clip number {i}\n" for i in range(args.clips)))
    (data / "videos.txt").write_text("".join(f"videos/{i:05d}.mp4\n" for i in range(args.clips)))

    for workers in args.workers:
        config = make_config("preprocess", dict(
            pretrained_model_name_or_path=str(model), instance_data_root=str(data), cache_root=str(root / f"cache{workers}"),
            height=64, width=96, fps=24, max_num_frames=49, mixed_precision="no", latent_dtype="fp32",
            dataloader_num_workers=workers,
        ))
        started = time.perf_counter()
        result = preprocess.run(config)
        seconds = time.perf_counter() - started
        print(json.dumps({"workers": workers, "clips": result.samples, "seconds": round(seconds, 2),
                          "clips_per_s": round(result.samples / seconds, 2), "cpus": os.cpu_count(),
                          "machine": platform.machine()}))


if __name__ == "__main__":
    main()
