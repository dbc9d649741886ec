import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cogtune.data.sources import VideoPaths, load_records, with_id_token
from cogtune.errors import CogtuneError


def make_videos(root, names):
    (root / "videos").mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / "videos" / name).write_bytes(b"x")


def test_id_token_is_followed_by_a_space():
    assert with_id_token("  a cat runs ", "BW_STYLE") == "BW_STYLE a cat runs"
    assert with_id_token("a cat runs", None) == "a cat runs"


def test_prompts_and_videos_txt(tmp_path):
    make_videos(tmp_path, ["a.mp4", "b.mp4"])
    (tmp_path / "prompts.txt").write_text("first caption\nsecond ünïcödé caption 猫\n\n")
    (tmp_path / "videos.txt").write_text("videos/a.mp4\nvideos/b.mp4\n")
    records = load_records(str(tmp_path), None, "prompts.txt", "videos.txt", "TOK")
    assert [r.caption for r in records] == ["TOK first caption", "TOK second ünïcödé caption 猫"]
    assert [r.video for r in records] == [(tmp_path / "videos" / n).resolve() for n in ("a.mp4", "b.mp4")]


def test_line_count_mismatch_is_refused(tmp_path):
    make_videos(tmp_path, ["a.mp4"])
    (tmp_path / "prompts.txt").write_text("one\ntwo\n")
    (tmp_path / "videos.txt").write_text("videos/a.mp4\n")
    with pytest.raises(CogtuneError, match="2 prompts but .* 1 videos"):
        load_records(str(tmp_path), None, "prompts.txt", "videos.txt", None)


@pytest.mark.parametrize("relative", ["../outside.mp4", "/etc/passwd"])
def test_paths_outside_the_root_are_refused(tmp_path, relative):
    root = tmp_path / "root"
    make_videos(root, ["a.mp4"])
    (tmp_path / "outside.mp4").write_bytes(b"x")
    (root / "prompts.txt").write_text("a caption\n")
    (root / "videos.txt").write_text(relative + "\n")
    with pytest.raises(CogtuneError, match="outside the data root"):
        load_records(str(root), None, "prompts.txt", "videos.txt", None)


def _pathlib_answer(root, relative, allow):
    """What pathlib says of a video path (the independent computation): its resolved path, or why not."""
    root = root.resolve()
    written = Path(os.path.normpath(root / relative))
    if not written.is_relative_to(root):
        return "outside"
    path = written.resolve()
    if not path.is_relative_to(root) and not allow:
        return "symlink out"
    return str(path) if path.is_file() else "missing"


