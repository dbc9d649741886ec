"""Real and generated clips that break decoders: each is read with the right orientation, size,
frame times and frame count, or skipped with its reason."""

import numpy as np
import pytest
import torch

from cogtune.data.video import ClipSkipped, DecordVideo, PyAVVideo, fixed_size, open_video, read_clip

from clips import pattern, write_clip
from conftest import ASSETS


def read(path, fps=8, frames=9, height=32, width=32):
    return read_clip(path, fixed_size(height, width, frames, 4), fps, 0, 0, "center", None)


@pytest.mark.parametrize("name, source_size, frames", [
    ("sample_portrait.mp4", (1080, 720), 5),  # 1 s: 8 frames at 8 fps, of which 5 is the largest 4k+1
    ("bear-vp9.webm", (240, 320), 9),  # 2.7 s
    ("h265_bframes.mp4", (480, 854), 5),
])
def test_real_clips(name, source_size, frames):
    path = ASSETS / "videos" / name
    clip = read(path, fps=8, frames=9)
    assert (clip.source_height, clip.source_width) == source_size
    assert clip.decoder == "pyav"  # the source, decoded, is larger than this small clip may take
    assert clip.pixels.shape == (3, frames, 32, 32)
    # resampled from 30 fps to 8: the source frame nearest to each k / 8 s
    assert clip.frame_indices == [int(k * clip.source_fps / 8 + 0.5) for k in range(frames)]
    assert np.array_equal(DecordVideo(path).frames(clip.frame_indices), PyAVVideo(path).frames(clip.frame_indices))


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
    """decord's older FFmpeg turns 10-bit into RGB otherwise than PyAV's (1.2 levels on average, 75
    at colour edges): it is not used for such sources, so their clips do not depend on the reader."""
    from cogtune.data.video.container import _Fallback

    path = write_clip(tmp_path / "tenbit.mkv", "libx265", pix_fmt="yuv420p10le", count=6,
                      options={"x265-params": "lossless=1:log-level=none"})
    video = open_video(path)
    decoded = video.frames([0, 5]).astype(int)
    assert video.name == "pyav"
    assert np.abs(decoded - pattern(6, 64, 96)[[0, 5]].astype(int)).mean() < 4  # chroma subsampling only
    with pytest.raises(_Fallback, match="pixel format yuv420p10le"):
        DecordVideo(path)
    eight_bit = write_clip(tmp_path / "eightbit.mkv", "libx265", count=6, options={"x265-params": "lossless=1:log-level=none"})
    assert np.array_equal(DecordVideo(eight_bit).frames([0, 5]), PyAVVideo(eight_bit).frames([0, 5]))


def test_a_clip_is_the_same_whichever_reader_reads_it(tmp_path):
    """A 30 fps WebM (times rounded to 1 ms) resampled to 24 fps, with an exact tie every 4 frames:
    decord (for a clip as large as the source) and PyAV (for a small one) pick the same frames,
    those exact arithmetic picks."""
    from fractions import Fraction

    path = write_clip(tmp_path / "vp9.webm", "libvpx-vp9", count=60, fps=30)
    large, small = read(path, fps=24, frames=49, height=64, width=96), read(path, fps=24, frames=49, height=16, width=16)
    nearest = [min(range(60), key=lambda i: (abs(Fraction(i, 30) - Fraction(k, 24)), -i)) for k in range(45)]
    assert (large.decoder, small.decoder) == ("decord", "pyav")
    assert large.frame_indices == small.frame_indices == nearest


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
        read_clip(path, fixed_size(32, 32, 9, 4), 8, 4, 4, "center", None)
    assert skipped.value.kind == "too short"


