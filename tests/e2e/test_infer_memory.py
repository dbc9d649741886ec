"""`cogtune infer --dry_run`: each stage's expected memory against the live tensor bytes of the same
stage on the CPU, and what each offload leaves on the GPU at once."""

from __future__ import annotations

import torch

from cogtune.config import load_config
from cogtune.families import ModelConfigs
from cogtune.infer_memory import parts, peak

from conftest import cogtune_here, write_config
from test_preprocess_memory import close, measured


def test_each_stage_estimate_follows_the_measured_stage(tiny_model):
    from diffusers import CogVideoXPipeline

    config = load_config("infer", ["--pretrained_model_name_or_path", str(tiny_model), "--prompt", "a", "--num_frames",
                                   "9", "--height", "64", "--width", "96", "--mixed_precision", "no"])
    models = ModelConfigs.of(config)
    found = {part.name: part for part in parts(config, models)}
    pipe = CogVideoXPipeline.from_pretrained(tiny_model)
    spec = models.spec()
    latents = torch.randn(2, 3, 4, 8, 12)  # [B, F, C, H, W]: 9 frames of 64x96, the prompt and the negative one
    text = torch.randn(2, spec.max_text_seq_length, spec.text_embed_dim)
    actual = measured(pipe.transformer, lambda: pipe.transformer(hidden_states=latents, encoder_hidden_states=text,
                                                                 timestep=torch.tensor([500, 500]), return_dict=False))
    assert close(found["transformer"].activations, actual), (found["transformer"], actual)
    z = torch.randn(1, 4, 3, 8, 12)
    actual = measured(pipe.vae, lambda: pipe.vae.decode(z))
    assert close(found["VAE"].activations, actual), (found["VAE"], actual)
    weights = {name: sum(t.numel() * 4 for t in [*getattr(pipe, attr).parameters(), *getattr(pipe, attr).buffers()])
               for name, attr in (("T5", "text_encoder"), ("transformer", "transformer"), ("VAE", "vae"))}
    assert weights == {name: part.weights for name, part in found.items()}


def test_offload_and_quantization_lower_the_estimate_and_dry_run_loads_nothing(tmp_path, tiny_model, demo_data,
                                                                               monkeypatch):
    from diffusers import CogVideoXPipeline

    def refuse(*args, **kwargs):
        raise AssertionError("--dry_run loaded weights")

    monkeypatch.setattr(CogVideoXPipeline, "from_pretrained", refuse)
    config = write_config(tmp_path / "c.toml", tiny_model, demo_data, tmp_path / "cache", tmp_path / "out")

    def estimated(*flags):
        settings = load_config("infer", ["--config", str(config), *flags])
        return peak(parts(settings, ModelConfigs.of(settings)), settings)

    plain, model, sequential = (estimated(), estimated("--enable_model_cpu_offload"),
                                estimated("--enable_sequential_cpu_offload"))
    assert sequential < model < plain
    assert estimated("--quant_backend", "torchao") < plain
    out = cogtune_here("infer", "--config", config, "--dry_run", "--quant_backend", "quanto").stdout
    assert "quanto int8 for transformer and text_encoder" in out and "expected peak:" in out
    assert not (tmp_path / "out").exists()
