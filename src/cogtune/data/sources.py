"""Dataset formats -> a list of (video path, caption) records.

The two formats of the diffusers CogVideoX scripts, and two more:
- `prompts.txt` + `videos.txt` under --instance_data_root (one line each, paths relative to it);
- a metadata file (CSV, JSON, JSONL or Parquet) given by --dataset_name, with --caption_column and
  --video_column; video paths relative to --instance_data_root (or to the file's folder);
- a folder of `clip.mp4` + `clip.txt` pairs (--instance_data_root without prompts.txt/videos.txt);
- a hub dataset id as --dataset_name, read with `datasets.load_dataset` (the `hub` extra), its
  video paths relative to --instance_data_root.
"""

from __future__ import annotations

import io
import json
import os
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cogtune.errors import CogtuneError, first_line
from cogtune.util import logs
from cogtune.util.hub import looks_like_hub_id

METADATA_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class Record:
    video: Path | str  # absolute; a str as written (inside root) until resolve_record follows its symlinks
    caption: str  # with the id_token already in front
    where: str  # for error messages: file and line or row
    root: Path | None = field(default=None, compare=False)  # the data root, while `video` is not yet resolved
    clip_settings: str = ""  # its [[datasets]] table's own clip settings (CLIP_KEYS) as JSON; "": the top-level ones


def with_id_token(caption: str, id_token: str | None) -> str:
    """The reference glues the token to the prompt; we put a space between them."""
    caption = caption.strip()
    if id_token:
        return f"{id_token.strip()} {caption}"
    return caption


def load_records(instance_data_root: str | None, dataset_name: str | None, caption_column: str,
                 video_column: str, id_token: str | None, dataset_config_name: str | None = None,
                 cache_dir: str | None = None, allow_symlinks_outside_root: bool = False,
                 resolve: bool = True) -> list[Record]:
    """The dataset's records. resolve=False: the video paths as written (checked to stay inside the
    data root, but not looked at on disk); resolve_record then checks each, which lets the
    processes of a preprocess run each stat only their share of a large dataset."""
    if dataset_name and not Path(dataset_name).exists() and _looks_like_hub_id(dataset_name):
        if not instance_data_root:
            raise CogtuneError(
                f"--dataset_name {dataset_name} is a hub dataset: give --instance_data_root, the folder its video "
                "paths are relative to (for example the dataset repository downloaded with `hf download`)."
            )
        root = Path(instance_data_root)
        pairs = _read_hub_dataset(dataset_name, dataset_config_name, caption_column, video_column, cache_dir)
    elif dataset_name:
        table_path = _metadata_file(Path(dataset_name))
        root = Path(instance_data_root) if instance_data_root else table_path.parent
        pairs = _read_metadata(table_path, caption_column, video_column)
    else:
        if not instance_data_root:
            raise CogtuneError(
                "Say where the data is: --instance_data_root (with prompts.txt and videos.txt), "
                "or --dataset_name (a metadata file)."
            )
        root = Path(instance_data_root)
        pairs = []
        if root.is_dir() and not (root / caption_column).exists() and not (root / video_column).exists():
            pairs = _caption_file_pairs(root, allow_symlinks_outside_root)  # a folder of clip.mp4 + clip.txt
        if not pairs:
            pairs = _read_line_files(root, caption_column, video_column)
    if not root.is_dir():
        raise CogtuneError(f"--instance_data_root {root} is not a folder.")
    records = []
    resolved_root = root.resolve()
    top = str(resolved_root)
    for caption, video, where in pairs:
        if caption is None or not str(caption).strip():
            raise CogtuneError(f"{where}: the caption is empty. Write a caption or remove the row.")
        if video is None or not str(video).strip():
            raise CogtuneError(f"{where}: the video path is empty.")
        written = _written_path(top, str(video).strip(), where)
        records.append(Record(written, with_id_token(str(caption), id_token), where, resolved_root))
    if not records:
        raise CogtuneError("The dataset has no rows.")
    if resolve:
        records = [resolve_record(record, allow_symlinks_outside_root) for record in records]
    return records


