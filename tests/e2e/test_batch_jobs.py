"""What a batch job's log and a requeued job meet: plain progress lines in a file, no deprecation
noise, a clear refusal of checkpoints cogtune did not write, and cache identities that do not
change with the installed libraries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest

from cogtune import data_schema as schema
from cogtune.families import ModelConfigs

from conftest import cogtune_here, write_config


def test_progress_written_to_a_file_is_plain_lines(tmp_path, tiny_model, demo_data):
    """The three stages with stderr a file, as in a Slurm job, in one new process (tqdm reads
    TQDM_DISABLE, which the tests set, when it is imported)."""
    config = write_config(tmp_path / "c.toml", tiny_model, demo_data, tmp_path / "cache", tmp_path / "out",
                          max_train_steps=2)
    script = ("from cogtune.cli import main\n"
              f"assert all(main([stage, '--config', {str(config)!r}]) == 0 for stage in ('preprocess', 'train', 'infer'))")
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    with open(tmp_path / "job.log", "w") as log:
        subprocess.run([sys.executable, "-c", script], stdout=log, stderr=log, env=env, check=True)
    text = (tmp_path / "job.log").read_bytes().decode()  # read_text would turn \r into \n
    assert "\r" not in text and "\x1b[" not in text  # no redrawn bars, no cursor escapes
    for line in ("encoding videos: 4/4 clip (100%)", "training: 2/2 step (100%)", "generating: 1/1 video (100%)",
                 "cache: ", "lora: ", "video: "):
        assert line in text, line
    with open(tmp_path / "merge.log", "w") as log:  # a process of its own: nothing set the bars off before it
        subprocess.run([sys.executable, "-m", "cogtune.cli", "merge", "--config", str(config), "--merged_dir",
                        str(tmp_path / "merged")], stdout=log, stderr=log, env=env, check=True)
    text = (tmp_path / "merge.log").read_bytes().decode()
    assert "merged: " in text and "\r" not in text and "\x1b[" not in text


def test_stages_pass_no_deprecated_keywords(tmp_path, tiny_model, demo_data):
    """No deprecation warning from the libraries cogtune calls with keywords (diffusers' torch_dtype,
    for one). Warnings a library raises about its own dependencies (matplotlib about pyparsing at the
    floors, say) are not about what cogtune passes."""
    config = write_config(tmp_path / "c.toml", tiny_model, demo_data, tmp_path / "cache", tmp_path / "out",
                          max_train_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for stage in ("preprocess", "train", "infer"):
            cogtune_here(stage, "--config", config)
    called = ("diffusers", "transformers", "peft", "accelerate", "huggingface_hub", "safetensors", "cogtune")
    deprecated = [(w.filename, str(w.message)) for w in caught if "deprecat" in str(w.message).lower()
                  and any(f"/{library}/" in w.filename for library in called)]
    assert deprecated == []


def accelerate_checkpoint(folder):
    """What the diffusers scripts' accelerator.save_state writes: pickles and a LoRA."""
    folder.mkdir(parents=True)
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl", "pytorch_lora_weights.safetensors"):
        (folder / name).write_bytes(b"not for cogtune")


def test_resume_latest_refuses_a_diffusers_script_checkpoint(tmp_path, tiny_model, demo_data):
    config = write_config(tmp_path / "c.toml", tiny_model, demo_data, tmp_path / "cache", tmp_path / "out",
                          max_train_steps=2)
    cogtune_here("preprocess", "--config", config)
    accelerate_checkpoint(tmp_path / "out" / "checkpoint-1000")
    result = cogtune_here("train", "--config", config, "--resume_from_checkpoint", "latest", check=False)
    assert result.returncode == 2
    assert "checkpoint-1000 is not a cogtune checkpoint" in result.stderr
    assert "Nothing has been trained here by cogtune" in result.stderr
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()
    # beside an older checkpoint of ours, it names the one to pass
    (tmp_path / "out" / "checkpoint-1000").rename(tmp_path / "moved")
    cogtune_here("train", "--config", config)
    accelerate_checkpoint(tmp_path / "out" / "checkpoint-1000")
    result = cogtune_here("train", "--config", config, "--resume_from_checkpoint", "latest", check=False)
    assert result.returncode == 2 and "The newest cogtune checkpoint is" in result.stderr
    assert "checkpoint-2: pass it to --resume_from_checkpoint" in result.stderr


