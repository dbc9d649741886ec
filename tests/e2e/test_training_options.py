"""Training options beyond the reference (issue 21), each off by default: timestep sampling densities,
min-SNR weighting and caption dropout, checked against independent computations (the densities'
own distribution functions, the scheduler's alphas, the embeddings the transformer received)."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch

from cogtune.config import load_config
from cogtune.families import ModelConfigs
from cogtune.data_schema import TrainingBatch
from cogtune.families.objectives import NoiseSchedule, Objective
from cogtune.train.step import training_loss
from cogtune.util.draws import Draws

from conftest import cache_path_of, cogtune_here, write_config

@pytest.fixture(scope="module")
def spec_and_schedule(tiny_model):
    from diffusers import CogVideoXDDIMScheduler

    models = ModelConfigs.of(load_config("train", ["--pretrained_model_name_or_path", str(tiny_model)]))
    scheduler = CogVideoXDDIMScheduler.from_config(models.scheduler)
    return models.spec(), NoiseSchedule(scheduler.alphas_cumprod), scheduler


def make_batch(spec, rows: int, seed: int = 0) -> TrainingBatch:
    g = torch.Generator().manual_seed(seed)
    shape = (rows, spec.latent_channels, 3, 4, 6)
    video = {"mean": torch.randn(shape, generator=g), "logvar": torch.randn(shape, generator=g) - 3}
    caption = {"prompt_embeds": torch.randn(rows, spec.max_text_seq_length, spec.text_embed_dim, generator=g)}
    empty = {"prompt_embeds": torch.randn(spec.max_text_seq_length, spec.text_embed_dim, generator=g)}
    return TrainingBatch(video=video, caption=caption, first_frame={}, empty_caption=empty)


class Recorder:
    """Stands in for the transformer: returns a fixed prediction and keeps what it was given."""

    def __init__(self, prediction: torch.Tensor):
        self.prediction, self.calls = prediction, []

    def __call__(self, hidden_states, encoder_hidden_states, timestep, return_dict, **kwargs):
        self.calls.append((encoder_hidden_states, timestep))
        return (self.prediction.expand_as(hidden_states),)


def loss_of(spec, schedule, objective, batch, seed, transformer):
    return training_loss(transformer, batch, spec, Draws(torch.Generator().manual_seed(seed)), schedule, objective,
                         lambda *shape: {}, torch.float32, contextlib.nullcontext)


@pytest.mark.parametrize("gamma", [0.5, 5.0])
def test_min_snr_weights_each_samples_velocity_loss(spec_and_schedule, gamma):
    spec, schedule, scheduler = spec_and_schedule
    batch = make_batch(spec, 6)
    objective = Objective(snr_gamma=gamma, timestep_sampling="logit_normal")
    prediction = torch.randn(1, 1, spec.latent_channels, 4, 6, generator=torch.Generator().manual_seed(1))
    recorder = Recorder(prediction)
    weighted = loss_of(spec, schedule, objective, batch, 7, recorder)

    # Independently: the same step's x0 and noise, the scheduler's velocity and its alphas.
    inputs = spec.step_inputs(batch, Draws(torch.Generator().manual_seed(7)), schedule, objective)
    t = inputs.timesteps
    abar = scheduler.alphas_cumprod[t].double()
    noise = (inputs.x_t.double() - abar.sqrt().view(-1, 1, 1, 1, 1) * inputs.x0.double()) \
        / (1 - abar).sqrt().view(-1, 1, 1, 1, 1)
    velocity = scheduler.get_velocity(inputs.x0.double(), noise, t)
    per_sample = ((prediction.double() - velocity) ** 2).flatten(1).mean(1)
    snr = abar / (1 - abar)
    expected = (per_sample * torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) / (snr + 1)).mean()
    assert torch.equal(recorder.calls[0][1], t)
    assert math.isclose(weighted.item(), expected.item(), rel_tol=1e-4)
    unweighted = loss_of(spec, schedule, Objective(timestep_sampling="logit_normal"), batch, 7, recorder)
    assert math.isclose(unweighted.item(), per_sample.mean().item(), rel_tol=1e-4)


@pytest.mark.parametrize("technique", ["empty", "zero"])
def test_caption_dropout_replaces_captions_at_its_rate(spec_and_schedule, technique):
    spec, schedule, _ = spec_and_schedule
    p, rows, steps = 0.3, 16, 250
    batch = make_batch(spec, rows)
    objective = Objective(caption_dropout_p=p, caption_dropout_technique=technique)
    recorder = Recorder(torch.zeros(1))
    for seed in range(steps):
        loss_of(spec, schedule, objective, batch, seed, recorder)
    replacement = batch.empty_caption["prompt_embeds"] if technique == "empty" else torch.zeros_like(batch.empty_caption["prompt_embeds"])
    dropped = kept = 0
    for embeds, _ in recorder.calls:
        for row in range(rows):
            if torch.equal(embeds[row], replacement):
                dropped += 1
            else:
                assert torch.equal(embeds[row], batch.caption["prompt_embeds"][row])  # a kept caption is untouched
                kept += 1
    n = rows * steps
    assert abs(dropped / n - p) <= 5 * math.sqrt(p * (1 - p) / n)


def test_without_the_options_a_step_draws_what_it_drew_before(spec_and_schedule):
    """The defaults draw nothing more: the same generator state after the step as the reference's draws."""
    spec, schedule, _ = spec_and_schedule
    batch = make_batch(spec, 3)
    draws = Draws(torch.Generator().manual_seed(11))
    inputs = spec.step_inputs(batch, draws, schedule, Objective())
    g = torch.Generator().manual_seed(11)
    torch.randn(batch.video["mean"].shape, generator=g)  # posterior sample
    assert torch.equal(torch.randint(0, len(schedule), (3,), generator=g), inputs.timesteps)
    torch.randn(inputs.x0.shape, generator=g)  # noise
    assert torch.equal(draws.generator.get_state(), g.get_state())
    assert torch.equal(inputs.prompt_embeds, batch.caption["prompt_embeds"])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model, demo_data):
    """The demo data preprocessed once for this module's training runs, and the config that names it."""
    root = tmp_path_factory.mktemp("options")
    config = write_config(root / "c.toml", tiny_model, demo_data, root / "cache", root / "out", max_train_steps=2,
                          checkpointing_steps=1)
    cache = cache_path_of(cogtune_here("preprocess", "--config", config).stdout)
    return dict(root=root, config=config, cache=cache)