def _written_path(root: str, relative: str, where: str) -> str:
    """The video's path as written, inside the (resolved) data root: no .. out of it. (Strings,
    not pathlib, in this loop: it runs once per record, a million times for a large dataset.)"""
    if relative.startswith("/") or relative.endswith("/") or "//" in relative or "/." in "/" + relative:
        written = os.path.normpath(os.path.join(root, relative))  # absolute paths stay themselves
    else:
        written = root.rstrip("/") + "/" + relative  # (already normal: no ., .., // or leading /)
    if written != root and not written.startswith(root.rstrip(os.sep) + os.sep):
        raise CogtuneError(
            f"{where}: video path {relative!r} points outside the data root {root}. "
            "Paths must stay inside --instance_data_root."
        )
    return written


class VideoPaths:
    """Resolves records' video paths: follows symlinks, checks the file exists and (unless
    allowed) lies inside the data root, and returns its stat. One lstat per file: the real path of
    each folder is looked up once, not once per file in it."""

    def __init__(self, allow_symlinks_outside_root: bool = False):
        self.allow_symlinks_outside_root = allow_symlinks_outside_root
        self._folders: dict[str, str] = {}
        self._roots: dict[Path, str] = {}  # root -> its path with a trailing separator

    def resolve(self, record: Record) -> tuple[str, os.stat_result]:
        written = str(record.video)
        if record.root is None:  # resolved already
            return written, os.stat(written)
        folder, _, name = written.rpartition("/")
        real_folder = self._folders.get(folder)
        if real_folder is None:
            real_folder = self._folders[folder] = os.path.realpath(folder or "/")
        path = real_folder + "/" + name if real_folder != "/" else "/" + name
        try:
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                path = os.path.realpath(path)
                info = os.stat(path)
        except FileNotFoundError:
            info = None
        inside = self._roots.get(record.root)
        if inside is None:
            inside = self._roots[record.root] = str(record.root).rstrip("/") + "/"
        if not path.startswith(inside) and not self.allow_symlinks_outside_root:
            raise CogtuneError(
                f"{record.where}: video path {os.path.relpath(written, record.root)!r} is a symlink to {path}, "
                f"outside the data root {record.root}. Pass --allow_symlinks_outside_root if that is intended."
            )
        if info is None:
            raise CogtuneError(f"{record.where}: video file {written} does not exist.")
        if not stat.S_ISREG(info.st_mode):
            raise CogtuneError(f"{record.where}: video path {written} is {_file_kind(info.st_mode)}, not a video file. "
                               "Fix the dataset row or remove it.")
        return path, info


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def resolve_record(record: Record, allow_symlinks_outside_root: bool = False) -> Record:
    """The record with its video path's symlinks followed: an existing file, inside the data root
    unless allowed."""
    if record.root is None:
        return record
    path, _ = VideoPaths(allow_symlinks_outside_root).resolve(record)
    return replace(record, video=Path(path), root=None)


VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _caption_file_pairs(root: Path, allow_symlinks_outside_root: bool = False) -> list[tuple[str, str, str]]:
    """A folder of clip.mp4 + clip.txt pairs (in subfolders too): the caption is the text file's
    content. A caption file that is a symlink out of the root is refused as a video would be: its
    target's text would end up in the cache and in every embedding of it."""
    pairs = []
    real_root = root.resolve()
    for video in sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()):
        caption_path = video.with_suffix(".txt")
        relative = str(video.relative_to(root))
        if not caption_path.is_file():
            raise CogtuneError(f"{video} has no caption file {caption_path.name} beside it; write one or remove the video.")
        target = caption_path.resolve()
        if not target.is_relative_to(real_root) and not allow_symlinks_outside_root:
            raise CogtuneError(f"{caption_path} is a symlink to {target}, outside the data root {real_root}. Pass "
                               "--allow_symlinks_outside_root if that is intended.")
        caption = " ".join(line.strip() for line in _lines(caption_path)).strip()
        pairs.append((caption, relative, str(caption_path.relative_to(root))))
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.with_suffix(".txt").is_file())
    if images:  # musubi-tuner and finetrainers train these as one-frame samples; cogtune trains clips: say so
        names = ", ".join(str(p.relative_to(root)) for p in images[:5]) + (", ..." if len(images) > 5 else "")
        logs.message(f"note: {len(images)} image+caption pair(s) in {root} are skipped (cogtune trains on videos; "
                     f"a still image is no clip): {names}")
    return pairs


def _looks_like_hub_id(name: str) -> bool:
    return looks_like_hub_id(name) and Path(name).suffix.lower() not in METADATA_SUFFIXES