def test_a_misreported_average_rate_does_not_move_the_frames(tmp_path):
    """An MKV of frames 1/30 s apart that says it is 60 fps: decord reads it, and frames are still
    picked by their timestamps (nearest to k / 8 s at 30 fps; ties go to the later frame)."""
    path = write_clip(tmp_path / "said60.mkv", count=60, fps=60, times=[i / 30 for i in range(60)],
                      container_format="matroska")
    clip = read(path, fps=8, frames=17, height=64, width=96)  # the clip as large as the source: decord may read it
    assert clip.decoder == "decord" and clip.source_fps == pytest.approx(30, rel=1e-3)
    assert clip.frame_indices == [int(k * 30 / 8 + 0.5) for k in range(13)]  # 2 s at 8 fps: 16, cut to 4k+1


def test_a_slightly_wrong_average_rate_does_not_drift(tmp_path):
    """31 fps said, 29.97 fps true, over 8 s: the last of 49 frames at 8 fps is the one at 6 s."""
    times = [i * 1001 / 30000 for i in range(240)]
    path = write_clip(tmp_path / "said31.mkv", count=240, fps=31, times=times, container_format="matroska",
                      height=32, width=32)
    for decoder in ("decord", "pyav"):  # decord reads all of this small source; PyAV only what the clip needs
        clip = read(path, fps=8, frames=49) if decoder == "decord" else read(path, fps=8, frames=49, height=16, width=16)
        assert clip.decoder == decoder
        assert clip.frame_indices[-1] == min(range(240), key=lambda i: abs(times[i] - 6.0))
        assert all(abs(times[i] - k / 8) <= 0.5 / 29.97 + 1e-3 for k, i in enumerate(clip.frame_indices))


def test_timestamps_out_of_order_are_searched_in_display_order(tmp_path):
    """H.264 with B-frames in AVI: FFmpeg labels the frames 1, 3, 4, 2, ... (decode order) while it
    hands them out in display order; the k-th frame shown is at the k-th time."""
    path = write_clip(tmp_path / "bframes.avi", count=30, fps=25, container_format="avi", options={"bf": "2"})
    clip = read(path, fps=8, frames=5)
    assert clip.decoder == "pyav"
    assert clip.frame_indices == [int(k * 25 / 8 + 0.5) for k in range(5)]  # [0, 3, 6, 9, 13]
    later = read_clip(path, fixed_size(32, 32, 5, 4), 8, 5, 0, "center", None)
    assert later.frame_indices == [5 + int(k * 25 / 8 + 0.5) for k in range(5)]  # starts at frame 5, 200 ms
    blue = [float(v) for v in clip.pixels[2, :, 16, 24]]  # the pattern's blue rises with the frame number
    assert blue == sorted(blue)


def test_decoding_memory_follows_the_output_not_the_source(tmp_path):
    """17 frames of 720x1280 brought to 32x48, from an MP4 and from an AVI with B-frames: what
    a decode holds at its peak, numpy (decoded frames, seen by tracemalloc) and torch (seen by
    LiveTensorBytes) together, is at most twice the output in float plus one source frame in float,
    not the 17 source frames in float the decode once held (three times over). Each is measured in a
    run of its own (LiveTensorBytes keeps numpy buffers alive a little longer). FFmpeg's own frame
    buffers are outside both, and do not grow with the clip."""
    import tracemalloc

    from cogtune.util.tensor_bytes import LiveTensorBytes

    source_frame = 720 * 1280 * 3 * 4
    for name, options in (("big.mp4", None), ("big.avi", {"bf": "2"})):
        path = write_clip(tmp_path / name, count=17, fps=8, height=720, width=1280, options=options)
        tracemalloc.start()
        try:
            clip = read(path, fps=8, frames=17, height=32, width=48)
            numpy_peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        with LiveTensorBytes() as live:
            read(path, fps=8, frames=17, height=32, width=48)
        assert clip.decoder == "pyav" and clip.pixels.shape == (3, 17, 32, 48)  # decord would hold more
        output = clip.pixels.numel() * 4
        assert numpy_peak + live.peak <= 2 * output + source_frame, (name, (numpy_peak + live.peak) / source_frame)


