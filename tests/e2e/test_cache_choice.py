"""Train trains on what preprocess wrote, or refuses: the README recipe with a user's own data
(`make preprocess ARGS="--instance_data_root B"` after a run on A, then `make train`), buckets
given to preprocess only, and a diffusers command line pasted whole into either stage."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from cogtune.config import data_settings, load_config
from cogtune.dev.tiny import make_demo_data

from conftest import cache_path_of, cogtune_here, write_config


def trained_on(stderr: str) -> tuple[Path, str]:
    """The cache a training run says it trains on, and why."""
    match = re.search(r"^cache: (\S+) \((.+)\)$", stderr, re.M)
    return Path(match.group(1)), match.group(2)


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory, tiny_model, demo_data):
    root = tmp_path_factory.mktemp("choice")
    other = make_demo_data(root / "other-data", num_frames=28)
    config = write_config(root / "my.toml", tiny_model, demo_data, root / "cache", root / "out",
                          max_train_steps=1, checkpointing_steps=10)
    cache_a = cache_path_of(cogtune_here("preprocess", "--config", config).stdout)
    cache_b = cache_path_of(cogtune_here("preprocess", "--config", config, "--instance_data_root", other).stdout)
    assert cache_a != cache_b
    return dict(root=root, config=config, other=other, a=cache_a, b=cache_b)


def test_the_same_args_for_train_name_the_cache_preprocess_wrote(two_datasets):
    d = two_datasets
    result = cogtune_here("train", "--config", d["config"], "--instance_data_root", d["other"],
                          "--output_dir", d["root"] / "with-args")
    path, why = trained_on(result.stderr)
    assert path == d["b"] and "the cache these settings name" in why


def test_train_without_the_args_trains_on_the_latest_preprocess_run_and_says_so(two_datasets):
    d = two_datasets
    result = cogtune_here("train", "--config", d["config"], "--output_dir", d["root"] / "without-args")
    path, why = trained_on(result.stderr)
    assert path == d["b"] != d["a"]
    assert "latest `cogtune preprocess`" in why and f"--instance_data_root {d['other']}" in why


def test_a_config_changed_since_the_latest_preprocess_is_refused_naming_the_difference(two_datasets, tmp_path):
    d = two_datasets
    changed = tmp_path / "changed.toml"
    changed.write_text(d["config"].read_text().replace("height = 32", "height = 48"))
    cogtune_here("preprocess", "--config", changed, "--instance_data_root", d["other"])  # its own latest run
    changed.write_text(changed.read_text().replace("height = 48", "height = 64"))  # edited, not preprocessed
    result = cogtune_here("train", "--config", changed, "--output_dir", tmp_path / "out", check=False)
    assert result.returncode == 2
    assert "settings.height: the latest preprocess run wrote 48, this command names 64" in result.stderr
    assert "tensors" not in result.stderr  # the same tensor set: only what differs is listed
    assert "Give train the data flags" in result.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_data_flags_that_name_no_cache_are_refused_with_the_latest_run(two_datasets, tmp_path):
    d = two_datasets
    result = cogtune_here("train", "--config", d["config"], "--instance_data_root", d["other"], "--fps", "4",
                          "--output_dir", tmp_path / "out", check=False)
    assert result.returncode == 2
    assert "No cache for these settings" in result.stderr
    assert "settings.fps: the latest preprocess run wrote 8, this command names 4" in result.stderr


def test_buckets_given_to_preprocess_only_are_found_by_train(tmp_path, tiny_model, demo_data):
    config = write_config(tmp_path / "b.toml", tiny_model, demo_data, tmp_path / "cache", tmp_path / "out",
                          max_train_steps=1, checkpointing_steps=10)
    plain = cache_path_of(cogtune_here("preprocess", "--config", config).stdout)
    bucketed = cache_path_of(cogtune_here("preprocess", "--config", config, "--buckets", "9x32x64", "5x32x64").stdout)
    assert bucketed != plain
    path, why = trained_on(cogtune_here("train", "--config", config).stderr)
    assert path == bucketed and "--buckets 9x32x64 5x32x64" in why


# The command line of the diffusers README (seeds/diffusers-cogvideox-lora-readme.md), as users paste it.
SEED_COMMAND = """
  --pretrained_model_name_or_path THUDM/CogVideoX-2b --cache_dir /hf-cache
  --instance_data_root /data/videos --dataset_name my-awesome-name/my-awesome-dataset
  --caption_column prompt --video_column video --id_token BW_STYLE
  --validation_prompt "BW_STYLE Spiderman swinging over buildings:::A panda plays a guitar"
  --validation_prompt_separator ::: --num_validation_videos 1 --validation_epochs 10 --seed 42 --rank 64
  --lora_alpha 64 --mixed_precision fp16 --output_dir /raid/aryan/cogvideox-lora
  --height 480 --width 720 --fps 8 --max_num_frames 49 --skip_frames_start 0 --skip_frames_end 0
  --train_batch_size 1 --num_train_epochs 30 --checkpointing_steps 1000 --gradient_accumulation_steps 1
  --learning_rate 1e-3 --lr_scheduler cosine_with_restarts --lr_warmup_steps 200 --lr_num_cycles 1
  --enable_slicing --enable_tiling --optimizer Adam --adam_beta1 0.9 --adam_beta2 0.95 --max_grad_norm 1.0
  --report_to wandb