@pytest.mark.parametrize("allow", [False, True])
def test_video_paths_resolve_as_pathlib_does(tmp_path, allow):
    """The one-lstat-per-file resolver (each rank resolves its share of a large dataset) gives what
    Path.resolve gives, on a tree of file and folder symlinks, inside and out, dangling ones, ., ..,
    doubled slashes and hidden names."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    for folder in (root / "a" / "deep", root / "b", outside):
        folder.mkdir(parents=True)
    for name in ("a/x.mp4", "a/.hidden.mp4", "a/deep/y.mp4", "b/z.mp4"):
        (root / name).write_bytes(b"x")
    (outside / "o.mp4").write_bytes(b"x")
    (root / "a" / "link.mp4").symlink_to(root / "b" / "z.mp4")  # a file link inside
    (root / "a" / "chain.mp4").symlink_to("link.mp4")  # a relative link to a link
    (root / "a" / "out.mp4").symlink_to(outside / "o.mp4")  # a file link out
    (root / "a" / "dangling.mp4").symlink_to(root / "nothing.mp4")
    (root / "c").symlink_to(root / "a")  # a folder link inside
    (root / "d").symlink_to(outside)  # a folder link out
    relatives = ["a/x.mp4", "a/.hidden.mp4", "./a/x.mp4", "a//deep/y.mp4", "a/deep/../x.mp4", "a/link.mp4",
                 "a/chain.mp4", "a/out.mp4", "a/dangling.mp4", "c/x.mp4", "c/link.mp4", "c/deep/y.mp4", "d/o.mp4",
                 "a/missing.mp4", "a/deep", "../outside/o.mp4", str(outside / "o.mp4"), str(root / "b/z.mp4")]
    videos = VideoPaths(allow)
    for relative in relatives:
        expected = _pathlib_answer(root, relative, allow)
        try:
            (record,) = _one_record(root, relative)
            answer, info = videos.resolve(record)
            assert info.st_size == 1
        except CogtuneError as e:
            answer = ("outside" if "points outside" in str(e) else "symlink out" if "is a symlink" in str(e)
                      else "missing" if "does not exist" in str(e) or "not a video file" in str(e) else str(e))
        assert answer == expected, relative


def _one_record(root, relative):
    (root / "prompts.txt").write_text("a caption\n")
    (root / "videos.txt").write_text(relative + "\n")
    return load_records(str(root), None, "prompts.txt", "videos.txt", None, resolve=False)


def test_missing_video_names_the_line(tmp_path):
    make_videos(tmp_path, [])
    (tmp_path / "prompts.txt").write_text("a caption\n")
    (tmp_path / "videos.txt").write_text("videos/missing.mp4\n")
    with pytest.raises(CogtuneError, match="line 1: video file .*missing.mp4 does not exist"):
        load_records(str(tmp_path), None, "prompts.txt", "videos.txt", None)


def write_metadata(path, rows):
    suffix = path.suffix
    if suffix == ".csv":
        lines = ["text,file"] + [f'"{c}",{v}' for c, v in rows]
        path.write_text("\n".join(lines) + "\n")
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": c, "file": v}) + "\n" for c, v in rows))
    elif suffix == ".json":
        path.write_text(json.dumps([{"text": c, "file": v} for c, v in rows]))
    else:
        pq.write_table(pa.table({"text": [c for c, _ in rows], "file": [v for _, v in rows]}), path)


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl", ".parquet"])
def test_metadata_files(tmp_path, suffix):
    make_videos(tmp_path, ["a.mp4", "b.mp4"])
    rows = [("a caption, with a comma", "videos/a.mp4"), ("日本語のキャプション", "videos/b.mp4")]
    write_metadata(tmp_path / f"metadata{suffix}", rows)
    records = load_records(str(tmp_path), str(tmp_path / f"metadata{suffix}"), "text", "file", "ID")
    assert [r.caption for r in records] == ["ID a caption, with a comma", "ID 日本語のキャプション"]
    assert records[1].video == (tmp_path / "videos" / "b.mp4").resolve()
    # A folder holding the metadata file works too.
    assert load_records(str(tmp_path), str(tmp_path), "text", "file", "ID") == records


def test_seed_readme_csv_with_tripled_quotes(tmp_path):
    make_videos(tmp_path, ["00000.mp4"])
    (tmp_path / "metadata.csv").write_text('caption,video\n"""A rabbit, dancing.""","""videos/00000.mp4"""\n')
    (record,) = load_records(str(tmp_path), str(tmp_path / "metadata.csv"), "caption", "video", None)
    assert record.caption == "A rabbit, dancing."


def test_missing_column_lists_the_columns(tmp_path):
    make_videos(tmp_path, ["a.mp4"])
    write_metadata(tmp_path / "metadata.csv", [("x", "videos/a.mp4")])
    with pytest.raises(CogtuneError, match="no column 'caption' .*columns are: text, file"):
        load_records(str(tmp_path), str(tmp_path / "metadata.csv"), "caption", "file", None)


def test_empty_caption_names_its_row(tmp_path):
    make_videos(tmp_path, ["a.mp4", "b.mp4"])
    write_metadata(tmp_path / "metadata.jsonl", [("fine", "videos/a.mp4"), ("  ", "videos/b.mp4")])
    with pytest.raises(CogtuneError, match="row 2: the caption is empty"):
        load_records(str(tmp_path), str(tmp_path / "metadata.jsonl"), "text", "file", None)


def test_folder_of_clip_and_caption_file_pairs(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.mp4", "sub/b.webm"):
        (tmp_path / name).write_bytes(b"video")
    (tmp_path / "a.txt").write_text("  a caption with ünïcödé 🎬 \n")
    (tmp_path / "sub" / "b.txt").write_text("line one\nline two\n")
    records = load_records(str(tmp_path), None, "prompts.txt", "videos.txt", "TOK")
    assert [(r.video.name, r.caption) for r in records] == [("a.mp4", "TOK a caption with ünïcödé 🎬"),
                                                           ("b.webm", "TOK line one line two")]
    (tmp_path / "a.txt").write_text("   \n")
    with pytest.raises(CogtuneError, match="a.txt: the caption is empty"):
        load_records(str(tmp_path), None, "prompts.txt", "videos.txt", None)
    (tmp_path / "a.txt").unlink()
    with pytest.raises(CogtuneError, match="has no caption file a.txt"):
        load_records(str(tmp_path), None, "prompts.txt", "videos.txt", None)


def test_hub_dataset_through_datasets(tmp_path):
    """A dataset id that is not a local path goes to datasets.load_dataset; without the package the
    error says how to get it."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(CogtuneError, match="pip install 'cogtune\\[hub\\]'"):
            load_records(str(tmp_path), "someone/videos", "caption", "video", None)
        return
    (tmp_path / "clip.mp4").write_bytes(b"video")
    with pytest.raises(CogtuneError, match="Cannot load the hub dataset someone/no-such-dataset"):
        load_records(str(tmp_path), "someone/no-such-dataset", "caption", "video", None)