def test_model_identity_is_the_config_files_as_stored(tiny_model, tmp_path):
    """The cache records hashes of the config files themselves, so another transformers or diffusers
    version (which expands configs with its own defaults, or saves them with its version) names the
    same cache."""
    import shutil

    models = ModelConfigs.load(str(tiny_model))
    stored = json.loads((tiny_model / "text_encoder" / "config.json").read_text())
    assert models.text_encoder == stored
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    for part in ("text_encoder", "vae"):
        path = copy / part / "config.json"
        config = json.loads(path.read_text())
        config.update(transformers_version="9.9.9", _diffusers_version="9.9.9", dtype="bfloat16")
        config.pop("torch_dtype", None)
        path.write_text(json.dumps(config))
    again = ModelConfigs.load(str(copy)).identity()
    first = models.identity()
    assert again["components"] == first["components"] and set(first["components"]) == {"vae", "text_encoder"}
    changed = json.loads((copy / "vae" / "config.json").read_text())
    changed["scaling_factor"] = 0.5
    (copy / "vae" / "config.json").write_text(json.dumps(changed))
    assert ModelConfigs.load(str(copy)).identity()["components"]["vae"] != first["components"]["vae"]
    assert schema.FORMAT_VERSION >= 5


@pytest.mark.parametrize("stage", ["preprocess", "train"])
def test_a_stage_ignores_the_other_stages_flags(stage, tmp_path):
    from cogtune.config import load_config

    config = load_config(stage, ["--pretrained_model_name_or_path", "m", "--rank", "8", "--vae_batch_size", "2",
                                 "--num_inference_steps", "3", "--height", "64"])
    assert set(config.command_line) <= {f for f in config.__dataclass_fields__}
    assert config.height == 64 if stage == "preprocess" else not hasattr(config, "height")


def test_a_used_output_dir_is_never_mixed_with_a_new_run(tmp_path, tiny_model, demo_data):
    """The issue's sequence: a 6-step run left checkpoint-4 and -6; a new 2-step run into the same folder
    is refused (its log and card untouched), then takes the folder with --overwrite_output_dir; a resume
    whose settings differ names them; the limit never deletes the checkpoint just saved."""
    config = write_config(tmp_path / "c.toml", tiny_model, demo_data, tmp_path / "cache", tmp_path / "out",
                          max_train_steps=6, checkpointing_steps=2, checkpoints_total_limit=2)
    out = tmp_path / "out"
    cogtune_here("preprocess", "--config", config)
    cogtune_here("train", "--config", config)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    log = (out / "train_log.jsonl").read_text()

    refused = cogtune_here("train", "--config", config, "--max_train_steps", "2", check=False)
    assert refused.returncode == 2 and "holds another training run" in refused.stderr
    assert "--overwrite_output_dir" in refused.stderr and "--resume_from_checkpoint latest" in refused.stderr
    assert (out / "train_log.jsonl").read_text() == log and (out / "checkpoint-6").is_dir()

    changed = cogtune_here("train", "--config", config, "--learning_rate", "0.02", "--resume_from_checkpoint", "latest",
                           check=False)
    assert changed.returncode == 2 and "learning_rate (0.01 -> 0.02)" in changed.stderr
    batch = cogtune_here("train", "--config", config, "--train_batch_size", "1", "--resume_from_checkpoint", "latest",
                         check=False)  # one process: another global batch, another run
    assert batch.returncode == 2 and "global_batch_size (2 -> 1)" in batch.stderr
    same = cogtune_here("train", "--config", config, "--max_train_steps", "8", "--resume_from_checkpoint", "latest")
    assert "Resumed from" in same.stderr and (out / "checkpoint-8").is_dir()  # a longer run of the same settings

    cogtune_here("train", "--config", config, "--max_train_steps", "2", "--overwrite_output_dir")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # the old run is gone, the new kept
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((out / "cogtune_lora.json").read_text())["steps"] == 2

    # a checkpoint resumed from the past: the limit keeps the one just saved, though others sort higher
    cogtune_here("train", "--config", config, "--overwrite_output_dir")  # checkpoints 4 and 6 again
    cogtune_here("train", "--config", config, "--resume_from_checkpoint", out / "checkpoint-4",
                 "--checkpointing_steps", "1", "--max_train_steps", "5", "--checkpoints_total_limit", "1")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-5"]


def test_the_same_training_gives_the_same_lora_file(tmp_path, tiny_model, demo_data):
    """Two processes (with other string hashes, as any two have) train the same LoRA: the same file, to
    the byte (peft's targets are a set, whose order follows the hashes)."""
    config = write_config(tmp_path / "c.toml", tiny_model, demo_data, tmp_path / "cache", tmp_path / "out",
                          max_train_steps=1)
    cogtune_here("preprocess", "--config", config)
    for seed in ("1", "2"):
        subprocess.run([sys.executable, "-m", "cogtune.cli", "train", "--config", str(config), "--output_dir",
                        str(tmp_path / seed)], env={**os.environ, "PYTHONHASHSEED": seed}, check=True,
                       capture_output=True)
    assert (tmp_path / "1" / "pytorch_lora_weights.safetensors").read_bytes() == \
        (tmp_path / "2" / "pytorch_lora_weights.safetensors").read_bytes()