def losses_of(output_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (output_dir / "train_log.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_the_options_train_and_a_cache_without_the_empty_prompt_is_refused_clearly(prepared, tmp_path):
    flags = ["--caption_dropout_p", "0.5", "--timestep_sampling", "mode", "--snr_gamma", "5"]
    cogtune_here("train", "--config", prepared["config"], "--output_dir", tmp_path / "a", *flags)
    cogtune_here("train", "--config", prepared["config"], "--output_dir", tmp_path / "b")
    with_options, plain = losses_of(tmp_path / "a"), losses_of(tmp_path / "b")
    assert len(with_options) == len(plain) == 2 and all(map(math.isfinite, with_options))
    assert with_options != plain

    from cogtune import data_schema as schema

    stored = schema.validation_text_path(prepared["cache"], "")
    assert stored.is_file()  # preprocess always stores it
    moved = stored.rename(tmp_path / "kept.safetensors")
    try:
        result = cogtune_here("train", "--config", prepared["config"], "--output_dir", tmp_path / "c", *flags,
                              check=False)
        assert result.returncode == 2 and "holds no embedding of the empty prompt" in result.stderr
        assert "--caption_dropout_technique zero" in result.stderr and not (tmp_path / "c" / "checkpoint-1").exists()
        cogtune_here("train", "--config", prepared["config"], "--output_dir", tmp_path / "d", *flags,
                     "--caption_dropout_technique", "zero")
    finally:
        moved.rename(stored)  # (an older cache: no empty-prompt embedding, until then)


def trained(prepared, output_dir: Path, *flags: str):
    """A training run in this process: its result holds the trained transformer."""
    from cogtune import train
    from cogtune.config import data_settings

    argv = ["--config", str(prepared["config"]), "--output_dir", str(output_dir), *flags]
    config = load_config("train", argv)
    return train.run(config, data_settings(config, argv))


@pytest.mark.parametrize("flags", [["--use_dora"], ["--use_rslora", "--lora_alpha", "8"],
                                   ["--lora_target_preset", "all_linear"]], ids=["dora", "rslora", "all_linear"])
def test_lora_variants_load_into_diffusers_and_reproduce_the_trained_transformer(prepared, tiny_model, tmp_path, flags):
    from diffusers import CogVideoXPipeline
    from peft.tuners.lora import LoraLayer

    from test_end_to_end import transformer_output

    result = trained(prepared, tmp_path / "out", *flags)
    ours = result.transformer.to(torch.float32).eval()
    layers = {name.removeprefix("base_model.model."): m for name, m in ours.named_modules() if isinstance(m, LoraLayer)}
    if "--lora_target_preset" in flags:  # every linear layer of the blocks, and nothing outside them
        linear = {name for name, m in ours.named_modules() if isinstance(m, LoraLayer) or (
            isinstance(m, torch.nn.Linear) and ".lora_" not in name and ".base_layer" not in name)}
        in_blocks = {name for name in linear if name.startswith("transformer_blocks.")}
        assert in_blocks == {name for name in layers} and len(in_blocks) == 8 * len(ours.transformer_blocks)
    layer = next(iter(layers.values()))
    if "--use_dora" in flags:
        assert layer.use_dora["default"]
    if "--use_rslora" in flags:
        assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4))  # alpha / sqrt(rank 4)

    pipe = CogVideoXPipeline.from_pretrained(tiny_model)
    base = transformer_output(pipe.transformer)
    pipe.load_lora_weights(str(tmp_path / "out"), weight_name="pytorch_lora_weights.safetensors")
    loaded = transformer_output(pipe.transformer)
    assert not torch.allclose(base, loaded, atol=1e-4)
    assert torch.allclose(loaded, transformer_output(ours), atol=1e-5)