def test_text_inputs_are_utf8_or_refused_naming_the_file_and_line(tmp_path):
    """A Latin-1 metadata file, caption or validation file is refused with its line (it was stored as a
    bytes repr, "b'a cat \\xe9'"); a UTF-8 byte-order mark is no part of the first caption."""
    from cogtune.data.validation import read_validation_file
    from cogtune.data.sources import load_records

    root = tmp_path / "data"
    root.mkdir()
    (root / "a.mp4").write_bytes(b"x")
    (root / "b.mp4").write_bytes(b"x")
    (root / "prompts.txt").write_bytes("\ufeffa cat\na dog\n".encode())
    (root / "videos.txt").write_text("a.mp4\nb.mp4\n")
    records = load_records(str(root), None, "prompts.txt", "videos.txt", None)
    assert [r.caption for r in records] == ["a cat", "a dog"]
    (root / "metadata.csv").write_bytes("caption,video\na dog,a.mp4\na caf\xe9,b.mp4\n".encode("latin-1"))
    with pytest.raises(CogtuneError, match=r"metadata.csv, line 3: not UTF-8 text \(byte 0xe9\)"):
        load_records(str(root), str(root / "metadata.csv"), "caption", "video", None)
    (root / "metadata.csv").write_bytes("\ufeffcaption,video\na caf\xe9,b.mp4\n".encode())
    (row,) = load_records(str(root), str(root / "metadata.csv"), "caption", "video", None)
    assert row.caption == "a caf\xe9"
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "c.mp4").write_bytes(b"x")
    (folder / "c.txt").write_bytes("un caf\xe9".encode("latin-1"))
    with pytest.raises(CogtuneError, match=r"c.txt, line 1: not UTF-8 text"):
        load_records(str(folder), None, "prompts.txt", "videos.txt", None)
    validation = tmp_path / "v.jsonl"
    validation.write_bytes('{"prompt": "a caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(CogtuneError, match=r"--validation_file .*v.jsonl, line 1: not UTF-8 text"):
        read_validation_file(validation)


@pytest.mark.parametrize("row, says", [('{"prompt": "x", "seed": 18446744073709551616}', "seed 18446744073709551616 is out of range"),
                                       ('{"prompt": "x", "guidance_scale": "nan"}', "guidance_scale must be a finite number")])
def test_a_validation_rows_numbers_are_checked_where_the_file_is_read(tmp_path, row, says):
    from cogtune.data.validation import read_validation_file

    validation = tmp_path / "v.jsonl"
    validation.write_text(row + "\n")
    with pytest.raises(CogtuneError, match=f"line 1: {says}"):
        read_validation_file(validation)