def _read_hub_dataset(name: str, config_name: str | None, caption_column: str, video_column: str,
                      cache_dir: str | None) -> list[tuple[str, str, str]]:
    try:
        import datasets
    except ImportError:
        raise CogtuneError(
            f"--dataset_name {name} is not a local file or folder, and reading hub datasets needs the datasets "
            "package: pip install 'cogtune[hub]' (or datasets)."
        ) from None
    try:
        table = datasets.load_dataset(name, config_name, split="train", cache_dir=cache_dir)
    except Exception as e:  # datasets raises many types: missing dataset, no network, bad config
        raise CogtuneError(f"Cannot load the hub dataset {name}: {first_line(e)}") from None
    _require_columns(table.column_names, caption_column, video_column, f"Hub dataset {name}")
    return [(_unquote(c), _unquote(v), f"{name} row {i + 1}")
            for i, (c, v) in enumerate(zip(table[caption_column], table[video_column]))]


def _read_line_files(root: Path, caption_file: str, video_file: str) -> list[tuple[str, str, str]]:
    prompts_path, videos_path = root / caption_file, root / video_file
    for path, flag in ((prompts_path, "--caption_column"), (videos_path, "--video_column")):
        if not path.is_file():
            raise CogtuneError(
                f"{path} does not exist. With --instance_data_root, {flag} names a file in it "
                "(prompts.txt / videos.txt); for a metadata file use --dataset_name."
            )
    prompts = _lines(prompts_path)
    videos = _lines(videos_path)
    if len(prompts) != len(videos):
        raise CogtuneError(
            f"{prompts_path} has {len(prompts)} prompts but {videos_path} has {len(videos)} videos; "
            "they must have one line each per clip."
        )
    return [(p, v, f"{prompts_path.name}/{videos_path.name} line {i + 1}") for i, (p, v) in enumerate(zip(prompts, videos))]


def decoded_text(path: Path, what: str = "") -> str:
    """A text input (captions, prompts, a metadata or validation file) decoded the one way every text
    input is: UTF-8, a byte-order mark removed; else a clear error naming the file and the line."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise CogtuneError(f"{(what + ' ') if what else ''}{path}, line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}). "
                           "Save it as UTF-8 (a spreadsheet's 'CSV UTF-8', or `iconv -f latin1 -t utf-8`).") from None
    return text.removeprefix("\ufeff")


def _lines(path: Path) -> list[str]:
    lines = decoded_text(path).splitlines()
    while lines and not lines[-1].strip():  # a trailing blank line is not a record
        lines.pop()
    return lines


def _metadata_file(path: Path) -> Path:
    if path.is_dir():
        for suffix in METADATA_SUFFIXES:
            if (path / f"metadata{suffix}").is_file():
                return path / f"metadata{suffix}"
        raise CogtuneError(f"--dataset_name {path} is a folder without metadata.csv/.jsonl/.json/.parquet.")
    if path.is_file():
        if path.suffix.lower() not in METADATA_SUFFIXES:
            raise CogtuneError(f"--dataset_name {path}: use a .csv, .json, .jsonl or .parquet metadata file.")
        return path
    raise CogtuneError(f"--dataset_name {path} does not exist (give a metadata file, a folder or a hub dataset id).")


def _read_metadata(path: Path, caption_column: str, video_column: str) -> list[tuple[str, str, str]]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            import pyarrow.csv as pacsv  # (read where used: training imports this module and reads no CSV)

            table = pacsv.read_csv(io.BytesIO(decoded_text(path).encode()),
                                   convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
        elif suffix == ".parquet":
            table = pq.read_table(path)
        elif suffix == ".jsonl":
            import pyarrow.json as pajson

            table = pajson.read_json(io.BytesIO(decoded_text(path).encode()))
        else:
            data = json.loads(decoded_text(path))
            if isinstance(data, dict):  # {"column": [...]} layout
                data = [dict(zip(data, values)) for values in zip(*data.values())]
            table = pa.Table.from_pylist(data)
    except (pa.ArrowInvalid, json.JSONDecodeError, UnicodeDecodeError, TypeError, AttributeError) as e:
        raise CogtuneError(f"Cannot read metadata file {path}: {e}") from None
    _require_columns(table.column_names, caption_column, video_column, str(path))
    for column in (caption_column, video_column):
        if pa.types.is_binary(table.schema.field(column).type) or pa.types.is_large_binary(table.schema.field(column).type):
            raise CogtuneError(f"{path}: column {column!r} holds bytes, not text; write it as UTF-8 strings.")
    captions = [_unquote(c) for c in table.column(caption_column).to_pylist()]
    videos = [_unquote(v) for v in table.column(video_column).to_pylist()]
    return [(c, v, f"{path.name} row {i + 1}") for i, (c, v) in enumerate(zip(captions, videos))]


def _require_columns(columns: list[str], caption_column: str, video_column: str, source: str) -> None:
    for column, flag in ((caption_column, "--caption_column"), (video_column, "--video_column")):
        if column not in columns:
            raise CogtuneError(f"{source} has no column {column!r} ({flag}); its columns are: {', '.join(columns)}.")


def _unquote(value):
    """The seed README writes CSV cells in tripled quotes, which CSV reads as "text": drop those quotes."""
    if isinstance(value, str):
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
    return value


DATASET_KEYS = ("instance_data_root", "dataset_name", "dataset_config_name", "caption_column", "video_column",
                "id_token")
# Clip settings a [[datasets]] table may give for its own clips (musubi-tuner's per-dataset resolution,
# frames and extraction): its clips are cut and encoded with them, keyed apart from the same video's
# clips at the top-level settings.
CLIP_KEYS = ("height", "width", "max_num_frames", "frame_extraction", "frame_stride", "frame_sample",
             "max_windows_per_clip")


def clip_settings_of(table: dict, config) -> str:
    """A dataset table's clip settings that differ from the top-level ones, as sorted JSON ("" for none)."""
    own = {key: table[key] for key in CLIP_KEYS if key in table and table[key] != getattr(config, key)}
    return json.dumps(own, sort_keys=True) if own else ""