def test_decoded_frames_are_freed_as_decoding_goes_not_by_the_garbage_collector(tmp_path):
    """Reading a frame's side data ties the frame in a reference cycle (PyAV): done for every frame,
    49 frames of 4K held 550 MB until the collector ran. The display matrix is read from the first
    frame only, so with the collector off, at most that one frame is left behind."""
    import gc

    import av

    path = write_clip(tmp_path / "phone.mp4", count=60, fps=24, rotation=90)
    gc.collect()
    gc.disable()
    try:
        clip = read(path, fps=8, frames=17)
        left = [o for o in gc.get_objects() if type(o) is av.VideoFrame]
    finally:
        gc.enable()
    assert clip.decoder == "pyav" and clip.pixels.shape[1] == 17 and len(left) <= 1


def test_a_long_source_is_read_only_as_far_as_the_clip_needs(tmp_path):
    """The first second of a 2-minute clip: PyAV reads the packets' times only as far as the clip
    needs, and the clip is the one decoding every frame of the file gives, and the one a 4-second
    cut of it gives. (bench/decode_cost.py shows the same for 10 minutes of 1080p.)"""
    from clips import write_long_clip

    from cogtune.data.video import REORDER_DEPTH, Span, resample_indices

    long = write_long_clip(tmp_path / "long.mp4", seconds=120)
    short = write_long_clip(tmp_path / "short.mp4", seconds=4)
    clip, cut = read(long, fps=8, frames=9), read(short, fps=8, frames=9)
    assert clip.decoder == "pyav"
    assert clip.frame_indices == cut.frame_indices == [0, 3, 6, 9, 12, 15, 18, 21, 24]
    assert torch.allclose(clip.pixels, cut.pixels, atol=1e-6)
    video = PyAVVideo(long, Span(8, 0, 0, lambda height, width: (9, 32, 32)))
    assert len(video.frame_times) <= 9 * 3 + 2 * REORDER_DEPTH + 8  # of 2,880 frames
    everything = PyAVVideo(long, from_packets=False)
    assert len(everything.frame_times) == 2880
    assert resample_indices(everything.frame_times, 8, 0, 0, 9)[:9] == clip.frame_indices
    assert np.array_equal(video.frames(clip.frame_indices), everything.frames(clip.frame_indices))


def test_decord_reads_only_sources_whose_decoded_frames_fit_what_the_clip_may_take(tmp_path):
    """decord's decoding thread runs ahead of its caller and keeps what it decodes (up to the whole
    file), and it reads every packet to open a file: it is given a source only when all of its
    frames, decoded, fit in twice the clip in float plus one source frame."""
    from cogtune.data.video.container import _decord_suits, decode_budget
    from cogtune.data.video.frames import Span

    path = write_clip(tmp_path / "clip.mp4", count=48, height=64, width=96)
    decoded = 48 * 64 * 96 * 3
    for frames, height, width in ((49, 64, 96), (9, 64, 96), (9, 32, 32), (49, 96, 64)):
        span = Span(8, largest=lambda _h, _w: (frames, height, width))
        fits = decoded <= 2 * frames * 3 * height * width * 4 + 64 * 96 * 3 * 4
        assert decode_budget(span, 64, 96) == 2 * frames * 3 * height * width * 4 + 64 * 96 * 3 * 4
        assert _decord_suits(path, span) is fits, (frames, height, width)
        clip = read_clip(path, lambda _a, _h, _w: (min(frames, 45), height, width), 8, 0, 0, "center", None)
        assert clip.decoder == ("decord" if fits else "pyav")
    assert _decord_suits(path, None)  # no clip to measure against: decord first, as before


