"""`cogtune preprocess --dry_run`: the T5 and VAE stages' expected peak GPU memory, from configs alone,
against the live tensor bytes of the same stages run on the CPU (the tolerance of the training
estimate), and T5 freed before the VAE loads."""

from __future__ import annotations

import pytest
import torch

from cogtune.config import load_config
from cogtune.families import ModelConfigs
from cogtune.preprocess.encode import _load_text_encoder
from cogtune.preprocess.memory import t5_estimate, vae_estimate
from cogtune.util.tensor_bytes import LiveTensorBytes

from conftest import cogtune_here, write_config
from test_memory import MAX_OVER, MAX_UNDER


def measured(model: torch.nn.Module, run, inputs=()) -> int:
    """Peak live bytes of `run` beyond the model's own tensors (inputs counted), on the CPU."""
    own = [*model.parameters(), *model.buffers()]
    with torch.no_grad(), LiveTensorBytes([*own, *inputs]) as live:
        weights = sum(t.untyped_storage().nbytes() for t in own)
        run()
    return live.peak - weights


def close(estimate: int, actual: int) -> bool:
    return actual * (1 - MAX_UNDER) <= estimate <= actual * (1 + MAX_OVER)


@pytest.mark.parametrize("tiling", [False, True])
def test_the_vae_estimate_follows_the_measured_encoding(tiny_model, tiling):
    # 272x400 is over the VAE's tile size (240x360): tiling splits it
    config = load_config("preprocess", ["--pretrained_model_name_or_path", str(tiny_model), "--instance_data_root",
                                        ".", "--mixed_precision", "no"] + (["--enable_tiling"] if tiling else []))
    models = ModelConfigs.of(config)
    vae = models.spec().load_vae(models, torch.device("cpu"), torch.float32, config.enable_slicing, config.enable_tiling)
    clips = torch.randn(1, 3, 9, 272, 400)
    actual = measured(vae, lambda: vae.encode(clips), [clips])
    estimate = vae_estimate(config, models, (9, 272, 400), tiling, False)
    assert close(estimate.activations, actual), (estimate, actual)
    assert estimate.weights == sum(p.numel() * 4 for p in vae.parameters())


def test_the_t5_estimate_follows_the_measured_encoding(tiny_model):
    config = load_config("preprocess", ["--pretrained_model_name_or_path", str(tiny_model), "--instance_data_root",
                                        ".", "--mixed_precision", "no"])
    models = ModelConfigs.of(config)
    _, text_encoder = _load_text_encoder(config, models)
    tokens = torch.ones(1, models.transformer["max_text_seq_length"], dtype=torch.long)  # one caption at a time
    actual = measured(text_encoder, lambda: text_encoder(tokens), [tokens])
    estimate = t5_estimate(config, models)
    assert close(estimate.activations, actual), (estimate, actual)
    assert estimate.weights == sum(p.numel() * 4 for p in text_encoder.parameters())


def test_preprocess_dry_run_prints_both_stages_and_loads_no_weights(tmp_path, tiny_model, demo_data, monkeypatch):
    from diffusers import AutoencoderKLCogVideoX
    from transformers import T5EncoderModel

    def refuse(*args, **kwargs):
        raise AssertionError("--dry_run loaded weights")

    monkeypatch.setattr(AutoencoderKLCogVideoX, "from_pretrained", refuse)
    monkeypatch.setattr(T5EncoderModel, "from_pretrained", refuse)
    config = write_config(tmp_path / "c.toml", tiny_model, demo_data, tmp_path / "cache", tmp_path / "out")
    out = cogtune_here("preprocess", "--config", config, "--dry_run", "--enable_tiling").stdout
    assert "clips of 9x32x64 (the largest)" in out and "T5, one caption at a time: weights" in out
    assert "VAE tiled: weights" in out and "(without --enable_tiling:" in out and "expected peak:" in out
    assert not (tmp_path / "cache").exists()
    quantized = cogtune_here("preprocess", "--config", config, "--dry_run", "--text_encoder_quant_backend",
                             "quanto").stdout
    assert "T5 quantized, quanto int8" in quantized


def test_a_vae_that_would_not_fit_stops_with_the_flag_to_add(tiny_model):
    from cogtune.preprocess.memory import vae_room_problem

    def settings(*flags):
        return load_config("preprocess", ["--pretrained_model_name_or_path", str(tiny_model), "--instance_data_root",
                                          ".", "--height", "272", "--width", "400", "--max_num_frames", "9", *flags])

    config = settings()
    models = ModelConfigs.of(config)
    need = vae_estimate(config, models, (9, 272, 400), False, False).total
    assert vae_room_problem(config, models, int(need * 1.2)) is None
    problem = vae_room_problem(config, models, need)  # no room for the allocator's tenth
    tiled = vae_estimate(config, models, (9, 272, 400), True, False).total
    assert "encode clips of 9x272x400" in problem and "run again with --enable_tiling" in problem
    from cogtune.util.tensor_bytes import gib

    assert f"(expected {gib(tiled)})" in problem and tiled < need
    already = settings("--enable_tiling")
    assert "lower --height/--width or the frame counts" in vae_room_problem(already, models, 1)


def test_auto_tiling_takes_tiling_only_where_the_settings_given_do_not_fit(tiny_model):
    from cogtune.preprocess.memory import choose_vae_memory

    config = load_config("preprocess", ["--pretrained_model_name_or_path", str(tiny_model), "--instance_data_root",
                                        ".", "--height", "272", "--width", "400", "--max_num_frames", "9",
                                        "--auto_tiling"])
    models = ModelConfigs.of(config)
    need = {t: vae_estimate(config, models, (9, 272, 400), t, False).total for t in (False, True)}
    assert need[True] < need[False]

    def chosen(free, started=False):
        choice = choose_vae_memory(config, models, int(free) + 1, started)
        return choice.tiling, choice.fits

    assert chosen(need[False] * 1.1) == (False, True)
    assert chosen(need[False] * 1.09) == (True, need[True] * 1.1 <= need[False] * 1.09)
    assert chosen(need[True]) == (True, False)  # nothing fits: the most frugal; preprocess stops
    assert chosen(need[False] * 10, started=True) == (True, True)  # continues the tiled cache
