"""`cogtune preprocess --preview`: contact sheets of a sample of clips, cut as preprocess cuts them,
with the crop window drawn where an independent computation puts it; no model, no cache. And the
preprocess summary says which clips were shorter than --max_num_frames."""

from __future__ import annotations

import shutil

import numpy as np
from PIL import Image

from cogtune.data.video import plan_resize_crop
from cogtune.dev.tiny import make_demo_data
from cogtune.preprocess.preview import crop_box
from cogtune.util.media import LINE_HEIGHT

from conftest import cogtune_here, write_config
from test_end_to_end import ASSETS


def test_crop_box_is_the_part_of_the_source_kept():
    # A 720x1080 portrait frame to 32x64: resized to cover (64x96), the centre 32 rows kept,
    # which are source rows 360-720 (32/96 and 64/96 of 1080) and every column.
    plan = plan_resize_crop(1080, 720, 32, 64, "center")
    assert crop_box(plan, 1080, 720, 32, 64) == (360, 0, 720, 720)
    assert crop_box(plan_resize_crop(1080, 720, 32, 64, "none"), 1080, 720, 32, 64) == (0, 0, 1080, 720)
    rng = np.random.default_rng(0)
    random = plan_resize_crop(480, 1280, 32, 64, "random", rng)  # a wide source: 32x85, a window of 64 columns
    top, left, bottom, right = crop_box(random, 480, 1280, 32, 64)
    assert (top, bottom) == (0, 480) and abs((right - left) - 64 / 85 * 1280) <= 1
    assert left == round(random.left / 85 * 1280) and 0 < random.left <= 85 - 64


def test_preview_writes_a_sheet_per_bucket_and_loads_no_model(tmp_path, tiny_model):
    data = make_demo_data(tmp_path / "data")
    shutil.copy(ASSETS / "videos" / "sample_portrait.mp4", data / "videos")
    with open(data / "videos.txt", "a") as f:
        f.write("videos/sample_portrait.mp4\n")
    with open(data / "prompts.txt", "a") as f:
        f.write("a portrait clip\n")
    # The model's config files alone (its family's frame rule), no weights: nothing can be loaded.
    configs_only = shutil.copytree(tiny_model, tmp_path / "configs-only", ignore=shutil.ignore_patterns("*.safetensors"))
    config = write_config(tmp_path / "c.toml", configs_only, data, tmp_path / "cache", tmp_path / "out")
    out = cogtune_here("preprocess", "--config", config, "--preview").stdout
    assert "Preview of 5 of 5 clips" in out
    assert "sample_portrait.mp4: 720x1080 at 29.97 fps -> 1 sample(s) of 5 frames of 64x32 at 8 fps" in out
    assert "shorter than --max_num_frames 9: a 5-frame sample" in out
    sheets = sorted((tmp_path / "cache" / "preview").glob("*.png"))
    assert [p.name for p in sheets] == ["preview-5x32x64.png", "preview-9x32x64.png"]
    assert not any(p.name != "preview" for p in (tmp_path / "cache").iterdir())  # no cache

    # The portrait's row: its source frame scaled to 32 rows (21 columns), the box at rows 11-21.
    sheet = np.asarray(Image.open(sheets[0]).convert("RGB")).astype(int)
    label = sheet.shape[0] - 32  # the label's lines above the one row of images
    assert label > 0 and label % LINE_HEIGHT == 0
    source = sheet[label:label + 32, :21]
    red = (source[..., 0] > 200) & (source[..., 1] < 90) & (source[..., 2] < 90)
    rows = np.nonzero(red.any(axis=1))[0]
    assert rows.min() == round(360 * 32 / 1080) and rows.max() == round(720 * 32 / 1080) - 1
    # then 5 frames of 64 columns: the sheet is 21 + 5 * 64 wide
    assert sheet.shape[1] == 21 + 5 * 64
    nine = np.asarray(Image.open(sheets[1]))
    height, width = nine.shape[:2]
    assert width == round(64 * 32 / 48) + 6 * 64  # 4 demo clips: 64x48 sources, 6 frames
    assert height > 4 * (32 + LINE_HEIGHT) - 1 and (height - 4 * 32) % LINE_HEIGHT == 0  # a label or more each

    # preprocess itself says so in its summary
    real = write_config(tmp_path / "r.toml", tiny_model, data, tmp_path / "cache2", tmp_path / "out")
    summary = cogtune_here("preprocess", "--config", real).stdout
    assert "samples: 5 ok" in summary and "shorter than --max_num_frames 9: 1 sample(s)" in summary
    assert "(5x32x64 (1))" in summary