@pytest.mark.parametrize("name, codec, options", [
    ("bframes.mp4", "libx264", {"bf": "3", "g": "24"}),
    ("open-gop.mp4", "libx264", {"bf": "3", "x264-params": "open-gop=1:keyint=24:min-keyint=24"}),
    ("hevc.mp4", "libx265", {"x265-params": "log-level=none:keyint=24:bframes=3"}),
    ("bframes.mkv", "libx264", {"bf": "3", "g": "24"}),
    ("vp9.webm", "libvpx-vp9", {"g": "24"}),
    ("seeks-roughly.ts", "libx264", {"bf": "2", "g": "24"}),  # the seek lands late: decoded from the start
])
def test_frames_far_into_a_source_are_those_decoding_from_the_start_gives(tmp_path, name, codec, options):
    """--skip_frames_start 100 (4 s in): PyAV seeks to the key frame before frame 100 and names the
    frames by their times; the frames are the ones decoding every frame from the start gives."""
    from cogtune.data.video import Span, resample_indices

    path = write_clip(tmp_path / name, codec, count=300, fps=24, options=options)
    fast = PyAVVideo(path, Span(8, 100, 0, lambda height, width: (9, 32, 32)))
    careful = PyAVVideo(path, from_packets=False)
    indices = resample_indices(careful.frame_times, 8, 100, 0, 9)[:9]
    assert indices == [100 + 3 * k for k in range(9)]
    assert resample_indices(fast.frame_times, 8, 100, 0, 9)[:9] == indices
    assert np.array_equal(fast.frames(indices), careful.frames(indices))


@pytest.mark.parametrize("matrix, mirrors", [
    ((1, 0, 0, 1), False), ((0, -1, 1, 0), False), ((-1, 0, 0, -1), False),  # turns
    ((-1, 0, 0, 1), True), ((1, 0, 0, -1), True), ((0, 1, 1, 0), True),  # mirrors
])
def test_a_mirroring_mp4_is_told_from_its_header(tmp_path, matrix, mirrors):
    """decord is kept from mirrored MP4s by the track header's matrix alone, read from the boxes
    (moov after mdat here, as PyAV writes it) without decoding a frame."""
    from clips import set_mp4_matrix

    from cogtune.data.video.container import _mp4_mirrors

    path = write_clip(tmp_path / "clip.mp4", count=2)
    set_mp4_matrix(path, *matrix)
    assert _mp4_mirrors(path) is mirrors
    assert _mp4_mirrors(write_clip(tmp_path / "clip.mkv", count=2, container_format="matroska")) is False
    data = path.read_bytes()
    at = data.find(b"tkhd") + 4
    (tmp_path / "bad.mp4").write_bytes(data[:at] + b"\x07" + data[at + 1:])  # a track header of no known version
    assert _mp4_mirrors(tmp_path / "bad.mp4") is True  # cannot tell: PyAV, which applies the matrix, reads it


def test_a_video_given_as_the_first_frame_is_turned_as_training_clips_are(tmp_path):
    """A portrait phone clip (display matrix: a quarter turn) as --image or --validation_images: its
    first frame is upright, the same frame training reads from the clip."""
    from cogtune.data.video import first_frame_pixels

    path = write_clip(tmp_path / "phone.mp4", height=64, width=96, rotation=90, codec="libx264",
                      options={"crf": "0"})
    first = first_frame_pixels(path, 48, 32)
    clip = read(path, height=48, width=32)
    assert first.shape == (3, 1, 48, 32)
    assert (first[:, 0] - clip.pixels[:, 0]).abs().mean() < 0.02  # decord and PyAV decode alike


def test_an_audio_only_file_is_skipped_as_having_no_video_stream(tmp_path):
    import av

    path = tmp_path / "voice.m4a"
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        for start in range(0, 16000, 1024):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(ClipSkipped, match="no video stream") as skipped:
        read(path)
    assert skipped.value.kind == "no video stream"


