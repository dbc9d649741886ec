"""The memory and speed options of `cogtune train`, and the `--dry_run` estimate against measured peaks."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from cogtune.config import load_config
from cogtune.families import ModelConfigs
from cogtune.train.memory import memory_estimate
from cogtune.util.tensor_bytes import LiveTensorBytes
from cogtune.train.model import build_transformer
from cogtune.config.training import OptimizerArgs
from cogtune.train.optim import make_optimizer

from conftest import cogtune_here, write_config

# The stated tolerance: the estimate is at most 15% above the measured peak and at most 5% below it
# in fp32, at most 10% below it under bf16 autocast (whose fp32 ops the meta pass does not see).
MAX_OVER, MAX_UNDER, MAX_UNDER_BF16 = 0.15, 0.05, 0.10


def inner_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors behind a tensor: itself, or a tensor subclass's parts (quantized weights)."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return [inner for name in names for inner in inner_tensors(getattr(tensor, name))]
    return [tensor]


def measured_peak(config, models, latent_shape: list[int]) -> int:
    """Live tensor bytes at the peak of two real training steps on the CPU (forward, loss, backward, optimizer)."""
    spec = models.spec()
    transformer = build_transformer(config, models, spec, torch.device("cpu"))
    lora = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = make_optimizer(lora, OptimizerArgs.of(config), 1e-4, config.offload_optimizer)
    channels, frames, height, width = latent_shape
    frames += spec.frame_padding(frames)
    batch = config.train_batch_size
    torch.manual_seed(0)
    inputs = dict(hidden_states=torch.randn(batch, frames, transformer.config.in_channels, height, width),
                  encoder_hidden_states=torch.randn(batch, spec.max_text_seq_length, spec.text_embed_dim),
                  timestep=torch.tensor([500] * batch),
                  image_rotary_emb=spec.rotary_embeddings(height * 8, width * 8, frames, "cpu"),
                  ofs=spec.ofs(batch, "cpu"))
    existing = [inner for t in [*transformer.parameters(), *transformer.buffers()] for inner in inner_tensors(t)]
    existing += [t for v in inputs.values() for t in (v if isinstance(v, tuple) else (v,)) if t is not None]
    with LiveTensorBytes(existing) as live:
        for _ in range(2):  # the second step also holds the optimizer state
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.mixed_precision == "bf16"):
                pred = transformer(**inputs, return_dict=False)[0]
            pred.float().pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            del pred
    return live.peak


@pytest.fixture(scope="module")
def models(tiny_models):
    """The configs of tiny models of three families."""
    return {family: ModelConfigs.load(str(tiny_models(family))) for family in ("2b", "5b", "1.5-5b-i2v")}


@pytest.mark.parametrize("family, latent_shape, flags", [
    ("2b", [4, 5, 16, 24], []),
    ("2b", [4, 5, 16, 24], ["--mixed_precision", "bf16"]),
    ("5b", [4, 3, 16, 16], ["--mixed_precision", "bf16", "--gradient_checkpointing"]),
    ("2b", [4, 5, 16, 24], ["--gradient_checkpointing"]),
    ("5b", [4, 3, 16, 16], ["--train_batch_size", "2", "--rank", "16"]),
    ("5b", [4, 3, 16, 16], ["--gradient_checkpointing", "--rank", "16"]),
    ("1.5-5b-i2v", [4, 3, 16, 16], []),
    ("2b", [4, 5, 16, 24], ["--layerwise_casting_storage_dtype", "float8_e4m3fn", "--gradient_checkpointing"]),
])
def test_estimate_is_close_to_the_measured_peak(models, family, latent_shape, flags):
    config = load_config("train", ["--pretrained_model_name_or_path", models[family].source[
        "pretrained_model_name_or_path"], "--mixed_precision", "no", "--rank", "8", *flags])
    estimate = memory_estimate(config, models[family], latent_shape)
    measured = measured_peak(config, models[family], latent_shape)
    under = MAX_UNDER_BF16 if config.mixed_precision == "bf16" else MAX_UNDER
    assert measured * (1 - under) <= estimate.total <= measured * (1 + MAX_OVER), (estimate, measured)


def test_checkpointing_and_optimizer_options_shrink_the_estimate(models):
    model = models["5b"].source["pretrained_model_name_or_path"]

    def total(*flags):
        config = load_config("train", ["--pretrained_model_name_or_path", model, "--mixed_precision", "no", *flags])
        return memory_estimate(config, models["5b"], [4, 5, 32, 32])

    plain = total()
    assert total("--gradient_checkpointing").activations < plain.activations * 0.6  # two layers: one recomputed
    assert total("--offload_optimizer").optimizer == 0 < plain.optimizer
    assert total("--layerwise_casting_storage_dtype", "float8_e5m2").weights < plain.weights
    assert plain.optimizer == 2 * plain.lora  # Adam: two fp32 tensors per fp32 LoRA parameter


def test_dry_run_prints_the_estimate_and_loads_no_weights(tmp_path, tiny_model, demo_data, monkeypatch):
    from diffusers import CogVideoXTransformer3DModel

    def refuse(*args, **kwargs):
        raise AssertionError("--dry_run loaded weights")

    monkeypatch.setattr(CogVideoXTransformer3DModel, "from_pretrained", refuse)
    config = write_config(tmp_path / "c.toml", tiny_model, demo_data, tmp_path / "cache", tmp_path / "out")
    result = cogtune_here("train", "--config", config, "--dry_run", "--gradient_checkpointing")
    assert "expected peak GPU memory" in result.stdout
    assert "saved activations, with gradient checkpointing" in result.stdout
    assert "from the preprocess settings (no cache yet)" in result.stdout  # nothing preprocessed here
    assert not (tmp_path / "out").exists()


def train_lora(tmp_path, tiny_model, demo_data, name, *flags):
    config = write_config(tmp_path / f"{name}.toml", tiny_model, demo_data, tmp_path / "cache", tmp_path / name,
                          max_train_steps=3, checkpointing_steps=2)
    cogtune_here("preprocess", "--config", config)
    cogtune_here("train", "--config", config, *flags)
    return load_file(tmp_path / name / "pytorch_lora_weights.safetensors")


def test_offloaded_optimizer_trains_the_same_lora(tmp_path, tiny_model, demo_data):
    plain = train_lora(tmp_path, tiny_model, demo_data, "plain")
    offloaded = train_lora(tmp_path, tiny_model, demo_data, "offloaded", "--offload_optimizer")
    assert plain.keys() == offloaded.keys()
    for key in plain:
        assert torch.allclose(plain[key], offloaded[key], rtol=1e-5, atol=1e-7), key
    assert any(plain[key].abs().sum() > 0 for key in plain if "lora_B" in key)  # it trained
    # Resuming an offloaded run from its checkpoint gives the same LoRA again.
    (tmp_path / "offloaded" / "pytorch_lora_weights.safetensors").unlink()
    resumed = train_lora(tmp_path, tiny_model, demo_data, "offloaded", "--offload_optimizer",
                         "--resume_from_checkpoint", str(tmp_path / "offloaded" / "checkpoint-2"))
    for key in plain:
        assert torch.allclose(resumed[key], offloaded[key], rtol=1e-5, atol=1e-7), key


def test_fp8_storage_trains(tmp_path, tiny_model, demo_data):
    weights = train_lora(tmp_path, tiny_model, demo_data, "fp8", "--layerwise_casting_storage_dtype",
                         "float8_e4m3fn", "--gradient_checkpointing")
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())
    assert any(weights[key].abs().sum() > 0 for key in weights if "lora_B" in key)


def test_fp8_storage_keeps_lora_and_norms_out_of_fp8(tiny_model):
    config = load_config("train", ["--pretrained_model_name_or_path", str(tiny_model), "--mixed_precision", "no",
                                   "--layerwise_casting_storage_dtype", "float8_e4m3fn"])
    models = ModelConfigs.load(str(tiny_model))
    transformer = build_transformer(config, models, models.spec(), torch.device("cpu"))
    dtypes = {name: p.dtype for name, p in transformer.named_parameters()}
    assert dtypes["transformer_blocks.0.attn1.to_q.base_layer.weight"] == torch.float8_e4m3fn
    assert dtypes["transformer_blocks.0.ff.net.0.proj.weight"] == torch.float8_e4m3fn
    assert all(dtype == torch.float32 for name, dtype in dtypes.items() if "lora_" in name or "norm" in name)


def test_optimizer_options_refuse_combinations_that_cannot_work():
    from cogtune.errors import CogtuneError

    with pytest.raises(CogtuneError, match="pick one"):  # refused with the settings, before any model loads
        load_config("train", ["--pretrained_model_name_or_path", "m", "--offload_optimizer", "--use_8bit_adam"])
    with pytest.raises(CogtuneError, match="use bf16"):
        load_config("train", ["--pretrained_model_name_or_path", "m", "--offload_optimizer", "--mixed_precision",
                              "fp16"])


def test_compiled_blocks_train_like_plain_ones(tmp_path, tiny_model, demo_data):
    plain = train_lora(tmp_path, tiny_model, demo_data, "plain")
    compiled = train_lora(tmp_path, tiny_model, demo_data, "compiled", "--compile")
    assert plain and plain.keys() == compiled.keys()
    for key in plain:
        assert torch.allclose(plain[key], compiled[key], rtol=1e-3, atol=1e-5), key