"""


def test_the_diffusers_command_line_pasted_whole_is_accepted_by_both_stages():
    argv = shlex.split(SEED_COMMAND)
    assert len([a for a in argv if a.startswith("--")]) == 37
    pre = load_config("preprocess", argv)
    train = load_config("train", argv)
    assert (pre.dataset_name, pre.video_column, pre.height, pre.max_num_frames, pre.enable_tiling) == \
        ("my-awesome-name/my-awesome-dataset", "video", 480, 49, True)
    assert (train.rank, train.optimizer, train.lr_scheduler, train.report_to, train.mixed_precision) == \
        (64, "adam", "cosine_with_restarts", "wandb", "fp16")
    data = data_settings(train, argv)  # what train names its cache by: preprocess's reading of the same line
    assert (data.instance_data_root, data.id_token, data.fps) == (pre.instance_data_root, "BW_STYLE", 8)
    assert "instance_data_root" in data.command_line and "rank" not in data.command_line


def test_a_mistyped_flag_is_refused_in_one_line_not_a_usage_dump():
    result = cogtune_here("train", "--pretrained_model_name_or_path", "m", "--learning_rte", "1e-3", check=False)
    assert result.returncode == 2
    assert "unrecognized arguments: --learning_rte" in result.stderr
    assert len(result.stderr.splitlines()) <= 3


def test_with_auto_tiling_train_finds_the_tiled_cache_a_small_gpu_switched_to(two_datasets, tmp_path):
    from cogtune.cache.identity import training_cache
    from cogtune.families import ModelConfigs

    d = two_datasets
    config = tmp_path / "auto.toml"  # its own latest-preprocess record
    config.write_text(d["config"].read_text())
    # --auto_tiling decides only on a GPU; its run on a small one writes what --enable_tiling writes
    tiled = cache_path_of(cogtune_here("preprocess", "--config", config, "--enable_tiling").stdout)

    def chosen(*flags):
        argv = ["--config", str(config), *flags]
        data = data_settings(load_config("train", argv), argv)
        return training_cache(None, data, ModelConfigs.of(data)).path.resolve()

    data_flags = ["--instance_data_root", str(load_config("preprocess", ["--config", str(config)]).instance_data_root)]
    assert chosen(*data_flags) == d["a"] != tiled  # the untiled cache these settings name
    assert chosen(*data_flags, "--auto_tiling") == tiled
    assert chosen("--auto_tiling") == tiled


def test_training_precision_does_not_choose_the_cache(tmp_path, tiny_model, demo_data):
    """Preprocess at fp16 as the diffusers command runs, then train at bf16 as the README advises: the
    transformer's precision is training's own setting, not the encoders', and finds the fp16 cache."""
    config = write_config(tmp_path / "c.toml", tiny_model, demo_data, tmp_path / "cache", tmp_path / "out",
                          max_train_steps=1, mixed_precision="bf16")
    cache = cache_path_of(cogtune_here("preprocess", "--config", config, "--mixed_precision", "fp16").stdout)
    trained = cogtune_here("train", "--config", config, "--mixed_precision", "bf16", "--seed", "3")
    assert f"cache: {cache}" in trained.stderr and "written by the latest `cogtune preprocess`" in trained.stderr


def test_default_folders_are_beside_the_config_file(tmp_path, tiny_model, demo_data, monkeypatch):
    folder = tmp_path / "project" / "configs"
    folder.mkdir(parents=True)
    config = folder / "run.toml"
    config.write_text(f'pretrained_model_name_or_path = "{tiny_model}"\ninstance_data_root = "{demo_data}"\n'
                      'height = 32\nwidth = 64\nmax_num_frames = 9\nmixed_precision = "no"\nlatent_dtype = "fp32"\n'
                      'max_train_steps = 1\nrank = 4\nlora_alpha = 2\n')
    monkeypatch.chdir(tmp_path)  # run from elsewhere: the folders still come beside the file
    cache = cache_path_of(cogtune_here("preprocess", "--config", config).stdout)
    assert cache.parent == folder / "cache"
    assert load_config("train", ["--config", str(config)]).output_dir == str(folder / "cogtune-lora")
    trained = cogtune_here("train", "--config", config).stdout
    assert f"lora: {folder / 'cogtune-lora' / 'pytorch_lora_weights.safetensors'}" in trained
    assert not (tmp_path / "cache").exists() and not (tmp_path / "cogtune-lora").exists()
    # a flag's relative path stays relative to where the command runs, as any command line's
    assert load_config("train", ["--config", str(config), "--output_dir", "here"]).output_dir == "here"


def test_a_preprocess_that_fails_leaves_no_empty_cache_and_prune_removes_old_ones(tmp_path, tiny_model, demo_data):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    (data / "videos" / "00001.mp4").unlink()
    config = write_config(tmp_path / "c.toml", tiny_model, data, tmp_path / "cache", tmp_path / "out")
    failed = cogtune_here("preprocess", "--config", config, check=False)
    assert failed.returncode == 2 and "00001.mp4 does not exist" in failed.stderr
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == []
    # one left by an older release: a manifest alone, (unfinished, 0 B) in `cache inspect`
    good = cache_path_of(cogtune_here("preprocess", "--config", write_config(
        tmp_path / "g.toml", tiny_model, demo_data, tmp_path / "cache", tmp_path / "out")).stdout)
    empty = tmp_path / "cache" / "tiny-2b_old_32x64_9f_8fps_center_000000000000"
    empty.mkdir()
    shutil.copy(good / "manifest.json", empty / "manifest.json")
    assert "(unfinished, 0 B)" in cogtune_here("cache", "inspect", tmp_path / "cache").stdout
    pruned = cogtune_here("cache", "prune", tmp_path / "cache").stdout
    assert "removed 1 unfinished, empty cache(s)" in pruned and empty.name in pruned
    assert not empty.exists() and (good / "manifest.json").is_file()
