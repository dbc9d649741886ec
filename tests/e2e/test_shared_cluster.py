"""What a shared cluster does to a run: two jobs on one output folder or cache, a crafted index or
caption file, files planted by other users, a flipped byte, a full disk
in a checkpoint, bad flags. Each ends in a correct run or one clear line (exit 2, or 75 for a stop
with its work saved), never a traceback, and nothing outside the run's folders is read or written."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from cogtune import data_schema as schema
from cogtune.cache.disk import read_index, read_selection
from cogtune.cache.writer import write_index_part, write_selection
from cogtune.train import checkpoint as checkpoints
from cogtune.util import files

from conftest import cache_path_of, cogtune_here, write_config
from test_cache_lifecycle import start, wait_for


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, demo_data):
    """A cache of the demo clips, and a config that trains on it with a checkpoint every 2 steps."""
    root = tmp_path_factory.mktemp("cluster")
    config = write_config(root / "c.toml", tiny_model, demo_data, root / "cache", root / "out", max_train_steps=4,
                          checkpointing_steps=2)
    cache = cache_path_of(cogtune_here("preprocess", "--config", config).stdout)
    return dict(root=root, config=config, cache=cache, model=tiny_model)


def one_line_error(result: subprocess.CompletedProcess, *parts: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for part in parts:
        assert part in result.stderr, result.stderr


def copy_cache(cache: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(cache, tmp_path / "cache" / cache.name))


# --- runs that collide ----------------------------------------------------------------------------


def test_a_second_training_into_a_running_ones_folder_is_refused_and_prune_waits_for_it(trained, tmp_path):
    """A requeued job started while the old one still runs is refused, naming the holder's host and
    pid; `cache prune` is refused while a training reads the cache; once the first run is killed
    (kill -9: its locks die with it) the requeued job resumes at once."""
    out = tmp_path / "out"
    first = start("train", "--config", trained["config"], "--output_dir", out, "--max_train_steps", "100000",
                  "--checkpointing_steps", "3", "--checkpoints_total_limit", "2")
    try:
        assert wait_for(lambda: (out / "train_log.jsonl").is_file() and checkpoints.checkpoints_in(out), first)
        second = cogtune_here("train", "--config", trained["config"], "--output_dir", out, "--resume_from_checkpoint",
                              "latest", check=False)
        one_line_error(second, f"--output_dir {out} is in use by another training run",
                       f"{socket.gethostname()} pid {first.pid}")
        pruned = cogtune_here("cache", "prune", "--unselected", trained["cache"], check=False)
        one_line_error(pruned, "in use by a preprocess or training run")
    finally:
        first.kill()
        first.wait()
    steps = len((out / "train_log.jsonl").read_text().splitlines())
    resumed = cogtune_here("train", "--config", trained["config"], "--output_dir", out, "--resume_from_checkpoint",
                           "latest", "--max_train_steps", str(steps + 2), "--checkpointing_steps", "3",
                           "--checkpoints_total_limit", "2")
    assert "Resumed from" in resumed.stdout + resumed.stderr
    steps_logged = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(1, steps + 3))  # each step once: nothing logged twice


def test_a_resume_over_other_samples_is_refused_unless_asked_for(trained, tmp_path):
    """Clips added (or removed) by a preprocess between a checkpoint and its resume: the resumed
    steps would differ from the run it continues, so it is refused, saying why and how to go on."""
    cache = copy_cache(trained["cache"], tmp_path)
    out = tmp_path / "out"
    common = ("--config", trained["config"], "--data_cache", cache, "--output_dir", out)
    cogtune_here("train", *common, "--max_train_steps", "2")
    selection = read_selection(cache)
    write_selection(cache, selection[:-1])  # as a preprocess run over a dataset without one clip writes it
    refused = cogtune_here("train", *common, "--resume_from_checkpoint", "latest", check=False)
    one_line_error(refused, "The cache's samples changed since", f"{len(selection)} samples", "--resume_with_new_data")
    resumed = cogtune_here("train", *common, "--resume_from_checkpoint", "latest", "--resume_with_new_data")
    assert "Resumed from" in resumed.stdout + resumed.stderr


# --- reads and writes outside their folders -----------------------------------------------------


@pytest.mark.parametrize("name", ["../../outside", "/tmp/outside", "a/../../b"])
def test_an_index_naming_a_shard_outside_the_cache_is_damaged(trained, tmp_path, name):
    cache = copy_cache(trained["cache"], tmp_path)
    outside = tmp_path / "outside.safetensors"
    shard = next(iter((cache / schema.SHARDS_DIR).glob("*.safetensors")))
    shutil.copy(shard, outside)  # a real shard, so that only the name can give it away
    rows = read_index(cache)
    crafted = dataclasses.replace(rows[0], latent_shard=name)
    for part in (cache / schema.INDEX_DIR).glob("*.parquet"):
        part.unlink()
    write_index_part(cache, "crafted", [crafted, *rows[1:]])
    verify = cogtune_here("cache", "verify", "--no_checksums", cache, check=False)
    assert verify.returncode == 1 and "not a file in the cache's shards/ folder" in verify.stdout + verify.stderr
    train = cogtune_here("train", "--config", trained["config"], "--data_cache", cache, "--output_dir",
                         tmp_path / "out", check=False)
    assert train.returncode == 2 and "Traceback" not in train.stderr and crafted.sample_id in train.stderr


def test_a_caption_file_linked_out_of_the_root_is_refused(trained, tmp_path):
    data = tmp_path / "clips"
    data.mkdir()
    shutil.copy(_a_clip(trained), data / "a.mp4")
    secret = tmp_path / "secret.txt"
    secret.write_text("the secret")
    (data / "a.txt").symlink_to(secret)
    result = cogtune_here("preprocess", "--config", trained["config"], "--instance_data_root", data, "--cache_root",
                          tmp_path / "cache", "--id_token", "", check=False)
    one_line_error(result, "a.txt is a symlink to", "outside the data root", "--allow_symlinks_outside_root")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*/shards/*.safetensors"))


def _a_clip(trained) -> Path:
    config = Path(trained["config"]).read_text()
    root = Path(next(line.split("=", 1)[1].strip().strip('"') for line in config.splitlines()
                     if line.startswith("instance_data_root")))
    return sorted(root.glob("**/*.mp4"))[0]


def test_the_writability_probe_never_opens_a_planted_file(tmp_path):
    """Another user of a group folder plants links where a probe of a guessable name would be: the
    probe is created exclusively under a fresh name, so their targets stay as they were."""
    folder, victim = tmp_path / "shared", tmp_path / "victim.txt"
    folder.mkdir()
    victim.write_text("keep me")
    for pid in range(max(os.getpid() - 50, 1), os.getpid() + 50):
        (folder / f".write-test-{pid}").symlink_to(victim)
    files.ensure_writable_dir(folder, "--output_dir")
    assert victim.read_text() == "keep me"
    assert sorted(p.name for p in folder.iterdir()) == sorted(f".write-test-{pid}" for pid in
                                                             range(max(os.getpid() - 50, 1), os.getpid() + 50))


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".", ""])
def test_a_tracker_name_is_a_plain_name(trained, tmp_path, name):
    result = cogtune_here("train", "--config", trained["config"], "--output_dir", tmp_path / "out", "--tracker_name",
                          name, check=False)
    one_line_error(result, "--tracker_name", "must be a plain name")
    assert not (tmp_path / "out").exists()


# --- wrong data accepted ------------------------------------------------------------------------


def test_a_cache_from_other_weights_of_the_same_config_is_refused(trained, tmp_path):
    """Two VAEs of one config (a fine-tuned one): the configs hash alike, the weights do not."""
    other = Path(shutil.copytree(trained["model"], tmp_path / "other-model"))
    (weights,) = (other / "vae").glob("*.safetensors")
    tensors = load_file(weights)
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 0.01
    save_file(tensors, weights)
    result = cogtune_here("train", "--config", trained["config"], "--pretrained_model_name_or_path", other,
                          "--data_cache", trained["cache"], "--output_dir", tmp_path / "out", check=False)
    one_line_error(result, "was built for another model", "weights_sha256")
    same = cogtune_here("train", "--config", trained["config"], "--data_cache", trained["cache"], "--output_dir",
                        tmp_path / "same", "--max_train_steps", "1")
    assert same.returncode == 0


def test_a_flipped_byte_in_a_tensor_is_never_trained_on(trained, tmp_path):
    """The shard header and shapes stay right (the check before the model loads passes); the
    tensor's checksum, checked as training reads it, does not."""
    cache = copy_cache(trained["cache"], tmp_path)
    row = read_index(cache)[0]
    shard = schema.shard_path(cache, row.latent_shard)
    key = schema.video_tensor_key(row.latent_key, "mean")
    with open(shard, "rb") as f:
        header_length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_length))
    start_byte = 8 + header_length + header[key]["data_offsets"][0]
    data = bytearray(shard.read_bytes())
    data[start_byte + 3] ^= 0x40
    shard.write_bytes(bytes(data))
    result = cogtune_here("train", "--config", trained["config"], "--data_cache", cache, "--output_dir",
                          tmp_path / "out", check=False)
    one_line_error(result, f"Sample {row.sample_id}", key, "does not match the checksum", "cogtune cache verify")


