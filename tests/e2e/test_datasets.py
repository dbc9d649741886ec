"""Several datasets in one cache ([[datasets]] tables) with per-dataset repeats: the samples of each,
how often each is drawn in an epoch (against the repeats of the dataset its file came from), an
exact resume, and repeats changed after preprocessing caught before training."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from cogtune.cache.reader import Cache
from cogtune.dev.tiny import make_demo_data
from cogtune.train.data import epoch_batches

from clips import write_clip
from conftest import cache_path_of, cogtune_here, write_config


def datasets_config(path: Path, model: Path, root: Path, repeats: tuple[int, int], **extra) -> Path:
    config = write_config(path, model, root / "unused", root / "cache", root / "out", **extra)
    lines = [line for line in config.read_text().splitlines() if not line.startswith("instance_data_root")]
    tables = [f'[[datasets]]\ninstance_data_root = "first"\nrepeats = {repeats[0]}',  # relative to the file
              f'[[datasets]]\ninstance_data_root = "{root / "second"}"\nid_token = "OTHER"\nrepeats = {repeats[1]}']
    config.write_text("\n".join(lines) + "\n\n" + "\n\n".join(tables) + "\n")
    return config


@pytest.fixture(scope="module")
def two(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("datasets")
    make_demo_data(root / "first")
    make_demo_data(root / "second", num_frames=28)
    config = datasets_config(root / "c.toml", tiny_model, root, (1, 3), max_train_steps=4)
    out = cogtune_here("preprocess", "--config", config).stdout
    return dict(root=root, config=config, cache=cache_path_of(out), out=out)


def test_both_datasets_go_into_one_cache_with_their_own_id_tokens(two):
    assert "samples: 8 ok" in two["out"] and "_2datasets_" in two["cache"].name
    captions = {Path(row.source_path).parent.parent.name: row.caption for row in Cache.open(two["cache"]).samples}
    assert captions["first"].startswith("DEMO ") and captions["second"].startswith("OTHER ")


def test_each_sample_is_drawn_its_datasets_repeats_times_an_epoch(two):
    rows = Cache.open(two["cache"]).samples  # in sample-id order, as training indexes them
    expected = [3 if Path(row.source_path).parent.parent.name == "second" else 1 for row in rows]
    samples = Cache.open(two["cache"], for_training=True).samples
    assert samples.repeats.tolist() == expected
    orders = []
    for epoch in range(3):
        batches = epoch_batches(samples.shape_groups, 2, 0, epoch, samples.repeats)
        counts = Counter(index for batch in batches for index in batch)
        assert [counts[i] for i in range(len(rows))] == expected
        orders.append([index for batch in batches for index in batch])
    assert len({tuple(order) for order in orders}) == 3  # shuffled anew each epoch


def test_training_with_repeats_resumes_exactly(two, tmp_path):
    common = ["--config", two["config"], "--checkpointing_steps", "2"]
    whole = cogtune_here("train", *common, "--output_dir", tmp_path / "whole")
    assert "repeats: 8 samples, 16 per epoch" in whole.stderr
    cogtune_here("train", *common, "--output_dir", tmp_path / "split", "--max_train_steps", "2")
    cogtune_here("train", *common, "--output_dir", tmp_path / "split", "--resume_from_checkpoint", "latest")

    def losses(folder):
        return [json.loads(line)["loss"] for line in (folder / "train_log.jsonl").read_text().splitlines()]

    assert losses(tmp_path / "split") == losses(tmp_path / "whole")


def test_repeats_changed_since_preprocess_are_caught(two, tiny_model, tmp_path):
    config = datasets_config(two["root"] / "changed.toml", tiny_model, two["root"], (1, 2))
    refused = cogtune_here("train", "--config", config, "--output_dir", tmp_path / "o", check=False)
    assert refused.returncode == 2 and "repeats are [1, 2]" in refused.stderr and "with [1, 3]" in refused.stderr
    again = cogtune_here("preprocess", "--config", config).stdout
    assert "encoded: 0 videos, 0 captions" in again and cache_path_of(again) == two["cache"]  # the same cache
    cogtune_here("train", "--config", config, "--output_dir", tmp_path / "o", "--max_train_steps", "1")


def test_a_dataset_table_that_names_no_data_is_refused(tmp_path, tiny_model):
    config = write_config(tmp_path / "c.toml", tiny_model, tmp_path, tmp_path / "cache", tmp_path / "out")
    config.write_text(config.read_text() + "\n[[datasets]]\nrepeats = 2\n")
    result = cogtune_here("preprocess", "--config", config, check=False)
    assert result.returncode == 2 and "[[datasets]] table 1 names no data" in result.stderr
    config.write_text(config.read_text().replace("repeats = 2", 'instance_data_root = "x"\nrepeats = 0'))
    result = cogtune_here("preprocess", "--config", config, check=False)
    assert result.returncode == 2 and "repeats must be a whole number, 1 or more, got 0" in result.stderr


def test_two_processes_write_the_selection_one_process_writes(two, tmp_path):
    from test_distributed import torchrun

    out = torchrun("-m", "cogtune.cli", "preprocess", "--config", two["config"], "--cache_root", tmp_path / "two").stdout
    assert "samples: 8 ok" in out and "encoded: 8 videos" in out
    alone = cogtune_here("preprocess", "--config", two["config"], "--cache_root", tmp_path / "one").stdout
    one = Cache.open(cache_path_of(alone), for_training=True).samples
    other = Cache.open(cache_path_of(out), for_training=True).samples
    assert one.repeats.sum() == 16  # 4 x 1 + 4 x 3
    assert one.digest == other.digest and other.repeats.tolist() == one.repeats.tolist()  # ids and repeats


def test_without_datasets_a_record_listed_twice_is_one_sample(tmp_path, tiny_model):
    data = make_demo_data(tmp_path / "data")
    for name in ("prompts.txt", "videos.txt"):
        lines = (data / name).read_text().splitlines()
        (data / name).write_text("\n".join(lines + lines[:1]) + "\n")
    config = write_config(tmp_path / "c.toml", tiny_model, data, tmp_path / "cache", tmp_path / "out")
    samples = Cache.open(cache_path_of(cogtune_here("preprocess", "--config", config).stdout),
                         for_training=True).samples
    assert len(samples) == 4 and samples.repeats is None


def test_combining_cached_datasets_encodes_nothing(tmp_path, tiny_model):
    """Two datasets cached alone, then together: their encodings are copied from the two caches (the
    same model and tensor settings), nothing is encoded, and every tensor is the same bytes."""
    from test_encoding import stored

    root = tmp_path
    make_demo_data(root / "first")
    make_demo_data(root / "second", num_frames=28)
    alone = []
    for name, token in (("first", "DEMO"), ("second", "OTHER")):
        config = write_config(root / f"{name}.toml", tiny_model, root / name, root / "cache", root / "out",
                              id_token=token)
        alone.append(cache_path_of(cogtune_here("preprocess", "--config", config).stdout))
    together = cogtune_here("preprocess", "--config", datasets_config(root / "c.toml", tiny_model, root, (1, 3))).stdout
    assert "encoded: 0 videos, 0 captions" in together and "samples: 8 ok" in together
    assert "copied from other caches of these settings (no encoding): 8 videos, 8 captions" in together
    combined, sources = stored(cache_path_of(together)), {**stored(alone[0]), **stored(alone[1])}
    shard_keys = [key for key in combined if ":" not in key]  # (validation files are the cache's own)
    assert len(shard_keys) == 8 * 2 + 8 and all(combined[key] == sources[key] for key in shard_keys)


def test_a_dataset_table_gives_its_own_frames_size_and_extraction(tmp_path, tiny_model):
    """The same videos in two tables: at the top-level 9x32x64, and as 5-frame 32x32 chunks: two
    clips sets, keyed apart, in one cache; a second run encodes nothing; training takes both shapes."""
    root = tmp_path
    make_demo_data(root / "first")
    config = write_config(root / "c.toml", tiny_model, root / "unused", root / "cache", root / "out", max_train_steps=2)
    lines = [line for line in config.read_text().splitlines() if not line.startswith("instance_data_root")]
    config.write_text("\n".join(lines) + '\n\n[[datasets]]\ninstance_data_root = "first"\n\n[[datasets]]\n'
                      'instance_data_root = "first"\nid_token = "SMALL"\nheight = 32\nwidth = 32\nmax_num_frames = 5\n'
                      'frame_extraction = "Chunk"\nmax_windows_per_clip = 2\n')
    out = cogtune_here("preprocess", "--config", config).stdout
    assert "samples: 12 ok" in out and "9x32x64 (4)" in out and "5x32x32 (8)" in out
    assert "encoded: 8 videos" in out  # each video cut two ways
    rows = Cache.open(cache_path_of(out)).samples
    small = [row for row in rows if row.caption.startswith("SMALL")]
    assert len(small) == 8 and {(row.num_frames, row.height, row.width) for row in small} == {(5, 32, 32)}
    assert sorted({row.frame_indices[0] for row in small}) == [0, 10]  # chunks of 5 frames at 8 of 16 fps
    assert len({row.latent_key for row in rows}) == 12
    again = cogtune_here("preprocess", "--config", config).stdout
    assert "encoded: 0 videos, 0 captions" in again
    cogtune_here("train", "--config", config)

    config.write_text(config.read_text().replace("max_num_frames = 5", "max_num_frames = 6"))
    refused = cogtune_here("preprocess", "--config", config, check=False)
    assert refused.returncode == 2 and "[[datasets]] table 2: --max_num_frames 6 is not of the form 4k+1" in refused.stderr


def test_the_same_data_twice_and_an_empty_dataset_are_named(tmp_path, tiny_model):
    root = tmp_path
    make_demo_data(root / "first")
    (root / "empty").mkdir()
    (root / "empty" / "prompts.txt").write_text("")
    (root / "empty" / "videos.txt").write_text("")
    config = datasets_config(root / "c.toml", tiny_model, root, (1, 1))
    twice = config.read_text().replace(f'instance_data_root = "{root / "second"}"\nid_token = "OTHER"',
                                       'instance_data_root = "first"')
    (root / "twice.toml").write_text(twice)
    refused = cogtune_here("preprocess", "--config", root / "twice.toml", check=False)
    assert refused.returncode == 2 and "[[datasets]] tables 1 and 2 name the same data" in refused.stderr
    (root / "empty.toml").write_text(config.read_text().replace(f'"{root / "second"}"', '"empty"'))
    empty = cogtune_here("preprocess", "--config", root / "empty.toml", check=False)
    assert empty.returncode == 2 and "[[datasets]] table 2 (" in empty.stderr and "has no rows" in empty.stderr


def test_a_folders_inputs_each_become_a_sample_or_a_named_skip(tmp_path, tiny_model):
    """A folder dataset with a text file named .mp4, a cut file, a 0.3 s clip and an image+caption pair:
    the run goes on, each skipped clip is one sample with its reason, and the image is named."""
    import shutil

    from PIL import Image

    from cogtune.cache.reader import Cache
    from conftest import cache_path_of, cogtune_here, write_config

    data = tmp_path / "data"
    data.mkdir()
    for name, count in (("good", 24), ("short", 3)):  # 24 fps: 1 s, and 0.125 s (fewer than 5 frames at 8 fps)
        write_clip(data / f"{name}.mp4", count=count)
    (data / "notes.mp4").write_text("these are my notes, not a video\n")
    whole = (data / "good.mp4").read_bytes()
    (data / "cut.mp4").write_bytes(whole[: len(whole) // 3])
    Image.new("RGB", (32, 32)).save(data / "photo.png")
    for name in ("good", "short", "notes", "cut", "photo"):
        (data / f"{name}.txt").write_text(f"a {name} thing\n")
    config = write_config(tmp_path / "c.toml", tiny_model, data, tmp_path / "cache", tmp_path / "out", fps=8)
    result = cogtune_here("preprocess", "--config", config)
    assert "1 image+caption pair(s)" in result.stderr and "photo.png" in result.stderr
    out = result.stdout
    assert "samples: 1 ok, 3 skipped" in out and "skipped, not a video: 1" in out and "skipped, too short: 1" in out
    reasons = {row.source_path.rsplit("/", 1)[-1]: row.reason for row in Cache.open(cache_path_of(out)).failed}
    assert "not a video: it is a text file" in reasons["notes.mp4"]
    assert "fewer than --min_num_frames 5" in reasons["short.mp4"]
    assert "cut.mp4" in reasons