def clip_config(config, clip_settings: str):
    """The preprocess settings a record's clips are cut with: the top-level ones, with its dataset's own
    (and no [[datasets]] of their own: they describe that one dataset's clips)."""
    return replace(config, **json.loads(clip_settings), datasets=[]) if clip_settings else config


def dataset_clip_configs(config) -> list:
    """The preprocess settings of each dataset's clips (the top-level ones when it gives none)."""
    return [clip_config(config, clip_settings_of(table, config)) for table in dataset_tables(config)]


def dataset_tables(config) -> list[dict]:
    """The datasets of a preprocess config: each [[datasets]] table, with the top-level value of every
    dataset key it leaves out and its repeats (default 1); without tables, the top-level dataset."""
    tables = config.datasets or [{}]
    return [{**{key: getattr(config, key) for key in DATASET_KEYS}, "repeats": 1, **table} for table in tables]


def load_dataset_records(config, resolve: bool = False) -> tuple[list[Record], list[int]]:
    """Every dataset's records, in order, and the repeats of each record's dataset."""
    records, repeats = [], []
    for number, table in enumerate(dataset_tables(config), start=1):
        try:
            found = load_records(*(table[key] for key in ("instance_data_root", "dataset_name", "caption_column",
                                                           "video_column", "id_token", "dataset_config_name")),
                                 config.cache_dir, resolve=resolve)
        except CogtuneError as e:
            if not config.datasets:
                raise
            raise CogtuneError(f"[[datasets]] table {number} ({table['instance_data_root'] or table['dataset_name']}): "
                               f"{e}") from None
        settings = clip_settings_of(table, config)
        records += [replace(record, clip_settings=settings) for record in found] if settings else found
        repeats += [table["repeats"]] * len(found)
    return records, repeats


def read_rows(path: Path, flag: str) -> list[dict]:
    """The rows of a .csv or .jsonl file (a prompt file, a validation file), as dicts."""
    if not path.is_file():
        raise CogtuneError(f"{flag} {path} does not exist.")
    if path.suffix.lower() not in (".csv", ".jsonl"):
        raise CogtuneError(f"{flag} {path} is neither a .csv nor a .jsonl file.")
    data = io.BytesIO(decoded_text(path, flag).encode())
    try:
        import pyarrow.csv as pacsv
        import pyarrow.json as pajson

        table = pacsv.read_csv(data) if path.suffix.lower() == ".csv" else pajson.read_json(data)
    except Exception as e:  # pyarrow's parse errors
        raise CogtuneError(f"{flag} {path} cannot be read: {first_line(e)}") from None
    if "prompt" not in table.column_names:
        raise CogtuneError(f"{flag} {path} has no 'prompt' column (columns: {', '.join(table.column_names)}).")
    return table.to_pylist()
