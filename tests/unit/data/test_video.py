from fractions import Fraction

import numpy as np
import pytest
import torch

from cogtune.data.video import size_rule
from cogtune.config import PreprocessConfig
from cogtune.data.video import (ClipSkipped, Span, fixed_size, largest_frame_count, on_the_rate, plan_resize_crop,
                                read_clip, resample_indices, resize_crop, select_frame_indices, to_clip_size,
                                to_model_range)


@pytest.mark.parametrize("frames, expected", [(1, 1), (4, 1), (5, 5), (8, 5), (9, 9), (49, 49), (52, 49), (53, 53)])
def test_largest_4k_plus_1(frames, expected):
    assert largest_frame_count(frames, 4) == expected


def test_frames_resampled_to_target_fps():
    # 30 fps -> 8 fps: frame k is the source frame nearest to k / 8 s.
    indices = select_frame_indices(300, 30.0, 8, 49, frame_step=4)
    assert len(indices) == 49
    assert indices == [int(k * 30 / 8 + 0.5) for k in range(49)]
    times = np.array(indices) / 30.0
    assert np.allclose(np.diff(times), 1 / 8, atol=1 / 30)


def test_slower_source_keeps_every_frame():
    assert select_frame_indices(100, 8.0, 8, 49, frame_step=4) == list(range(49))
    assert select_frame_indices(100, 5.0, 8, 9, frame_step=4) == list(range(9))


def test_skip_frames_start_and_end():
    indices = select_frame_indices(60, 8.0, 8, 49, skip_start=10, skip_end=5, frame_step=4)
    assert indices[0] == 10 and indices[-1] < 55
    assert len(indices) == 45  # 45 usable frames: 4k+1 already


def test_short_clip_uses_largest_4k_plus_1():
    assert len(select_frame_indices(20, 8.0, 8, 49, frame_step=4)) == 17
    indices = select_frame_indices(40, 16.0, 8, 49, frame_step=4)  # 40 frames at 16 fps hold 20 frames at 8 fps
    assert len(indices) == 17 and indices[-1] <= 39


def test_nothing_left_after_skipping():
    with pytest.raises(ClipSkipped, match="no frames left"):
        select_frame_indices(10, 8.0, 8, 9, skip_start=6, skip_end=4, frame_step=4)


def test_center_crop_keeps_aspect_and_centres():
    plan = plan_resize_crop(1080, 720, 480, 720, "center")  # portrait into landscape
    assert (plan.resize_width, plan.resize_height) == (720, 1080)
    assert plan.top == (1080 - 480) // 2 and plan.left == 0
    plan = plan_resize_crop(144, 176, 32, 64, "center")  # wider target: cover the width
    assert plan.resize_width == 64 and plan.resize_height >= 32 and plan.left == 0


def test_random_crop_is_seeded_and_within_bounds():
    plans = [plan_resize_crop(480, 1280, 480, 720, "random", np.random.default_rng(s)) for s in range(20)]
    assert all(0 <= p.left <= 1280 - 720 and p.top == 0 for p in plans)
    assert len({p.left for p in plans}) > 1  # not the centre every time
    again = plan_resize_crop(480, 1280, 480, 720, "random", np.random.default_rng(3))
    assert again == plans[3]


def test_none_mode_resizes_without_crop():
    plan = plan_resize_crop(144, 176, 32, 64, "none")
    assert (plan.resize_height, plan.resize_width, plan.top, plan.left) == (32, 64, 0, 0)


def test_resize_crop_shape_and_centre_content():
    frames = torch.zeros(2, 3, 40, 40)
    frames[:, :, 10:30, :] = 1.0  # a band in the middle rows
    plan = plan_resize_crop(40, 40, 16, 16, "center")
    out = resize_crop(frames, plan, 16, 16)
    assert out.shape == (2, 3, 16, 16)
    assert out[:, :, 8, 8].min() > 0.9 and out[:, :, 0, 8].max() < 0.1


