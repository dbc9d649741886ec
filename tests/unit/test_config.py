import re
from pathlib import Path

import pytest

from cogtune.config import (STAGE_CONFIGS, data_settings, load_config, make_config, read_toml, settings_fields,
                            values_for_stage)
from cogtune.errors import CogtuneError
from cogtune.templates import TEMPLATES

from conftest import ROOT, cogtune_here

SHIPPED = sorted((TEMPLATES / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
@pytest.mark.parametrize("stage", list(STAGE_CONFIGS))
def test_shipped_configs_parse_and_validate(path, stage):
    config = make_config(stage, values_for_stage(read_toml(path), stage, str(path)), str(path))
    assert config.pretrained_model_name_or_path


# (model, precision, frames, height, width, fps) each family's model card recommends
FAMILY_CONFIGS = {
    "cogvideox-2b-lora": ("THUDM/CogVideoX-2b", "fp16", 49, 480, 720, 8),
    "cogvideox-5b-lora": ("THUDM/CogVideoX-5b", "bf16", 49, 480, 720, 8),
    "cogvideox-5b-i2v-lora": ("THUDM/CogVideoX-5b-I2V", "bf16", 49, 480, 720, 8),
    "cogvideox1.5-5b-lora": ("THUDM/CogVideoX1.5-5B", "bf16", 81, 768, 1360, 16),
    "cogvideox1.5-5b-i2v-lora": ("THUDM/CogVideoX1.5-5B-I2V", "bf16", 81, 768, 1360, 16),
}


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_each_family_has_a_config_with_its_recommended_settings(name):
    path = TEMPLATES / "configs" / f"{name}.toml"
    model, precision, frames, height, width, fps = FAMILY_CONFIGS[name]
    document = read_toml(path)
    pre, train, infer = (make_config(stage, values_for_stage(document, stage, str(path)), str(path))
                         for stage in STAGE_CONFIGS)
    assert pre.pretrained_model_name_or_path == train.pretrained_model_name_or_path == model
    assert (pre.max_num_frames, pre.height, pre.width, pre.fps) == (frames, height, width, fps)
    assert (infer.num_frames, infer.height, infer.width, infer.fps) == (frames, height, width, fps)
    assert pre.mixed_precision == train.mixed_precision == infer.mixed_precision == precision
    assert train.rank == 64 and train.lora_alpha in (64, 32) and 1e-4 <= train.learning_rate <= 1e-3
    assert (infer.image is not None) == ("i2v" in name)


def test_flags_override_the_file_and_stage_tables_override_top_level(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('pretrained_model_name_or_path = "m"\nrank = 16\nheight = 64\n[train]\nrank = 32\n')
    train = load_config("train", ["--config", str(path)])
    assert train.rank == 32
    train = load_config("train", ["--config", str(path), "--rank", "8", "--optimizer", "AdamW"])
    assert train.rank == 8 and train.optimizer == "adamw"
    assert load_config("preprocess", ["--config", str(path)]).height == 64


def test_a_prompt_file_flag_replaces_the_prompt_of_the_config_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('pretrained_model_name_or_path = "m"\n[infer]\nprompt = "from the file"\n')
    config = load_config("infer", ["--config", str(path), "--prompt_file", "prompts.txt"])
    assert (config.prompt, config.prompt_file) == (None, "prompts.txt")
    assert load_config("infer", ["--config", str(path)]).prompt == "from the file"
    with pytest.raises(CogtuneError, match="exactly one of --prompt or --prompt_file"):
        load_config("infer", ["--config", str(path), "--prompt_file", "p.txt", "--prompt", "x"])


def test_unknown_setting_is_refused(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('pretrained_model_name_or_path = "m"\nlearning_rat = 1e-4\n')
    with pytest.raises(CogtuneError, match="unknown setting.*learning_rat"):
        load_config("train", ["--config", str(path)])


def test_invalid_preprocess_settings():
    with pytest.raises(CogtuneError, match="--fps must be positive"):
        load_config("preprocess", ["--pretrained_model_name_or_path", "m", "--fps", "0"])


@pytest.mark.parametrize("argv, message", [
    (["--max_num_frames", "48"], "--max_num_frames 48 is not of the form 4k\\+1 that the CogVideoX VAE needs; use 45 or 49"),
    (["--height", "100"], "--height 100 is not a multiple of 16"),
    (["--buckets", "48x480x720"], "Bucket 48x480x720: frames 48 is not of the form 4k\\+1"),
])
def test_the_models_frame_and_size_rules_refuse_a_clip_size_before_any_data_is_read(tmp_path, argv, message):
    """The rules are the model family's (CogVideoX: 4k+1 frames, multiples of 16), known from its config
    files (here the shipped configs of a published id) before the dataset is read."""
    refused = cogtune_here("preprocess", "--pretrained_model_name_or_path", "THUDM/CogVideoX-2b", "--instance_data_root",
                           tmp_path / "not-there", "--cache_root", tmp_path / "cache", *argv, check=False)
    assert refused.returncode == 2 and re.search(message, refused.stderr), refused.stderr


def test_wrong_type_in_file_names_the_setting(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('pretrained_model_name_or_path = "m"\nrank = "big"\n')
    with pytest.raises(CogtuneError, match="rank must be of type int"):
        load_config("train", ["--config", str(path)])


def test_train_finds_the_preprocess_settings_of_the_same_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('pretrained_model_name_or_path = "m"\nheight = 64\n[preprocess]\nfps = 16\n')
    train = load_config("train", ["--config", str(path), "--pretrained_model_name_or_path", "other"])
    pre = data_settings(train, ["--config", str(path), "--pretrained_model_name_or_path", "other"])
    assert (pre.height, pre.fps, pre.pretrained_model_name_or_path) == (64, 16, "other")


def test_help_documents_every_flag():
    for stage, cls in STAGE_CONFIGS.items():
        out = cogtune_here(stage, "--help").stdout
        for field in settings_fields(cls):
            if not field.metadata.get("file_only"):  # [[datasets]]: a config file's tables (see below)
                assert f"--{field.name}" in out, (stage, field.name)


@pytest.mark.parametrize("argv, message", [
    (["train", "--pretrained_model_name_or_path", "/does/not/exist", "--data_cache", "/x"], "/does/not/exist does not exist"),
    (["infer", "--pretrained_model_name_or_path", "m", "--prompt", "p", "--lora", "/does/not/exist"], "does not exist"),
    (["infer", "--pretrained_model_name_or_path", "m"], "exactly one of --prompt or --prompt_file"),
])
def test_more_user_errors_are_one_line(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --output_dir is relative
    result = cogtune_here(*argv, check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_missing_optional_optimizer_packages_give_a_clear_error():
    import importlib.util

    import torch

    from cogtune.train.optim import make_optimizer

    parameters = [torch.nn.Parameter(torch.zeros(2))]
    for package, argv in (("bitsandbytes", ["--use_8bit_adam"]), ("prodigyopt", ["--optimizer", "prodigy"])):
        config = load_config("train", ["--pretrained_model_name_or_path", "m", *argv])
        if importlib.util.find_spec(package):
            assert make_optimizer(parameters, config, 1e-3) is not None
        else:
            with pytest.raises(CogtuneError, match=f"pip install {package}"):
                make_optimizer(parameters, config, 1e-3)
    adamw = make_optimizer(parameters, load_config("train", ["--pretrained_model_name_or_path", "m",
                                                             "--optimizer", "AdamW"]), 1e-3)
    assert isinstance(adamw, torch.optim.AdamW)


# Every flag of diffusers' examples/cogvideo/train_cogvideox_lora.py and
# train_cogvideox_image_to_video_lora.py (diffusers 58eb52c080, 0.40.0.dev0).
DIFFUSERS_SCRIPT_FLAGS = """
pretrained_model_name_or_path revision variant cache_dir dataset_name dataset_config_name instance_data_root
video_column caption_column id_token dataloader_num_workers validation_prompt validation_images
validation_prompt_separator num_validation_videos validation_epochs guidance_scale use_dynamic_cfg seed rank
lora_alpha mixed_precision output_dir height width video_reshape_mode fps max_num_frames skip_frames_start
skip_frames_end random_flip train_batch_size num_train_epochs max_train_steps checkpointing_steps
checkpoints_total_limit resume_from_checkpoint gradient_accumulation_steps gradient_checkpointing learning_rate
scale_lr lr_scheduler lr_warmup_steps lr_num_cycles lr_power enable_slicing enable_tiling noised_image_dropout
optimizer use_8bit_adam adam_beta1 adam_beta2 prodigy_beta3 prodigy_decouple adam_weight_decay adam_epsilon
max_grad_norm prodigy_use_bias_correction prodigy_safeguard_warmup tracker_name push_to_hub hub_token hub_model_id
logging_dir allow_tf32 report_to nccl_timeout
""".split()


def test_the_docs_map_every_flag_of_the_diffusers_scripts_to_a_stage_that_takes_it():
    import dataclasses
    import re

    from cogtune.config import STAGE_CONFIGS

    training = (ROOT / "docs" / "training.md").read_text()
    section = training.split("## Coming from the diffusers scripts", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:4] for line in section.splitlines() if line.startswith("| `--")]
    mapped = {flag: where for flags, _, where in rows for flag in re.findall(r"`--([a-z0-9_]+)`", flags)}
    assert sorted(mapped) == sorted(DIFFUSERS_SCRIPT_FLAGS)
    stages = {stage: {f.name for f in dataclasses.fields(cls)} for stage, cls in STAGE_CONFIGS.items()}
    for flag, where in mapped.items():
        if where.strip().startswith("none"):
            assert not any(flag in names for names in stages.values())
            continue
        named = [stage for stage in stages if stage in where or "every stage" in where]
        assert named, (flag, where)
        for stage in named:
            assert flag in stages[stage], f"--{flag} is mapped to {stage}, which does not take it"


def test_a_flag_wins_over_the_config_file_and_a_key_can_be_unset(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('pretrained_model_name_or_path = "m"\nmax_train_steps = 100\nvalidation_prompt = "a cat"\n'
                    'num_train_epochs = 3\n')
    base = ["--config", str(path)]
    assert load_config("train", base).max_train_steps == 100
    epochs = load_config("train", [*base, "--num_train_epochs", "2"])  # the flag, not the file's steps
    assert (epochs.num_train_epochs, epochs.max_train_steps) == (2, None)
    assert load_config("train", [*base, "--num_train_epochs", "2", "--max_train_steps", "7"]).max_train_steps == 7
    validation = tmp_path / "v.jsonl"
    validation.write_text('{"prompt": "a dog"}\n')
    with_file = load_config("train", [*base, "--validation_file", str(validation)])
    assert (with_file.validation_prompt, with_file.validation_file) == (None, str(validation))
    unset = load_config("train", [*base, "--unset", "max_train_steps", "validation_prompt"])
    assert (unset.max_train_steps, unset.validation_prompt, unset.num_train_epochs) == (None, None, 3)
    with pytest.raises(CogtuneError, match="--unset max_steps: no such setting"):
        load_config("train", [*base, "--unset", "max_steps"])


def test_datasets_is_a_config_file_table_not_a_flag():
    help_text = cogtune_here("preprocess", "--help").stdout
    assert "--datasets" not in help_text and "--unset" in help_text
    refused = cogtune_here("preprocess", "--pretrained_model_name_or_path", "m", "--datasets", "x", check=False)
    assert refused.returncode == 2 and "unrecognized arguments: --datasets" in refused.stderr


@pytest.mark.parametrize("stage, key, given, taken", [
    ("preprocess", "frame_extraction", "Chunk", "chunk"), ("train", "caption_dropout_technique", "Zero", "zero"),
    ("train", "quant_backend", "TorchAO", "torchao"), ("train", "optimizer", "AdamW", "adamw"),
    ("infer", "mixed_precision", "BF16", "bf16")])
def test_choices_are_checked_and_normalised_when_read(tmp_path, stage, key, given, taken):
    path = tmp_path / "c.toml"
    path.write_text(f'pretrained_model_name_or_path = "m"\nprompt = "x"\n{key} = "{given}"\n')
    assert getattr(load_config(stage, ["--config", str(path)]), key) == taken
    assert getattr(load_config(stage, ["--pretrained_model_name_or_path", "m", "--prompt", "x", f"--{key}", given]),
                   key) == taken
    path.write_text(f'pretrained_model_name_or_path = "m"\nprompt = "x"\n{key} = "nonsense"\n')
    with pytest.raises(CogtuneError, match=f"{key} must be one of .*got 'nonsense'"):
        load_config(stage, ["--config", str(path)])


@pytest.mark.parametrize("stage, flag", [("infer", "--lora_scale"), ("train", "--learning_rate"),
                                          ("train", "--guidance_scale"), ("train", "--max_grad_norm")])
def test_numbers_that_are_not_numbers_are_refused_when_read(stage, flag):
    with pytest.raises(CogtuneError, match=f"{flag} must be"):
        load_config(stage, ["--pretrained_model_name_or_path", "m", "--prompt", "x", flag, "nan"])