def lora_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "pytorch_lora_weights.safetensors")


def test_init_lora_starts_from_ours_or_a_diffusers_script_checkpoint(prepared, tmp_path):
    from diffusers import CogVideoXPipeline

    first = lora_tensors(trained(prepared, tmp_path / "first").lora_path.parent)
    # A diffusers-script checkpoint-N folder: its save hook writes the LoRA alone, with no alpha recorded.
    script = tmp_path / "script-out" / "checkpoint-2"
    CogVideoXPipeline.save_lora_weights(script, transformer_lora_layers={
        k.removeprefix("transformer."): v for k, v in first.items()})
    still = ["--learning_rate", "0", "--max_train_steps", "1"]  # the weights do not move: the start is the end
    for i, source in enumerate([tmp_path / "first", tmp_path / "first" / "pytorch_lora_weights.safetensors", script]):
        out = tmp_path / f"warm-{i}"
        cogtune_here("train", "--config", prepared["config"], "--output_dir", out, "--init_lora", source, *still)
        again = lora_tensors(out)
        assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
        assert json.loads((out / "cogtune_lora.json").read_text())["init_lora"] == str(source)

    cold = tmp_path / "cold"
    cogtune_here("train", "--config", prepared["config"], "--output_dir", cold, *still)
    assert losses_of(cold) != losses_of(tmp_path / "warm-0")  # the warm start changes the prediction

    for flags, says in ((["--rank", "8"], "has rank 4; this run has --rank 8"),
                        (["--lora_alpha", "3"], "was trained with lora_alpha 2"),
                        (["--lora_target_preset", "attention_ffn"], None)):
        result = cogtune_here("train", "--config", prepared["config"], "--output_dir", tmp_path / "x",
                              "--init_lora", tmp_path / "first", *still, *flags, check=False)
        if says:
            assert result.returncode == 2 and says in result.stderr, result.stderr
        else:  # more targets than the LoRA had: those start new, and the run says how many
            assert result.returncode == 0 and "(8 of 12 adapted layers; the others new)" in result.stderr