@pytest.mark.parametrize("name, codec, options, times", [
    ("h264.mp4", "libx264", None, None),
    ("vfr.mkv", "libx264", None, [i * 0.04 + (0.02 if i > 15 else 0) for i in range(30)]),
    ("vp9.webm", "libvpx-vp9", None, None),
    ("xvid.avi", "mpeg4", None, None),
    ("mpegts.ts", "libx264", None, None),
])
def test_packet_timestamps_are_the_decoded_frames_times(tmp_path, name, codec, options, times):
    """PyAV reads frame times from packets without decoding; they are the times that decoding every
    frame gives, and the frames read are the same."""
    path = write_clip(tmp_path / name, codec, count=30 if times else 20, times=times, options=options)
    fast, careful = PyAVVideo(path), PyAVVideo(path, from_packets=False)
    assert fast.frame_times == careful.frame_times and len(fast.frame_times) == (30 if times else 20)
    every = list(range(len(fast.frame_times)))
    assert np.array_equal(fast.frames(every), careful.frames(every))


def test_decoding_frames_for_their_times_also_stops_where_the_clip_ends(tmp_path):
    """An AVI with B-frames (its packets mislabel the frames) of 12 s: the careful reader decodes
    frames for their times only as far as the clip needs, and picks the frames decoding the whole
    file picks."""
    from cogtune.data.video import REORDER_DEPTH, Span, resample_indices

    path = write_clip(tmp_path / "bframes.avi", count=300, fps=25, options={"bf": "2"})
    clip = read(path, fps=8, frames=9)
    assert clip.decoder == "pyav"
    careful = PyAVVideo(path, Span(8, largest=lambda height, width: (9, 32, 32)), from_packets=False)
    whole = PyAVVideo(path, from_packets=False)
    assert len(whole.frame_times) == 300 and len(careful.frame_times) <= 9 * 25 / 8 + 2 * REORDER_DEPTH + 8
    assert careful.frame_times == whole.frame_times[:len(careful.frame_times)]
    assert clip.frame_indices == resample_indices(whole.frame_times, 8, 0, 0, 9)[:9] == [0, 3, 6, 9, 13, 16, 19, 22, 25]
    assert np.array_equal(careful.frames(clip.frame_indices), whole.frames(clip.frame_indices))


def test_packets_that_do_not_match_the_frames_send_pyav_back_to_decoding_every_frame(tmp_path):
    """In an AVI with B-frames FFmpeg labels frames in decode order: the packet path notices the
    first frame whose time is not its packet's and gives way to the careful one."""
    from cogtune.data.video.container import _Fallback

    path = write_clip(tmp_path / "bframes.avi", count=30, fps=25, options={"bf": "2"})
    with pytest.raises(_Fallback, match="not at the time its packet said"):
        PyAVVideo(path).frames([0, 5])
    assert PyAVVideo(path, from_packets=False).frames([0, 5]).shape == (2, 64, 96, 3)


def test_frames_an_edit_list_hides_are_not_read(tmp_path):
    """Four lead-in frames hidden by the MP4 edit list (25 encoded, 21 shown): the clip holds the
    21 frames players show, starting with the pattern's frame 4, and no frame twice. (decord counts
    25, shifts their times below 0 and repeats the last frame to fill them.)"""
    import av

    from clips import write_clip_with_lead_in

    path = write_clip_with_lead_in(tmp_path / "cut.mp4", hidden=4, count=25)
    clip = read(path, fps=24, frames=49, height=64, width=96)
    assert clip.decoder == "pyav" and clip.frame_indices == list(range(21))
    with av.open(str(path)) as container:  # FFmpeg applies the edit list, as players do
        shown = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(shown) == 21 and abs(int(shown[0][40, 60, 2]) - 40) < 8  # the pattern's frame 4
    frames = (clip.pixels.permute(1, 2, 3, 0).numpy() + 1) * 127.5
    assert all(np.abs(ours - theirs).mean() < 1.0 for ours, theirs in zip(frames, shown))
    blue = frames[:, 40, 60, 2]
    assert np.all(np.diff(blue) > 2)  # every frame a new one