# --- failures that end in a traceback or a wrong exit status ------------------------------------


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_last_checkpoint(trained, tmp_path):
    """The LoRA of a checkpoint cannot be written (a file size limit stands in for a full disk; rank
    64 makes the LoRA the largest file a checkpoint writes first): a line naming the file, exit 2,
    and the checkpoint before it whole."""
    out = tmp_path / "out"
    common = ("train", "--config", trained["config"], "--output_dir", out, "--rank", "64")
    cogtune_here(*common, "--max_train_steps", "2")
    (saved,) = checkpoints.checkpoints_in(out)
    lora_size = (saved / "pytorch_lora_weights.safetensors").stat().st_size
    written_before = max(p.stat().st_size for p in (*saved.glob("random_states_*"), out / "train_log.jsonl"))
    assert written_before < lora_size - 1  # the limit stops the LoRA, nothing written before it
    limit = lora_size - 1

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    full = subprocess.run([sys.executable, "-m", "cogtune.cli", *map(str, common), "--resume_from_checkpoint", "latest",
                           "--max_train_steps", "4"], capture_output=True, text=True, preexec_fn=small_files)
    one_line_error(full, "No space left writing", ".checkpoint-4.tmp/pytorch_lora_weights.safetensors")
    (kept,) = checkpoints.checkpoints_in(out)
    assert kept.name == "checkpoint-2" and load_file(kept / "pytorch_lora_weights.safetensors")