def test_merge_writes_a_pipeline_equal_to_base_plus_lora(prepared, tiny_model, tmp_path):
    from diffusers import CogVideoXPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    from test_end_to_end import transformer_output

    lora = trained(prepared, tmp_path / "out", "--use_dora").lora_path.parent
    cogtune_here("merge", "--lora", lora, "--merged_dir", tmp_path / "merged", "--lora_scale", "0.7", "--dtype", "no")
    merged = CogVideoXPipeline.from_pretrained(tmp_path / "merged")
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.transformer.modules())  # nothing left to load

    pipe = CogVideoXPipeline.from_pretrained(tiny_model)
    base = transformer_output(pipe.transformer)
    pipe.load_lora_weights(str(lora), weight_name="pytorch_lora_weights.safetensors", adapter_name="x")
    pipe.set_adapters(["x"], [0.7])
    expected = transformer_output(pipe.transformer)
    assert not torch.allclose(base, expected, atol=1e-4)
    assert torch.allclose(transformer_output(merged.transformer), expected, atol=1e-5)
    assert torch.equal(merged.vae.decoder.conv_in.conv.weight, pipe.vae.decoder.conv_in.conv.weight)  # only the transformer

    half = cogtune_here("merge", "--lora", lora, "--merged_dir", tmp_path / "bf16", "--lora_scale", "0.7")
    assert str(tmp_path / "bf16") in half.stdout
    from safetensors import safe_open

    saved = set()
    for shard in (tmp_path / "bf16" / "transformer").glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            saved |= {f.get_slice(key).get_dtype() for key in f.keys()}
    assert saved == {"BF16"}
    stored = CogVideoXPipeline.from_pretrained(tmp_path / "bf16").transformer
    assert torch.allclose(transformer_output(stored.float()), expected, atol=0.05 * expected.abs().max().item())

    again = cogtune_here("merge", "--lora", lora, "--merged_dir", tmp_path / "bf16", check=False)
    assert again.returncode == 2 and "exists and is not empty" in again.stderr


def test_ema_follows_its_recurrence_and_resumes_exactly(prepared, tmp_path):
    from safetensors.torch import load_file

    decay = 0.2  # the warm-up's value is below it at step 2 and above it from step 3: both regimes are exercised
    common = ["--config", prepared["config"], "--checkpointing_steps", "1"]
    cogtune_here("train", *common, "--output_dir", tmp_path / "start", "--learning_rate", "0", "--max_train_steps", "1")
    cogtune_here("train", *common, "--output_dir", tmp_path / "ema", "--max_train_steps", "4", "--use_ema",
                 "--ema_decay", str(decay))
    # The recurrence, from the LoRA after each step: e0 = the LoRA at the start, e_k = d_k e_(k-1) + (1 - d_k) p_k,
    # with diffusers' warm-up d_1 = 0, d_k = min(decay, (1 + n) / (10 + n)) for n = k - 1.
    expected = {k: v.double() for k, v in lora_tensors(tmp_path / "start").items()}
    for k in range(1, 5):
        d = 0.0 if k == 1 else min(decay, k / (9 + k))
        p = lora_tensors(tmp_path / "ema" / f"checkpoint-{k}")
        expected = {name: d * e + (1 - d) * p[name].double() for name, e in expected.items()}
        saved = load_file(tmp_path / "ema" / f"checkpoint-{k}" / "pytorch_lora_weights_ema.safetensors")
        assert saved.keys() == expected.keys()
        assert all(torch.allclose(saved[n].double(), expected[n], rtol=1e-5, atol=1e-8) for n in saved), k
    final = load_file(tmp_path / "ema" / "pytorch_lora_weights_ema.safetensors")
    assert all(torch.equal(final[n], saved[n]) for n in final)
    assert not all(torch.equal(final[n], lora_tensors(tmp_path / "ema")[n]) for n in final)

    # Stopped after step 2 and resumed: the same EMA, bit for bit.
    cogtune_here("train", *common, "--output_dir", tmp_path / "resumed", "--max_train_steps", "2", "--use_ema",
                 "--ema_decay", str(decay))
    cogtune_here("train", *common, "--output_dir", tmp_path / "resumed", "--max_train_steps", "4", "--use_ema",
                 "--ema_decay", str(decay), "--resume_from_checkpoint", "latest")
    again = load_file(tmp_path / "resumed" / "pytorch_lora_weights_ema.safetensors")
    assert all(torch.equal(again[n], final[n]) for n in final)

    # The EMA file loads as a LoRA.
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(load_config("train", ["--config", str(prepared["config"])])
                                             .pretrained_model_name_or_path)
    pipe.load_lora_weights(str(tmp_path / "ema"), weight_name="pytorch_lora_weights_ema.safetensors")