@pytest.mark.parametrize("matrix, shown", [
    ((-1, 0, 0, 1), "mirrored"),  # a selfie clip: mirrored left to right
    ((0, 1, 1, 0), "transposed"),  # a quarter turn and a mirror: rows become columns, in place
])
def test_a_mirroring_display_matrix_is_applied_whole(tmp_path, matrix, shown):
    """Players show a pixel at (x, y) at (a x + c y, b x + d y): a mirror stays a mirror, not the
    rotation FFmpeg reports for it (180 degrees for a left-right mirror). decord, which applies only
    the rotation, is not used for such files."""
    from clips import set_mp4_matrix

    path = write_clip(tmp_path / "selfie.mp4", height=64, width=96, codec="libx264", options={"crf": "0"})
    set_mp4_matrix(path, *matrix)
    stored = pattern(1, 64, 96)[0]
    expected = stored[:, ::-1] if shown == "mirrored" else stored.transpose(1, 0, 2)
    height, width = expected.shape[:2]
    clip = read(path, height=height, width=width)
    assert clip.decoder == "pyav" and (clip.source_height, clip.source_width) == (height, width)
    first = (clip.pixels[:, 0].permute(1, 2, 0).numpy() + 1) * 127.5
    assert np.abs(first - expected).mean() < 3
    if shown == "mirrored":
        assert np.abs(first - stored[::-1, ::-1]).mean() > 30  # not turned 180 degrees


def test_a_gap_in_a_transport_stream_keeps_real_time(tmp_path):
    """An MPEG-TS with half a second missing after frame 11 (a recording that dropped out): every
    training frame is the source frame nearest its time k / 8 s, so the gap is bridged by the frames
    beside it and motion stays at real speed."""
    times = [i * 0.04 for i in range(12)] + [0.94 + k * 0.04 for k in range(12)]
    path = write_clip(tmp_path / "gap.ts", count=24, times=times, container_format="mpegts")
    clip = read(path, fps=8, frames=9)
    nearest = [min(range(24), key=lambda i: (abs(times[i] - k / 8), -i)) for k in range(9)]  # ties: the later
    assert clip.decoder == "pyav" and clip.frame_indices == nearest == [0, 3, 6, 9, 11, 11, 12, 12, 14]


def test_side_data_and_headers_pyav_does_not_know_are_not_reasons_to_skip(monkeypatch, tmp_path):
    """MV-HEVC frames carry side data of a type PyAV has no name for ("29 is not a valid Type"), and a
    Dolby Vision AV1 stream has no height in PyAV: such a clip is read where its frames can be."""
    import av

    from cogtune.data.video import container, geometry

    class Unknown:
        def get(self, kind):
            raise ValueError("29 is not a valid Type")

    class Frame:
        side_data = Unknown()

        @property
        def rotation(self):
            raise ValueError("29 is not a valid Type")

    assert geometry._display_matrix(Frame()) is None
    assert geometry.Orientation.of(Frame()) == geometry.Orientation()  # shown as stored

    path = write_clip(tmp_path / "clip.mp4", count=24)
    real_open = av.open

    class NoHeight:  # what PyAV hands out for the Dolby Vision AV1 stream
        def __init__(self, stream):
            self._stream = stream

        def __getattr__(self, name):
            if name == "height":
                raise AttributeError("'VideoStream' object has no attribute 'height'")
            return getattr(self._stream, name)

    def opened(*args, **kwargs):
        container = real_open(*args, **kwargs)
        streams = container.streams
        monkeypatch.setattr(type(container), "streams", property(lambda self: type("S", (), {
            "video": [NoHeight(streams.video[0])]})()), raising=False)
        return container

    monkeypatch.setattr(container.av, "open", opened)
    assert container._header(path) is None  # no header: the decoders find out what can be read
    monkeypatch.undo()
    clip = read(path, fps=24, frames=9)
    assert clip.pixels.shape[1] == 9