@pytest.mark.parametrize("source, target, mode", [
    ((1080, 1920), (480, 720), "center"),  # down, cropped across
    ((1080, 720), (480, 720), "center"),  # portrait into landscape: cropped down
    ((90, 100), (240, 320), "center"),  # up
    ((480, 700), (480, 720), "center"),  # across only: the height is kept
    ((300, 720), (480, 720), "none"),  # down only, no crop
    ((480, 1280), (480, 720), "random"),
    ((64, 96), (64, 96), "center"),  # the size already
])
def test_resizing_band_by_band_gives_the_numbers_of_resizing_whole_float_frames(source, target, mode):
    """to_clip_size never holds a frame in float at its source size, yet gives what resizing the
    whole float frames gives (torch's antialiased resize is separable; other torch versions may
    round differently in the last bit, hence the tolerance)."""
    frames = torch.randint(0, 256, (2, *source, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy()
    plan = plan_resize_crop(*source, *target, mode, np.random.default_rng(1))
    whole = resize_crop(to_model_range(frames), plan, *target).clamp(-1, 1)
    for rows in (64, 7):
        banded = to_clip_size(frames, plan, *target, rows=rows)
        assert banded.shape == (2, 3, *target)
        assert torch.allclose(banded, whole, rtol=0, atol=1e-6)


def _time_lists():
    """Frame times: 30 fps; 29.97 fps after a start at 1.4 s; 25 fps then 8 fps; 8 fps then 60 fps
    (a slow start: kept frame by frame, whatever comes later); a jittery phone clip."""
    jitter = np.random.default_rng(5).uniform(-0.004, 0.004, 400)
    return {
        "30fps": [i / 30 for i in range(400)],
        "29.97fps": [1.4 + i * 1001 / 30000 for i in range(400)],
        "25-then-8": [i * 0.04 for i in range(40)] + [1.56 + k * 0.125 for k in range(1, 200)],
        "8-then-60": [i * 0.125 for i in range(30)] + [3.625 + k / 60 for k in range(1, 300)],
        "phone": list(np.cumsum(1 / 30 + jitter)),
    }


@pytest.mark.parametrize("name", list(_time_lists()))
@pytest.mark.parametrize("skip_start, skip_end, most", [(0, 0, 9), (0, 0, 49), (5, 3, 17), (40, 10, 9)])
def test_the_first_frames_of_a_source_decide_the_clip_as_the_whole_source_does(name, skip_start, skip_end, most):
    """A reader may stop once Span.decided_by says so: from there on, the frames resample_indices
    picks for a clip of up to `most` frames are those it picks on the whole source, as is the
    frame count the size rule gives."""
    times = _time_lists()[name]
    span = Span(8, skip_start, skip_end, lambda height, width: (most, 480, 720))
    whole = resample_indices(times, 8, skip_start, skip_end, most)
    decided = [n for n in range(1, len(times) + 1) if span.decided_by(times[:n], 480, 720)]
    assert decided and decided[0] < len(times) - 50  # reading stops before the end
    sizes = size_rule(PreprocessConfig(max_num_frames=most), 4)
    for n in decided:
        first = resample_indices(times[:n], 8, skip_start, skip_end, most)
        assert first[:most] == whole[:most], n
        assert sizes(len(first), 480, 720) == sizes(len(whole), 480, 720)


def test_a_slow_start_keeps_every_frame_whatever_comes_later():
    """8 fps for 30 frames, then 60 fps: a 9-frame clip at 8 fps is the first 9 frames as they are."""
    times = _time_lists()["8-then-60"]
    assert resample_indices(times, 8, most=9)[:9] == list(range(9))


def _nearest_exactly(source_rate: Fraction, target_rate: int, count: int, frames: int) -> list[int]:
    """The source frame nearest each k / target_rate, in exact arithmetic (ties to the later)."""
    return [min(range(count), key=lambda i: (abs(i / source_rate - Fraction(k, target_rate)), -i))
            for k in range(frames)]


@pytest.mark.parametrize("source_rate", [Fraction(30), Fraction(30000, 1001), Fraction(25), Fraction(60)])
@pytest.mark.parametrize("rounding", ["ms", "float32"])
def test_times_rounded_by_the_container_or_the_decoder_are_taken_as_the_grid_they_are(source_rate, rounding):
    """A 30 fps source at 24 fps has an exact tie every 4 frames. Times rounded to 1 ms (WebM,
    MKV) or stored as float32 (decord) break the ties either way; on_the_rate restores the grid,
    so the frames are those exact arithmetic picks, whatever the container says its rate is."""
    exact = [i / source_rate for i in range(200)]
    stamps = [round(float(t), 3) for t in exact] if rounding == "ms" else np.float32([float(t) for t in exact]).tolist()
    expected = _nearest_exactly(source_rate, 24, 200, 49)
    for said in (float(source_rate), None, 60.0):  # right, missing, wrong
        times, rate = on_the_rate(stamps, said)
        assert rate == pytest.approx(float(source_rate), rel=1e-9)
        assert resample_indices(times, 24, most=49)[:49] == expected
    if source_rate == 30 and rounding == "ms":
        assert resample_indices(stamps, 24, most=49)[:49] != expected  # as the container gives them


def test_times_that_are_no_grid_are_kept_as_they_are():
    variable = [i * 0.04 for i in range(12)] + [0.44 + k * 0.125 for k in range(1, 13)]
    assert on_the_rate(variable, 25.0) == (variable, None)
    jittery = list(np.cumsum(np.full(60, 1 / 30) + np.tile([0.004, -0.004], 30)))  # 4 ms off the grid
    assert on_the_rate(jittery, 30.0) == (jittery, None)


def test_pixels_scaled_to_minus_one_one():
    frames = np.array([[[[0, 255, 127]]]], dtype=np.uint8)
    out = to_model_range(frames)
    assert out.shape == (1, 3, 1, 1)
    assert out[0, 0].item() == -1.0 and out[0, 1].item() == 1.0 and abs(out[0, 2].item()) < 0.01


def test_read_real_portrait_clip(tmp_path):
    from conftest import ASSETS

    clip = read_clip(ASSETS / "videos" / "sample_portrait.mp4", fixed_size(32, 48, 9, 4), 24, 0, 0, "center", None)
    assert clip.pixels.shape == (3, 9, 32, 48)
    assert (clip.source_height, clip.source_width) == (1080, 720)  # portrait stays portrait
    assert clip.pixels.min() >= -1 and clip.pixels.max() <= 1
    assert clip.frame_indices == [int(k * clip.source_fps / 24 + 0.5) for k in range(len(clip.frame_indices))]


def test_unreadable_file_is_skipped_with_reason(tmp_path):
    bad = tmp_path / "not-a-video.mp4"
    bad.write_text("hello")
    with pytest.raises(ClipSkipped, match="cannot open video"):
        read_clip(bad, fixed_size(32, 32, 9, 4), 8, 0, 0, "center", None)
