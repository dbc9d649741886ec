"""Caches that survive kill -9, SIGTERM and full disks; `cogtune cache inspect | verify | prune`."""

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cogtune import data_schema as schema
from cogtune.cache.disk import PartVanished, index_parts, read_index, read_part_table, read_selection
from cogtune.cache.reader import Cache
from cogtune.cache.writer import MAX_INDEX_PARTS, cache_lock, compact_index, write_index_part, write_selection
from cogtune.dev.tiny import synthetic_frames
from cogtune.util.media import write_mp4

from conftest import cache_path_of, cogtune_here, write_config


def write_dataset(root: Path, count: int, height: int = 48, width: int = 64) -> Path:
    """count clips of distinct content, captioned, in the prompts.txt + videos.txt format."""
    (root / "videos").mkdir(parents=True)
    prompts, videos = [], []
    for i in range(count):
        color = (40 + 25 * i, 200 - 20 * i, 60 + 15 * i)
        write_mp4(root / f"videos/{i:03d}.mp4", synthetic_frames(20, height, width, color, 1 - 2 * (i % 2)), 16)
        prompts.append(f"clip number {i} of a moving square")
        videos.append(f"videos/{i:03d}.mp4")
    (root / "prompts.txt").write_text("\n".join(prompts) + "\n")
    (root / "videos.txt").write_text("\n".join(videos) + "\n")
    return root