@pytest.mark.parametrize("flags, message", [
    (("--max_train_steps", "0"), "--max_train_steps must be positive"),
    (("--max_train_steps", "-3"), "--max_train_steps must be positive"),
    (("--learning_rate", "-1"), "--learning_rate must be zero or more"),
    (("--learning_rate", "nan"), "--learning_rate must be zero or more"),
    (("--adam_beta2", "1.5"), "--adam_beta2 must be at least 0 and below 1"),
    (("--lora_alpha", "0"), "--lora_alpha must be positive"),
    (("--lr_num_cycles", "0"), "--lr_num_cycles must be positive"),
    (("--adam_weight_decay", "-0.1"), "--adam_weight_decay must be zero or more"),
])
def test_numeric_flags_out_of_range_are_refused_when_read(trained, tmp_path, flags, message):
    result = cogtune_here("train", "--config", trained["config"], "--output_dir", tmp_path / "out", *flags,
                          check=False)
    one_line_error(result, message)
    assert not (tmp_path / "out").exists()  # refused before anything was made


@pytest.mark.parametrize("manifest", [[1, 2], {"format_version": schema.FORMAT_VERSION, "fingerprint": "x",
                                               "model": {}, "dataset": {}}, "just text"])
def test_a_manifest_of_another_shape_is_one_line(trained, tmp_path, manifest):
    cache = copy_cache(trained["cache"], tmp_path)
    (cache / schema.MANIFEST_FILE).write_text(json.dumps(manifest))
    for command in (("cache", "verify", cache), ("train", "--config", trained["config"], "--data_cache", cache,
                                                 "--output_dir", tmp_path / "out")):
        result = cogtune_here(*command, check=False)
        one_line_error(result, "rebuild the cache with `cogtune preprocess`")


def test_infer_says_what_is_wrong_before_loading_the_pipeline(trained, tmp_path):
    out = tmp_path / "out"
    cogtune_here("train", "--config", trained["config"], "--output_dir", out, "--max_train_steps", "1")
    lora = out / "pytorch_lora_weights.safetensors"
    assert oct(lora.stat().st_mode & 0o777) == oct(0o666 & ~files._UMASK)  # readable as every other file
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")  # a folder below a file can never be made (also for root)
    result = cogtune_here("infer", "--config", trained["config"], "--output_dir", out, "--video_output_dir",
                          not_a_folder / "videos", check=False)
    one_line_error(result, "Cannot write to --video_output_dir")


def test_infer_refuses_a_damaged_lora_in_one_line(trained, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    result = cogtune_here("infer", "--config", trained["config"], "--output_dir", out, check=False)
    one_line_error(result, "is not a whole safetensors file", "damaged, cut short")


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_a_folder_or_fifo_named_like_a_video_is_named_for_what_it_is(trained, tmp_path, kind):
    data = tmp_path / "data"
    data.mkdir()
    if kind == "folder":
        (data / "x.mp4").mkdir()
    else:
        os.mkfifo(data / "x.mp4")
    (data / "prompts.txt").write_text("a caption\n")
    (data / "videos.txt").write_text("x.mp4\n")
    result = cogtune_here("preprocess", "--config", trained["config"], "--instance_data_root", data, "--cache_root",
                          tmp_path / "cache", check=False)
    one_line_error(result, "x.mp4 is " + ("a folder" if kind == "folder" else "a named pipe (FIFO)"))
