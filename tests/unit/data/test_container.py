"""What a file's first bytes say: certainly not a video, or maybe one."""

import pytest

from cogtune.data.video import not_a_video


@pytest.mark.parametrize("head, reason", [
    (b"", "empty"), (b"\x89PNG\r\n\x1a\n" + bytes(100), "PNG"), (b"\xff\xd8\xff\xe0" + bytes(100), "JPEG"),
    (b"RIFF\x00\x00\x00\x00WAVEfmt ", "RIFF"), (b"a caption\nanother\n", "text"),
    ("un chat noir é".encode() * 400, "text"), (b"%PDF-1.7", "PDF")])
def test_files_that_are_certainly_not_videos_say_what_they_are(tmp_path, head, reason):
    path = tmp_path / "x"
    path.write_bytes(head)
    assert reason in not_a_video(path)


@pytest.mark.parametrize("head", [b"\x00\x00\x00\x18ftypmp42" + bytes(64), b"RIFF\x00\x00\x00\x00AVI LIST",
                                  b"\x1aE\xdf\xa3" + bytes(60)])
def test_video_containers_may_be_videos(tmp_path, head):
    path = tmp_path / "x"
    path.write_bytes(head)
    assert not_a_video(path) is None