def start(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cogtune.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for(condition, process: subprocess.Popen, timeout: float = 120.0) -> bool:
    """Poll until condition() holds; False if the process ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.01)
    raise AssertionError("timed out")


def files_in(folder: Path, pattern: str = "*") -> list[Path]:
    return sorted(folder.glob(pattern)) if folder.is_dir() else []


def caches_in(cache_root: Path) -> list[Path]:
    """The cache folders under a --cache_root (not its hidden record of the latest preprocess runs)."""
    return [path for path in files_in(cache_root) if not path.name.startswith(".")]


def snapshot(folder: Path) -> dict:
    """Every file under folder with its size and mtime: to prove nothing was touched."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file() and p.name != schema.LOCK_FILE}



def assert_every_visible_file_is_whole(cache_dir: Path) -> None:
    for shard in files_in(cache_dir / schema.SHARDS_DIR, "*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    for part in files_in(cache_dir / schema.INDEX_DIR, "*.parquet"):
        pq.read_table(part)


def raw_ok_rows(cache_dir: Path) -> list[str]:
    """Sample ids of the ok rows in every index part, duplicates included."""
    return [row["sample_id"] for part in files_in(cache_dir / schema.INDEX_DIR, "*.parquet")
            for row in pq.read_table(part).to_pylist() if row["status"] == schema.STATUS_OK]


@pytest.fixture(scope="module")
def eight_clips(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("eight"), 8)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model, eight_clips):
    """A finished cache of the eight clips (copy it before changing it)."""
    root = tmp_path_factory.mktemp("built")
    config = write_config(root / "c.toml", tiny_model, eight_clips, root / "cache", root / "out", height=32, width=48)
    return dict(config=config, cache=cache_path_of(cogtune_here("preprocess", "--config", config).stdout))


def copy_cache(built, tmp_path) -> Path:
    return Path(shutil.copytree(built["cache"], tmp_path / "cache" / built["cache"].name))


# --- kill -9, SIGTERM and a full disk during preprocess -----------------------------------------


def test_kill_9_or_sigterm_at_any_moment_then_rerun_gives_every_clip_exactly_once(tmp_path, tiny_model,
                                                                                   eight_clips):
    # a shard per caption and per clip, so that interruptions land between and during many writes
    config = write_config(tmp_path / "c.toml", tiny_model, eight_clips, tmp_path / "cache", tmp_path / "out",
                          height=32, width=48, shard_size_mb=1e-6, vae_batch_size=1)
    shards = lambda: len(files_in(tmp_path / "cache", "*/shards/*"))  # noqa: E731 (temp files count too)
    interrupted = []
    # kill -9 while captions are encoded, SIGTERM and kill -9 while videos are
    for sent, after in ((signal.SIGKILL, 3), (signal.SIGTERM, 10), (signal.SIGKILL, 13)):
        process = start("preprocess", "--config", config)
        if wait_for(lambda: shards() >= after, process):
            process.send_signal(sent)
            interrupted.append(sent)
        _, stderr = process.communicate(timeout=60)
        if sent == signal.SIGTERM and interrupted[-1] == sent:
            assert process.returncode == 75, stderr  # saved what it had and stopped cleanly
            assert "stopped by SIGTERM; everything encoded so far is saved" in stderr
        (cache_dir,) = caches_in(tmp_path / "cache")
        assert_every_visible_file_is_whole(cache_dir)
    assert len(interrupted) >= 2  # the runs were really interrupted
    out = cogtune_here("preprocess", "--config", config).stdout
    assert "samples: 8 ok, 0 skipped" in out
    reused = int(out.split("reused from the cache: ")[1].split(" videos")[0])
    assert reused >= 1  # work of the interrupted runs was kept
    verify = cogtune_here("cache", "verify", cache_dir)
    assert verify.stdout.strip().endswith("ok")
    ok_rows = raw_ok_rows(cache_dir)
    assert len(ok_rows) == len(set(ok_rows)) == 8  # each clip exactly once, even in the raw index parts
    assert len(Cache.open(cache_dir).samples) == 8


def test_disk_full_stops_with_a_clear_error_and_the_cache_resumes(tmp_path, tiny_model, demo_data):
    """A file size limit makes writes of big shards fail as on a full disk; small files still fit."""
    config = write_config(tmp_path / "c.toml", tiny_model, demo_data, tmp_path / "cache", tmp_path / "out",
                          height=96, width=96, fps=16, max_num_frames=17, shard_size_mb=0.0078, vae_batch_size=1)
    limit = 16_000  # caption shards (2 x 4 KiB each) fit, shards of video moments (2 x 11.5 KiB) do not

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    full = subprocess.run([sys.executable, "-m", "cogtune.cli", "preprocess", "--config", str(config)],
                          capture_output=True, text=True, preexec_fn=small_files)
    assert full.returncode == 2, full.stderr
    assert "No space left writing" in full.stderr and ".safetensors" in full.stderr
    assert "run the same command again to continue" in full.stderr and "Traceback" not in full.stderr
    (cache_dir,) = caches_in(tmp_path / "cache")
    assert_every_visible_file_is_whole(cache_dir)
    assert not files_in(cache_dir / schema.SHARDS_DIR, ".*.tmp")  # no temp file left behind
    out = cogtune_here("preprocess", "--config", config).stdout
    assert "encoded: 4 videos, 0 captions" in out  # the captions written before the disk filled were kept
    assert cogtune_here("cache", "verify", cache_dir).stdout.strip().endswith("ok")


# --- cogtune cache inspect | verify | prune -----------------------------------------------------


def test_inspect_shows_samples_buckets_bytes_settings_and_failures(tmp_path, tiny_model, eight_clips):
    data = Path(shutil.copytree(eight_clips, tmp_path / "data"))
    (data / "videos/broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    (data / "prompts.txt").write_text((data / "prompts.txt").read_text() + "a broken clip\n")
    (data / "videos.txt").write_text((data / "videos.txt").read_text() + "videos/broken.mp4\n")
    config = write_config(tmp_path / "c.toml", tiny_model, data, tmp_path / "cache", tmp_path / "out",
                          height=32, width=48)
    cache_dir = cache_path_of(cogtune_here("preprocess", "--config", config).stdout)
    text = cogtune_here("cache", "inspect", cache_dir).stdout
    assert "samples: 8 selected and usable; 8 encoded in all, 1 failed" in text
    assert "buckets: 9x32x48 (8)" in text and "in 1 shards" in text
    assert "height=32" in text and "fps=8" in text and f"format version {schema.FORMAT_VERSION}" in text
    assert "failures: unreadable (1)" in text and f"{data / 'videos/broken.mp4'}: prompts.txt/videos.txt line 9" in text
    listing = cogtune_here("cache", "inspect", tmp_path / "cache").stdout
    assert f"{cache_dir.name}  (9 samples" in listing


def test_verify_names_damaged_samples_and_prune_then_preprocess_repairs(tmp_path, built):
    cache_dir = copy_cache(built, tmp_path)
    rows = Cache.open(cache_dir).samples
    victim = rows[3]
    shard = schema.shard_path(cache_dir, victim.latent_shard)
    tensors, metadata = load_file(shard), safe_open(str(shard), "pt").metadata()
    mean_key = schema.video_tensor_key(victim.latent_key, "mean")
    tensors[mean_key] = tensors[mean_key].clone()
    tensors[mean_key].view(-1)[5] += 1.0  # one changed value, as a bit flip on disk would do
    save_file(tensors, shard, metadata=metadata)

    result = cogtune_here("cache", "verify", cache_dir, check=False)
    assert result.returncode == 1
    assert f"{victim.sample_id} ({victim.source_path}): {mean_key} does not match its checksum" in result.stdout
    assert "damaged: 1 samples" in result.stdout
    assert cogtune_here("cache", "verify", cache_dir, "--no_checksums").returncode == 0  # headers alone look fine

    shard.unlink()  # a lost shard: every sample in it is named
    result = cogtune_here("cache", "verify", cache_dir, check=False)
    users = {r.sample_id for r in rows if r.latent_shard == victim.latent_shard}
    assert result.returncode == 1 and f"damaged: {len(users)} samples" in result.stdout
    assert "is missing" in result.stdout

    pruned = cogtune_here("cache", "prune", "--damaged", cache_dir).stdout
    assert f"{len(users)} damaged samples" in pruned
    out = cogtune_here("preprocess", "--config", built["config"], "--cache_root", tmp_path / "cache").stdout
    assert f"encoded: {len(users)} videos" in out and "samples: 8 ok" in out
    assert cogtune_here("cache", "verify", cache_dir).returncode == 0


def test_prune_removes_failed_entries_unused_shards_and_temp_files(tmp_path, built, eight_clips):
    cache_dir = copy_cache(built, tmp_path)
    shards = files_in(cache_dir / schema.SHARDS_DIR, "*.safetensors")
    orphan = shutil.copy(shards[0], cache_dir / schema.SHARDS_DIR / "w0-orphan.safetensors")
    temp = cache_dir / schema.SHARDS_DIR / ".w0-abc.safetensors.x1y2.tmp"
    temp.write_bytes(b"half a shard")
    failed = schema.failed_row(schema.SampleSource("f" * 32, "/gone.mp4", 1, 1, "0" * 64, "a caption"),
                               "unreadable", "videos.txt line 9: cannot open video")
    write_index_part(cache_dir, "w0-failed", [failed])
    selection = read_selection(cache_dir) + ["f" * 32]
    write_selection(cache_dir, selection)

    dry = cogtune_here("cache", "prune", "--dry_run", cache_dir).stdout
    assert "would remove: 1 failed entries" in dry and "1 unused shards, 1 temp files" in dry
    assert Path(orphan).exists() and temp.exists()
    out = cogtune_here("cache", "prune", cache_dir).stdout
    assert "removed: 1 failed entries" in out and "1 unused shards, 1 temp files" in out
    assert not Path(orphan).exists() and not temp.exists()
    assert len(files_in(cache_dir / schema.INDEX_DIR, "*.parquet")) == 1  # compacted
    cache = Cache.open(cache_dir)
    assert len(cache.samples) == 8 and not cache.failed
    assert cogtune_here("cache", "verify", cache_dir).returncode == 0
    # what a preprocess run selected is read again unchanged
    assert "encoded: 0 videos, 0 captions" in cogtune_here("preprocess", "--config", built["config"], "--cache_root",
                                                      tmp_path / "cache").stdout


def test_prune_unselected_drops_clips_no_longer_in_the_dataset(tmp_path, tiny_model, eight_clips):
    data = Path(shutil.copytree(eight_clips, tmp_path / "data"))
    config = write_config(tmp_path / "c.toml", tiny_model, data, tmp_path / "cache", tmp_path / "out",
                          height=32, width=48, shard_size_mb=1e-6)
    cache_dir = cache_path_of(cogtune_here("preprocess", "--config", config).stdout)
    for name in ("prompts.txt", "videos.txt"):  # the dataset shrinks to its first 5 clips
        lines = (data / name).read_text().splitlines()[:5]
        (data / name).write_text("\n".join(lines) + "\n")
    assert "encoded: 0 videos" in cogtune_here("preprocess", "--config", config).stdout
    before = len(files_in(cache_dir / schema.SHARDS_DIR, "*.safetensors"))
    out = cogtune_here("cache", "prune", "--unselected", cache_dir).stdout
    assert "3 unselected samples" in out
    assert len(files_in(cache_dir / schema.SHARDS_DIR, "*.safetensors")) == before - 6  # 3 clips, 3 captions
    assert len(read_index(cache_dir)) == 5 and cogtune_here("cache", "verify", cache_dir).returncode == 0


def test_a_touched_clip_is_hashed_once_not_on_every_rerun(tmp_path, tiny_model, eight_clips):
    """A touch, a copy or rsync without times changes a clip's mtime, not its content: the next run
    hashes it (and encodes nothing), and the runs after it do not hash it again (the new size and
    mtime are kept in the cache's fingerprints file)."""
    import os

    data = Path(shutil.copytree(eight_clips, tmp_path / "data"))
    config = write_config(tmp_path / "c.toml", tiny_model, data, tmp_path / "cache", tmp_path / "out",
                          height=32, width=48)
    first = cogtune_here("preprocess", "--config", config).stdout
    assert "hashed: 8 of 8 source files" in first
    assert "hashed: 0 of 8 source files" in cogtune_here("preprocess", "--config", config).stdout
    for video in sorted((data / "videos").glob("*.mp4"))[:3]:
        os.utime(video, ns=(video.stat().st_atime_ns, video.stat().st_mtime_ns + 10**9))
    touched = cogtune_here("preprocess", "--config", config).stdout
    assert "hashed: 3 of 8 source files" in touched and "encoded: 0 videos, 0 captions" in touched
    for _ in range(2):
        assert "hashed: 0 of 8 source files" in cogtune_here("preprocess", "--config", config).stdout
    (cache_path_of(first) / schema.FINGERPRINTS_FILE).write_bytes(b"not parquet")  # only a shortcut:
    assert "hashed: 3 of 8 source files" in cogtune_here("preprocess", "--config", config).stdout  # read as none
    assert "hashed: 0 of 8 source files" in cogtune_here("preprocess", "--config", config).stdout  # and rewritten


def test_training_reads_the_index_rows_samples_in_a_few_columns(tmp_path, built):
    """Cache.open(for_training=True) keeps what training reads in numpy columns (keys as fixed-width
    bytes, shard names as codes): the same samples, in the same order, naming the same tensors, as
    the index rows, with the same rules for a sample written twice (its first usable row) and for
    failed samples (counted, not kept)."""
    import dataclasses
    import os

    cache_dir = copy_cache(built, tmp_path)
    rows = read_index(cache_dir)
    failed_twin = dataclasses.replace(rows[0], status=schema.STATUS_FAILED, reason="an earlier try", latent_shard=None)
    lost = dataclasses.replace(rows[1], sample_id="f" * 32, status=schema.STATUS_FAILED, reason="unreadable")
    early = write_index_part(cache_dir, "an-earlier-part", [failed_twin, lost])
    os.utime(early, ns=(1, 1))  # read first: the ok row written later must still win
    write_selection(cache_dir, [row.sample_id for row in rows] + [lost.sample_id])
    full, columns = Cache.open(cache_dir), Cache.open(cache_dir, for_training=True)
    assert len(columns.samples) == len(full.samples) == 8 and columns.failed_count == len(full.failed) == 1
    tensors, text_length = full.manifest.tensors, full.manifest.settings.text_length
    for row, sample in zip(full.samples, columns.samples):
        assert (sample.sample_id, sample.num_frames, sample.height, sample.width, sample.latent_shape,
                sample.image_variants) == (row.sample_id, row.num_frames, row.height, row.width, row.latent_shape,
                                           row.image_variants)
        assert sample.tensors(tensors, text_length) == row.tensors(tensors, text_length)
        for a, b in zip(full.video_tensors(row).values(), columns.video_tensors(sample).values()):
            assert torch.equal(a, b)
    assert columns.samples.latent_shapes == [tuple(row.latent_shape) for row in full.samples]
    assert columns.samples.nbytes < 200 * len(columns.samples)  # bytes a sample, all columns together
    assert columns.samples.failures == dict(Counter(row.failure_kind or "unreadable" for row in full.failed))
    assert columns.samples.buckets == dict(sorted(Counter(row.bucket for row in full.samples).items()))


def test_many_index_parts_are_compacted_into_one_that_reads_the_same(tmp_path, built):
    """Each process writes an index part per shard, thousands in a large run: past MAX_INDEX_PARTS
    they are merged into one, which reads as they did (rows in order, a failed try before a later
    usable row). A reader holding the old listing is told to list again; a damaged part stops it."""
    import dataclasses
    import os

    cache_dir = copy_cache(built, tmp_path)
    rows = read_index(cache_dir)
    for part in index_parts(cache_dir):
        part.unlink()
    for i, row in enumerate(rows):
        twin = write_index_part(cache_dir, f"a-{i:02d}", [dataclasses.replace(row, status=schema.STATUS_FAILED,
                                                                             reason="an earlier try")])
        os.utime(twin, ns=(i + 1, i + 1))  # the failed tries first, then the rows, one part each
        os.utime(write_index_part(cache_dir, f"b-{i:02d}", [row]), ns=(100 + i, 100 + i))
    lost = dataclasses.replace(rows[1], sample_id="f" * 32, status=schema.STATUS_FAILED, reason="unreadable")
    os.utime(write_index_part(cache_dir, "c-lost", [lost]), ns=(200, 200))
    write_selection(cache_dir, [row.sample_id for row in rows] + [lost.sample_id])
    old = index_parts(cache_dir)
    assert len(old) == 2 * len(rows) + 1 > MAX_INDEX_PARTS
    before, training = read_index(cache_dir), Cache.open(cache_dir, for_training=True).samples
    assert before == rows + [lost] and training.failed == 1
    assert compact_index(cache_dir) == len(old) and len(index_parts(cache_dir)) == 1
    assert read_index(cache_dir) == before
    after = Cache.open(cache_dir, for_training=True).samples
    assert list(after) == list(training) and after.failures == training.failures == {"unreadable": 1}
    with pytest.raises(PartVanished):  # what a reader listing before the compaction meets: it lists again
        read_part_table(old[0])
    assert compact_index(cache_dir) == 0  # one part: nothing to do
    for i in range(MAX_INDEX_PARTS):
        write_index_part(cache_dir, f"c-{i:02d}", [rows[i % len(rows)]])
    damaged = schema.index_part_path(cache_dir, "damaged")
    damaged.write_bytes(b"not parquet")
    parts = index_parts(cache_dir)
    assert compact_index(cache_dir) == 0 and index_parts(cache_dir) == parts  # left for `cache prune`


def test_prune_is_refused_while_a_preprocess_runs(tmp_path, built):
    cache_dir = copy_cache(built, tmp_path)
    with cache_lock(cache_dir):  # as a preprocess run holds it
        result = cogtune_here("cache", "prune", cache_dir, check=False)
    assert result.returncode == 2 and "in use by a preprocess or training run" in result.stderr


def test_a_file_system_without_locks_is_named_with_its_way_out(tmp_path, built, monkeypatch):
    """On Lustre or NFS mounted without locks, flock fails with ENOLCK: prune (and preprocess) stop
    with a message that says so and how to go on, not a traceback; with COGTUNE_NO_CACHE_LOCK=1 they
    go on without the lock, saying so. (flock is the operating system's; it is made to answer as
    such a file system does.)"""
    import errno

    from cogtune.util import locks

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    cache_dir = copy_cache(built, tmp_path)
    monkeypatch.setattr(locks.fcntl, "flock", no_locks)
    result = cogtune_here("cache", "prune", cache_dir, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "without file locks (flock: No locks available)" in result.stderr and "COGTUNE_NO_CACHE_LOCK=1" in result.stderr
    monkeypatch.setenv("COGTUNE_NO_CACHE_LOCK", "1")
    result = cogtune_here("cache", "prune", cache_dir, check=False)
    assert result.returncode == 0 and "going on without one" in result.stderr


# --- bad input: a clear error before any work, and nothing already written lost ----------------


def break_dataset(data: Path, how: str, outside: Path) -> str:
    """Spoil a copy of the eight-clip dataset in one way; returns the message expected."""
    lines = lambda name: (data / name).read_text().splitlines()  # noqa: E731
    write = lambda name, rows: (data / name).write_text("\n".join(rows) + "\n")  # noqa: E731
    if how == "missing video":
        write("videos.txt", lines("videos.txt")[:-1] + ["videos/nowhere.mp4"])
        return "videos.txt line 8: video file .*nowhere.mp4 does not exist"
    if how == "dot-dot path":
        write("videos.txt", lines("videos.txt")[:-1] + ["../../etc/passwd"])
        return "videos.txt line 8: video path '../../etc/passwd' points outside the data root"
    if how == "absolute path outside":
        write("videos.txt", lines("videos.txt")[:-1] + [str(outside)])
        return f"videos.txt line 8: video path '{outside}' points outside the data root"
    if how == "symlink out":
        (data / "videos/link.mp4").symlink_to(outside)
        write("videos.txt", lines("videos.txt")[:-1] + ["videos/link.mp4"])
        return "line 8: video path 'videos/link.mp4' is a symlink to .* outside the data root.*allow_symlinks"
    if how == "line counts differ":
        write("prompts.txt", lines("prompts.txt")[:-2])
        return "prompts.txt has 6 prompts but .*videos.txt has 8 videos"
    if how == "empty caption":
        write("prompts.txt", lines("prompts.txt")[:2] + ["   "] + lines("prompts.txt")[3:])
        return "line 3: the caption is empty"
    if how == "missing column":
        rows = zip(lines("prompts.txt"), lines("videos.txt"))
        (data / "metadata.csv").write_text("caption,file\n" + "".join(f"{c},{v}\n" for c, v in rows))
        return "metadata.csv has no column 'video' \\(--video_column\\); its columns are: caption, file"
    raise ValueError(how)


BAD_DATASETS = ["missing video", "dot-dot path", "absolute path outside", "symlink out", "line counts differ",
                "empty caption", "missing column"]


@pytest.mark.parametrize("how", BAD_DATASETS)
def test_bad_dataset_is_refused_before_any_work_and_the_cache_is_untouched(tmp_path, built, eight_clips, how):
    from cogtune import preprocess
    from cogtune.config import load_config
    from cogtune.errors import CogtuneError

    cache_dir = copy_cache(built, tmp_path)
    before = snapshot(cache_dir)
    data = Path(shutil.copytree(eight_clips, tmp_path / "data"))
    outside = tmp_path / "elsewhere.mp4"
    shutil.copy(data / "videos/000.mp4", outside)
    expected = break_dataset(data, how, outside)
    argv = ["--config", str(built["config"]), "--instance_data_root", str(data), "--cache_root", str(tmp_path / "cache")]
    if how == "missing column":
        argv += ["--dataset_name", str(data / "metadata.csv"), "--caption_column", "caption", "--video_column", "video"]
    config = load_config("preprocess", argv)
    with pytest.raises(CogtuneError, match=expected):
        preprocess.run(config)
    assert snapshot(cache_dir) == before
    assert len(Cache.open(cache_dir).samples) == 8


def test_a_symlink_out_of_the_root_is_read_when_allowed(tmp_path, tiny_model, eight_clips):
    data = Path(shutil.copytree(eight_clips, tmp_path / "data"))
    outside = Path(shutil.copy(data / "videos/000.mp4", tmp_path / "elsewhere.mp4"))
    break_dataset(data, "symlink out", outside)
    config = write_config(tmp_path / "c.toml", tiny_model, data, tmp_path / "cache", tmp_path / "out",
                          height=32, width=48, allow_symlinks_outside_root=True)
    out = cogtune_here("preprocess", "--config", config).stdout
    assert "samples: 8 ok" in out


def test_damaged_cache_is_refused_by_train_before_the_model_loads(tmp_path, built):
    cache_dir = copy_cache(built, tmp_path)
    shard = files_in(cache_dir / schema.SHARDS_DIR, "*.safetensors")[0]
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    result = cogtune_here("train", "--config", built["config"], "--data_cache", cache_dir, "--output_dir",
                     tmp_path / "out", check=False)
    assert result.returncode == 2 and "is damaged" in result.stderr and "cannot be read" in result.stderr
    assert "cogtune cache prune --damaged" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()

    index_part = files_in(cache_dir / schema.INDEX_DIR, "*.parquet")[0]
    index_part.write_bytes(b"PAR1 not parquet")
    result = cogtune_here("train", "--config", built["config"], "--data_cache", cache_dir, "--output_dir",
                     tmp_path / "out", check=False)
    assert result.returncode == 2 and f"Cache index part {index_part} is damaged" in result.stderr


def test_unwritable_output_dir_is_refused_before_training(tmp_path, built):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = cogtune_here("train", "--config", built["config"], "--output_dir", blocker / "out", check=False)
    assert result.returncode == 2 and f"Cannot write to --output_dir {blocker / 'out'}" in result.stderr
    result = cogtune_here("preprocess", "--config", built["config"], "--cache_root", blocker / "cache", check=False)
    assert result.returncode == 2 and "Cannot write to --cache_root" in result.stderr
    assert blocker.read_text() == "not a folder"


def test_a_prune_killed_at_any_step_leaves_a_whole_cache(tmp_path, built):
    """kill -9 before each rename and each delete a prune makes (the selection rewritten, the index
    compacted, old parts and unused shards deleted): every state it can leave is a whole cache that
    verify passes and training opens, and the next prune finishes the job. (The prune runs in a
    forked copy of this process, which an audit hook ends at the n-th rename or delete.)"""
    import io

    from cogtune.cli import main

    source = copy_cache(built, tmp_path / "source")
    failed = schema.failed_row(schema.SampleSource("f" * 32, "/gone.mp4", 1, 1, "0" * 64, "a caption"),
                               "unreadable", "videos.txt line 9: cannot open video")
    write_index_part(source, "w0-failed", [failed])  # selected and failed: prune removes it from both
    write_selection(source, read_selection(source) + ["f" * 32])
    shutil.copy(files_in(source / schema.SHARDS_DIR, "*.safetensors")[0], source / schema.SHARDS_DIR / "w0-orphan.safetensors")

    def prune_killed_at(cache: Path, n: int) -> int:
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                steps = [0]

                def kill_at_nth_change(event, args):
                    if event in ("os.rename", "os.remove"):
                        steps[0] += 1
                        if steps[0] == n:
                            os._exit(137)

                sys.addaudithook(kill_at_nth_change)
                sys.stdout = sys.stderr = io.StringIO()
                code = main(["cache", "prune", str(cache)])
            finally:
                os._exit(code)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    states = 0
    for n in range(1, 100):
        cache = Path(shutil.copytree(source, tmp_path / f"n{n}" / source.name))
        if prune_killed_at(cache, n) == 0:  # finished before its n-th change: every step was tried
            break
        states += 1
        assert cogtune_here("cache", "verify", cache).returncode == 0, n
        assert len(Cache.open(cache, for_training=True).samples) == 8
        assert cogtune_here("cache", "prune", cache).returncode == 0
        assert cogtune_here("cache", "verify", cache).returncode == 0 and read_selection(cache)[-1] != "f" * 32
    assert states >= 4  # the selection, the compacted part, the old parts, the unused shard
