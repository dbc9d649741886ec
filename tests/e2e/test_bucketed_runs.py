"""Bucketed runs end to end: a mixed dataset (landscape and portrait, short and long, H.264, VP9 and AV1)
preprocessed into buckets and trained, and --max_failures stopping early without losing what was encoded."""

import json
from pathlib import Path

import pytest

from cogtune.cache.reader import Cache
from cogtune.train.data import epoch_batches

from clips import write_clip
from conftest import cache_path_of, cogtune_here, write_config


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    """Landscape, portrait, short and long clips in H.264, VP9 and AV1, one too short, one broken."""
    root = tmp_path_factory.mktemp("mixed")
    clips = {
        "land-long-1.mp4": dict(height=64, width=96, count=48),
        "land-long-2.webm": dict(codec="libvpx-vp9", height=72, width=128, count=40),
        "land-long-3.mp4": dict(codec="libsvtav1", height=64, width=112, count=36,
                                options={"svtav1-params": "log-level=0"}),
        "land-long-4.mp4": dict(height=48, width=80, count=30),
        "portrait-long-1.mp4": dict(height=96, width=64, count=40),
        "portrait-long-2.webm": dict(codec="libvpx-vp9", height=128, width=72, count=30),
        "portrait-phone.mp4": dict(height=64, width=96, count=30, rotation=90),
        "portrait-long-3.mp4": dict(height=112, width=64, count=36),
        "land-short.mp4": dict(height=64, width=96, count=6),
        "portrait-short.mp4": dict(height=96, width=64, count=7),
        "tiny.mp4": dict(height=64, width=96, count=3),
    }
    for name, settings in clips.items():
        write_clip(root / name, **settings)
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video")
    names = sorted(list(clips) + ["broken.mp4"])
    (root / "metadata.jsonl").write_text("".join(json.dumps({"text": f"clip {n}", "file": n}) + "\n" for n in names))
    return root


def test_mixed_dataset_preprocesses_into_buckets_and_trains_with_batch_4(tmp_path, tiny_model, mixed_data):
    config = write_config(tmp_path / "c.toml", tiny_model, mixed_data, tmp_path / "cache", tmp_path / "out",
                          dataset_name=str(mixed_data / "metadata.jsonl"), caption_column="text", video_column="file",
                          fps=24, buckets=["9x32x48", "9x48x32", "5x32x48", "5x48x32"], train_batch_size=4,
                          max_train_steps=3, vae_batch_size=2, dataloader_num_workers=2)
    out = cogtune_here("preprocess", "--config", config).stdout
    assert "samples: 10 ok, 2 skipped" in out
    assert "skipped, too short: 1" in out and "skipped, unreadable: 1" in out
    assert "buckets: 5x32x48 (1), 5x48x32 (1), 9x32x48 (4), 9x48x32 (4)" in out
    cache = Cache.open(cache_path_of(out))
    settings = cogtune_here("cache", "inspect", cache.path).stdout.split("settings: ")[1].splitlines()[0]
    shown = {item.split("=")[0] for item in settings.split(", ")}
    assert "buckets" in shown and not {"height", "width", "max_num_frames"} & shown, settings
    by_name = {Path(r.source_path).name: r for r in cache.samples}
    for name, row in by_name.items():
        portrait = name.startswith("portrait")
        assert (row.height > row.width) == portrait, name
        assert row.num_frames == (5 if "short" in name else 9)
        assert row.bucket == f"{row.num_frames}x{row.height}x{row.width}"
        assert row.latent_shape == [4, (row.num_frames - 1) // 4 + 1, row.height // 8, row.width // 8]
    assert by_name["portrait-phone.mp4"].source_height == 96  # the rotation was applied
    assert by_name["land-long-3.mp4"].decoder == "pyav"  # AV1
    failed = {Path(r.source_path).name: r for r in cache.failed}
    assert failed["tiny.mp4"].failure_kind == "too short" and "fewer than --min_num_frames 5" in failed["tiny.mp4"].reason
    assert failed["broken.mp4"].failure_kind == "unreadable"

    cogtune_here("train", "--config", config)
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(r["loss"] > 0 for r in log)


def test_max_failures_stops_early_and_keeps_what_was_encoded(tmp_path, tiny_model, mixed_data):
    config = write_config(tmp_path / "c.toml", tiny_model, mixed_data, tmp_path / "cache", tmp_path / "out",
                          dataset_name=str(mixed_data / "metadata.jsonl"), caption_column="text", video_column="file",
                          fps=24, buckets=["9x32x48", "9x48x32", "5x32x48", "5x48x32"])
    # broken.mp4 is read first and tiny.mp4 last: one failure is tolerated, the second stops the run
    stopped = cogtune_here("preprocess", "--config", config, "--max_failures", "1", check=False)
    assert stopped.returncode == 2 and "Stopped: 2 of the 12 clips" in stopped.stderr
    assert "more than --max_failures 1 allows" in stopped.stderr and "tiny.mp4" in stopped.stderr
    assert "The clips encoded so far are kept" in stopped.stderr
    again = cogtune_here("preprocess", "--config", config).stdout
    assert "encoded: 0 videos" in again and "reused from the cache: 10 videos" in again
    assert "samples: 10 ok, 2 skipped" in again
    # a fraction: 5% of 12 clips tolerates none, so the first unusable clip stops the run
    fraction = cogtune_here("preprocess", "--config", config, "--max_failures", "0.05", "--fps", "12", check=False)
    assert fraction.returncode == 2 and "Stopped: 1 of the 1 clips" in fraction.stderr
