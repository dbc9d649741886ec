"""What a trained LoRA becomes outside cogtune: `cogtune export --format comfyui` at the trained strength
(rsLoRA and DoRA included, applied here as ComfyUI applies its LoRA files), `merge` and `export` taking
--config like the other stages, infer finding the base model in the LoRA's record, and every command
that reads a LoRA refusing a damaged or foreign file in one line, never writing over its input."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import load_file

from conftest import cogtune_here, write_config
from test_end_to_end import transformer_output


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model, demo_data):
    root = tmp_path_factory.mktemp("export")
    config = write_config(root / "c.toml", tiny_model, demo_data, root / "cache", root / "out", max_train_steps=2,
                          learning_rate=5e-2)
    cogtune_here("preprocess", "--config", config)
    return {"root": root, "config": config, "model": tiny_model}


def trained(prepared, name, *flags):
    out = prepared["root"] / name
    if not (out / "pytorch_lora_weights.safetensors").is_file():
        cogtune_here("train", "--config", prepared["config"], "--output_dir", out, *flags)
    return out


def apply_comfyui(transformer, state: dict) -> None:
    """ComfyUI's LoRA application (comfy/weight_adapter/lora.py and weight_decompose), written out:
    W += alpha / rank * up @ down; with a dora_scale, W' = dora_scale * W'' / ||W''|| per output row."""
    modules = dict(transformer.named_modules())
    for name in {key.rsplit(".", 2)[0] for key in state if key.endswith(".lora_down.weight")}:
        path = name[len("lora_unet_"):]
        module = next(m for n, m in modules.items() if n.replace(".", "_") == path)
        up, down = state[f"{name}.lora_up.weight"], state[f"{name}.lora_down.weight"]
        alpha = state[f"{name}.alpha"].item() / down.shape[0]
        weight = module.weight.data + alpha * up @ down
        if f"{name}.dora_scale" in state:
            scale = state[f"{name}.dora_scale"]
            assert scale.shape == (weight.shape[0], 1)
            weight = weight * (scale / weight.norm(dim=1, keepdim=True))
        module.weight.data = weight


@pytest.mark.parametrize("flags", [[], ["--use_rslora"], ["--use_dora"], ["--use_dora", "--use_rslora"]],
                         ids=["lora", "rslora", "dora", "dora-rslora"])
def test_comfyui_export_applies_the_trained_strength(prepared, tmp_path, flags):
    from diffusers import CogVideoXPipeline

    out = trained(prepared, "-".join(flags) or "plain", *flags)
    exported = tmp_path / "comfy.safetensors"
    cogtune_here("export", "--format", "comfyui", "--lora", out, "--output", exported)
    state = load_file(exported)
    with_lora = CogVideoXPipeline.from_pretrained(prepared["model"])
    with_lora.load_lora_weights(out, weight_name="pytorch_lora_weights.safetensors")
    expected = transformer_output(with_lora.transformer)
    base = CogVideoXPipeline.from_pretrained(prepared["model"]).transformer
    plain = transformer_output(base)
    apply_comfyui(base, state)
    assert not torch.allclose(plain, expected, atol=1e-4)
    assert torch.allclose(transformer_output(base), expected, atol=1e-5), (transformer_output(base) - expected).abs().max()
    rank_4 = state["lora_unet_transformer_blocks_0_attn1_to_q.alpha"].item()
    assert rank_4 == pytest.approx(2 * 2 if "--use_rslora" in flags else 2)  # lora_alpha 2, x sqrt(rank 4)


def test_export_and_merge_take_the_config_and_infer_finds_the_base(prepared, tmp_path):
    out = trained(prepared, "config-out")
    config = write_config(tmp_path / "c.toml", prepared["model"], prepared["root"] / "data-unused", tmp_path / "cache",
                          out, prompt="DEMO a red square", num_inference_steps=1, num_frames=5)
    exported = cogtune_here("export", "--config", config, "--format", "comfyui").stdout
    assert f"exported: {out / 'pytorch_lora_weights_comfyui.safetensors'}" in exported
    merged = cogtune_here("merge", "--config", config, "--merged_dir", tmp_path / "merged").stdout
    assert f"merged: {(tmp_path / 'merged').resolve()}" in merged
    # infer with --lora alone: the base model comes from the LoRA's cogtune_lora.json
    video = cogtune_here("infer", "--lora", out, "--prompt", "DEMO a cat", "--height", "32", "--width", "64",
                         "--num_frames", "5", "--num_inference_steps", "1", "--mixed_precision", "no",
                         "--video_output_dir", tmp_path / "videos")
    assert "(the one the LoRA was trained on)" in video.stderr and "video: " in video.stdout


def test_damaged_or_foreign_loras_are_refused_in_one_line(prepared, tmp_path):
    out = trained(prepared, "plain")
    lora = out / "pytorch_lora_weights.safetensors"
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(lora.read_bytes()[: lora.stat().st_size // 2])
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    pickled = tmp_path / "pickle.safetensors"
    pickled.write_bytes(pickle.dumps({"a": 1}))
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, other)
    for path, says in ((cut, "is not a whole safetensors file"), (empty, "is empty (0 bytes)"),
                       (pickled, "is not a whole safetensors file"), (other, "holds no LoRA tensors")):
        for command in (["export", "--format", "comfyui", "--lora", path, "--output", tmp_path / "x.safetensors"],
                        ["merge", "--lora", path, "--merged_dir", tmp_path / "m", "--pretrained_model_name_or_path",
                         prepared["model"]],
                        ["infer", "--lora", path, "--prompt", "x", "--pretrained_model_name_or_path",
                         prepared["model"]]):
            result = cogtune_here(*command, check=False)
            assert result.returncode == 2 and says in result.stderr and str(path) in result.stderr, (command, result)
            assert "Traceback" not in result.stderr
    before = lora.read_bytes()
    onto_itself = cogtune_here("export", "--format", "comfyui", "--lora", lora, "--output", lora, check=False)
    assert onto_itself.returncode == 2 and "is the LoRA being exported" in onto_itself.stderr
    assert lora.read_bytes() == before
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        denied = cogtune_here("export", "--format", "comfyui", "--lora", lora, "--output", locked / "x.safetensors",
                              check=False)
        assert denied.returncode == 2 and "Cannot write to" in denied.stderr
    merged = cogtune_here("merge", "--lora", lora, "--merged_dir", tmp_path / "nan", "--lora_scale", "nan", check=False)
    assert merged.returncode == 2 and "--lora_scale must be a finite number" in merged.stderr
    assert not (tmp_path / "nan").exists()
