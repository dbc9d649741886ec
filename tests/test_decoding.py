"""Real and generated clips that break decoders: each is read with the right orientation, size,
frame times and frame count, or skipped with its reason."""

import numpy as np
import pytest

from cogtune.data.video import ClipSkipped, DecordVideo, PyAVVideo, fixed_size, open_video, read_clip

from clips import pattern, write_clip
from conftest import ASSETS


def read(path, fps=8, frames=9, height=32, width=32):
    return read_clip(path, fixed_size(height, width, frames), fps, 0, 0, "center", None)


@pytest.mark.parametrize("name, source_size, frames", [
    ("sample_portrait.mp4", (1080, 720), 5),  # 1 s: 8 frames at 8 fps, of which 5 is the largest 4k+1
    ("bear-vp9.webm", (240, 320), 9),  # 2.7 s
    ("h265_bframes.mp4", (480, 854), 5),
])
def test_real_clips(name, source_size, frames):
    clip = read(ASSETS / "videos" / name, fps=8, frames=9)
    assert (clip.source_height, clip.source_width) == source_size and clip.decoder == "decord"
    assert clip.pixels.shape == (3, frames, 32, 32)
    # resampled from 30 fps to 8: the source frame nearest to each k / 8 s
    assert clip.frame_indices == [int(k * clip.source_fps / 8 + 0.5) for k in range(frames)]


def test_odd_dimensions_vp9(tmp_path):
    clip = read(write_clip(tmp_path / "odd.webm", "libvpx-vp9", height=35, width=47))
    assert (clip.source_height, clip.source_width) == (35, 47) and clip.pixels.shape == (3, 9, 32, 32)


def test_width_decord_misreads_falls_back_to_pyav(tmp_path):
    """decord returns 4-channel garbage for some widths (48 here); PyAV decodes it."""
    path = write_clip(tmp_path / "w48.mp4", height=32, width=48)
    clip = read(path, height=32, width=48)
    assert clip.decoder == "pyav" and (clip.source_height, clip.source_width) == (32, 48)
    first = (clip.pixels[:, 0].permute(1, 2, 0).numpy() + 1) * 127.5
    assert np.abs(first[:8, :8] - [255, 0, 255]).mean() < 30  # the marker is where it was drawn


def test_ten_bit_source_decodes_to_the_right_pixels(tmp_path):
    path = write_clip(tmp_path / "tenbit.mkv", "libx265", pix_fmt="yuv420p10le", count=6,
                      options={"x265-params": "lossless=1:log-level=none"})
    video = open_video(path)
    decoded = video.frames([0, 5]).astype(int)
    assert np.abs(decoded - pattern(6, 64, 96)[[0, 5]].astype(int)).mean() < 4  # chroma subsampling only


def test_rotation_metadata_is_applied(tmp_path):
    path = write_clip(tmp_path / "phone.mp4", height=64, width=96, rotation=90)
    clip = read(path, height=48, width=32)
    assert (clip.source_height, clip.source_width) == (96, 64)  # a portrait phone clip comes out portrait
    decord_frames = DecordVideo(path).frames([0])
    pyav_frames = PyAVVideo(path).frames([0])
    assert decord_frames.shape == pyav_frames.shape == (1, 96, 64, 3)
    assert np.abs(decord_frames.astype(int) - pyav_frames.astype(int)).mean() < 2
    marker = np.argwhere(pyav_frames[0, :, :, 2] > 200).mean(0)
    assert marker[0] > 72 and marker[1] < 16  # a counter-clockwise quarter turn: top-left became bottom-left


def test_variable_frame_rate_uses_timestamps(tmp_path):
    """25 fps for 12 frames, then 8 fps: frames are picked by their times, not by index."""
    times = [i * 0.04 for i in range(12)] + [0.44 + k * 0.125 for k in range(1, 13)]
    path = write_clip(tmp_path / "vfr.mp4", count=24, times=times)
    clip = read(path, fps=8, frames=9)
    assert clip.decoder == "pyav"
    picked = [times[i] for i in clip.frame_indices]
    assert picked[:4] == pytest.approx([0.0, 0.12, 0.24, 0.36])  # the 25 fps part, resampled to 8 fps
    assert np.diff(picked[5:]) == pytest.approx([0.125] * 3)  # the 8 fps part, frame by frame


def test_implausible_container_fps_uses_timestamps(tmp_path):
    """An MKV whose fps metadata says 1000 while its frames are 40 ms apart (25 fps)."""
    path = write_clip(tmp_path / "fps1000.mkv", count=24, fps=1000, times=[i * 0.04 for i in range(24)],
                      container_format="matroska")
    clip = read(path, fps=8, frames=5)
    assert clip.decoder == "pyav" and clip.source_fps == pytest.approx(25.0)
    assert clip.frame_indices == [0, 3, 6, 9, 13]  # nearest to 0, 0.125, 0.25, 0.375, 0.5 s


def test_av1_which_decord_cannot_open(tmp_path):
    path = write_clip(tmp_path / "av1.mp4", "libsvtav1", options={"svtav1-params": "log-level=0"})
    clip = read(path)
    assert clip.decoder == "pyav" and clip.pixels.shape == (3, 9, 32, 32)


def test_truncated_files(tmp_path):
    """A truncated MKV keeps the frames before the cut; an MP4 cut before its index cannot be opened."""
    full = write_clip(tmp_path / "full.mkv", count=48, container_format="matroska")
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size * 6 // 10])
    clip = read(cut, fps=24, frames=49)
    assert 9 <= clip.pixels.shape[1] < 48 and (clip.pixels.shape[1] - 1) % 4 == 0
    mp4 = write_clip(tmp_path / "full.mp4", count=48)
    cut_mp4 = tmp_path / "cut.mp4"
    cut_mp4.write_bytes(mp4.read_bytes()[: mp4.stat().st_size * 6 // 10])
    with pytest.raises(ClipSkipped, match="cannot open video"):
        read(cut_mp4)


def test_skips_leave_no_frames(tmp_path):
    path = write_clip(tmp_path / "short.mp4", count=6)
    with pytest.raises(ClipSkipped, match="no frames left") as skipped:
        read_clip(path, fixed_size(32, 32, 9), 8, 4, 4, "center", None)
    assert skipped.value.kind == "too short"
