"""--frame_extraction: several windows of a clip as samples of their own. The windows' source frames
against the arithmetic of each mode, their latents against clips cut with --skip_frames_start, the
selection, reuse on a second run, and training on a cache of windows."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from cogtune import data_schema as schema
from cogtune.cache.reader import Cache
from cogtune.data.video import window_starts
from cogtune.dev.tiny import make_demo_data

from conftest import cache_path_of, cogtune_here, write_config

FRAMES = 40  # each demo clip: 40 frames at 8 fps, read at --fps 8, so window frames are source frames


def test_window_starts_of_each_mode():
    assert window_starts(40, 9, "head") == [0]
    assert window_starts(40, 9, "chunk") == [0, 9, 18, 27]  # 27 + 9 = 36 <= 40 < 45
    assert window_starts(40, 9, "chunk", most=2) == [0, 9]
    assert window_starts(40, 9, "slide", stride=5) == [0, 5, 10, 15, 20, 25, 30]  # 30 + 9 = 39 <= 40
    assert window_starts(40, 9, "uniform", count=3) == [0, 16, 31]  # 0, 31/2 rounded, the last start
    assert window_starts(9, 9, "uniform", count=3) == [0]  # one possible window: once
    assert window_starts(9, 9, "chunk") == window_starts(9, 9, "slide", stride=2) == [0]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return make_demo_data(tmp_path_factory.mktemp("windows") / "data", num_frames=FRAMES, fps=8)


def rows_by_clip(cache_path):
    rows = {}
    for row in Cache.open(cache_path).samples:  # the selection
        rows.setdefault(row.source_path.rsplit("/", 1)[-1], []).append(row)
    return {name: sorted(found, key=lambda r: r.frame_indices[0]) for name, found in rows.items()}


def latents(cache_path, row) -> torch.Tensor:
    with safe_open(str(schema.shard_path(cache_path, row.latent_shard)), "pt") as f:
        return f.get_tensor(schema.video_tensor_key(row.latent_key, "mean"))


@pytest.mark.parametrize("flags, starts", [
    (["--frame_extraction", "chunk"], [0, 9, 18, 27]),
    (["--frame_extraction", "slide", "--frame_stride", "5", "--max_windows_per_clip", "3"], [0, 5, 10]),
    (["--frame_extraction", "uniform", "--frame_sample", "3"], [0, 16, 31]),
], ids=["chunk", "slide", "uniform"])
def test_each_window_is_a_sample_of_its_frames(tmp_path, tiny_model, clips, flags, starts):
    config = write_config(tmp_path / "c.toml", tiny_model, clips, tmp_path / "cache", tmp_path / "out")
    out = cogtune_here("preprocess", "--config", config, *flags).stdout
    cache = cache_path_of(out)
    assert f"samples: {4 * len(starts)} ok" in out and "encoded: 4 videos" in out
    assert f"windows: 4 clips gave {4 * len(starts)}; per clip: {len(starts)} (4 clips)" in out
    for name, rows in rows_by_clip(cache).items():
        assert [row.frame_indices for row in rows] == [list(range(s, s + 9)) for s in starts], name
        assert len({row.sample_id for row in rows}) == len({row.latent_key for row in rows}) == len(starts)
    again = cogtune_here("preprocess", "--config", config, *flags).stdout
    assert f"samples: {4 * len(starts)} ok" in again and "encoded: 0 videos, 0 captions" in again


def test_a_window_has_the_latents_of_the_clip_cut_at_its_start(tmp_path, tiny_model, clips):
    config = write_config(tmp_path / "c.toml", tiny_model, clips, tmp_path / "cache", tmp_path / "out",
                          max_train_steps=2)
    windows = cache_path_of(cogtune_here("preprocess", "--config", config, "--frame_extraction", "chunk").stdout)
    cut = cache_path_of(cogtune_here("preprocess", "--config", config, "--skip_frames_start", "18").stdout)
    head = cache_path_of(cogtune_here("preprocess", "--config", config).stdout)
    assert len({windows, cut, head}) == 3  # three caches: the extraction is part of a cache's identity
    for name, rows in rows_by_clip(windows).items():
        (cut_row,), (head_row,) = rows_by_clip(cut)[name], rows_by_clip(head)[name]
        assert cut_row.frame_indices == rows[2].frame_indices
        assert torch.equal(latents(windows, rows[2]), latents(cut, cut_row))
        assert torch.equal(latents(windows, rows[0]), latents(head, head_row))  # the window at 0 is the head
    # and training takes every window
    trained = cogtune_here("train", "--config", config, "--frame_extraction", "chunk", "--output_dir", tmp_path / "o")
    assert f"cache: {windows}" in trained.stderr
    state = json.loads((tmp_path / "o" / "checkpoint-2" / "cogtune_state.json").read_text())
    assert state["data_order"]["samples"].startswith("16 samples,")  # 4 clips x 4 windows


def test_two_processes_write_the_windows_one_process_writes(tmp_path, tiny_model, clips):
    from test_distributed import torchrun

    config = write_config(tmp_path / "c.toml", tiny_model, clips, tmp_path / "one", tmp_path / "out",
                          shard_size_mb=1e-6)
    flags = ["--frame_extraction", "slide", "--frame_stride", "8", "--max_windows_per_clip", "3"]
    one = cache_path_of(cogtune_here("preprocess", "--config", config, *flags).stdout)
    out = torchrun("-m", "cogtune.cli", "preprocess", "--config", config, *flags, "--cache_root", tmp_path / "two").stdout
    two = cache_path_of(out)
    assert "samples: 12 ok" in out and "encoded: 4 videos" in out
    rows_one, rows_two = rows_by_clip(one), rows_by_clip(two)
    assert rows_one.keys() == rows_two.keys()
    for name in rows_one:
        assert [(r.sample_id, r.frame_indices) for r in rows_one[name]] == \
            [(r.sample_id, r.frame_indices) for r in rows_two[name]]
        for a, b in zip(rows_one[name], rows_two[name]):
            assert torch.equal(latents(one, a), latents(two, b))


def test_image_to_video_windows_get_their_own_first_frame_noise(tmp_path, tiny_models, clips):
    model = tiny_models("5b-i2v")
    config = write_config(tmp_path / "c.toml", model, clips, tmp_path / "cache", tmp_path / "out", height=32,
                          width=64)
    head = rows_by_clip(cache_path_of(cogtune_here("preprocess", "--config", config).stdout))
    windows = rows_by_clip(cache_path_of(cogtune_here("preprocess", "--config", config, "--frame_extraction",
                                                      "chunk", "--max_windows_per_clip", "2").stdout))
    for name, rows in windows.items():
        assert len(rows) == 2 and rows[0].image_noise_sigmas == head[name][0].image_noise_sigmas
        assert rows[1].image_noise_sigmas != rows[0].image_noise_sigmas  # a window's noise is its own


def test_with_buckets_every_window_has_its_clips_bucket(tmp_path, tiny_model, clips):
    config = write_config(tmp_path / "c.toml", tiny_model, clips, tmp_path / "cache", tmp_path / "out")
    out = cogtune_here("preprocess", "--config", config, "--buckets", "9x32x64", "17x32x64",
                       "--frame_extraction", "chunk").stdout
    # 40 frames: the longest bucket that fits is 17 frames, whose chunks start at 0 and 17 (34 + 17 > 40)
    assert "samples: 8 ok" in out and "17x32x64 (8)" in out
    for name, rows in rows_by_clip(cache_path_of(out)).items():
        assert [(row.bucket, row.frame_indices) for row in rows] == \
            [("17x32x64", list(range(0, 17))), ("17x32x64", list(range(17, 34)))], name


def reference_frames(count: int, max_num_frames: int, skip_start: int = 0, skip_end: int = 0) -> list[int]:
    """The diffusers scripts' _preprocess_data, on frame numbers: the frames of the source, spread
    over it when there are more than max_num_frames, then cut to 4k+1 from the end."""
    start_frame = min(skip_start, count)
    end_frame = max(0, count - skip_end)
    if end_frame - start_frame <= max_num_frames:
        frames = list(range(start_frame, end_frame))
    else:
        frames = list(range(start_frame, end_frame, (end_frame - start_frame) // max_num_frames))
    frames = frames[:max_num_frames]
    remainder = (3 + (len(frames) % 4)) % 4
    return frames[:-remainder] if remainder else frames


def test_spread_takes_the_frames_the_diffusers_scripts_take(tmp_path, tiny_model):
    """A 4 s clip at 15 fps, 17 frames: head takes its first frames at --fps 8 (2 s of it), spread
    takes 17 frames over the whole clip at its own rate, as the reference does."""
    import decord

    from cogtune.data.video import spread_indices

    for count, most, skips in ((100, 49, (0, 0)), (131, 17, (3, 5)), (30, 49, (0, 0)), (50, 49, (0, 0))):
        expected = reference_frames(count, most, *skips)
        assert spread_indices(count, most, *skips)[:len(expected)] == expected

    data = make_demo_data(tmp_path / "data", num_frames=60, fps=15)
    config = write_config(tmp_path / "c.toml", tiny_model, data, tmp_path / "cache", tmp_path / "out",
                          max_num_frames=17)
    spread = cache_path_of(cogtune_here("preprocess", "--config", config, "--frame_extraction", "spread").stdout)
    head = cache_path_of(cogtune_here("preprocess", "--config", config).stdout)
    assert spread != head
    rows, head_rows = rows_by_clip(spread), rows_by_clip(head)
    for name, (row,) in rows.items():
        count = len(decord.VideoReader(str(data / "videos" / name)))
        assert row.frame_indices == reference_frames(count, 17) == list(range(0, 49, 3))
        (head_row,) = head_rows[name]
        assert head_row.frame_indices[-1] / 15 <= 2.2 and row.frame_indices[-1] / 15 >= 3.2
    preview = cogtune_here("preprocess", "--config", config, "--frame_extraction", "spread", "--preview").stdout
    assert "17 frames of 64x32 at 15 fps (one frame in 3)" in preview


def test_preview_shows_each_window(tmp_path, clips):
    config = write_config(tmp_path / "c.toml", "THUDM/CogVideoX-2b", clips, tmp_path / "cache", tmp_path / "out")
    out = cogtune_here("preprocess", "--config", config, "--preview", "--frame_extraction", "chunk",
                       "--max_windows_per_clip", "3").stdout
    assert "--frame_extraction chunk" in out and "-> 3 sample(s) of 9 frames" in out
    assert "window 1 of 3 (start 0): source frames 0-8" in out and "window 3 of 3 (start 18): source frames 18-26" in out
    assert "preview-9x32x64.png (12 samples)" in out
