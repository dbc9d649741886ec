"""--fp8_compute: torchao's Float8Linear takes the place of exactly the frozen linear layers of the blocks
(never a LoRA's own layers, nothing outside the blocks), the first loss stays within a stated tolerance
of bf16's where this CPU runs FP8 matmuls, and it is refused where a GPU cannot run it."""

import pytest
import torch
from contract import CONTRACT, training_transformer, transformer_loss

from cogtune import quantize
from cogtune.config import load_config
from cogtune.errors import CogtuneError

# FP8 e4m3 keeps 3 mantissa bits (a relative step of 1/16 per element); over the tiny models' matmuls and the
# mean of the loss the rounding averages out: the first loss moves by at most 0.25% on every family here.
# The stated tolerance is 1%.
TOLERANCE = 0.01


@pytest.mark.parametrize("name", list(CONTRACT))
def test_fp8_compute_converts_exactly_the_frozen_linear_layers_of_the_blocks(models, name):
    variant, settings = CONTRACT[name]
    transformer, spec = training_transformer(models[variant], settings, precision="bf16")
    in_blocks = {f"{prefix}.{index}" for prefix, blocks in transformer.named_children()
                 if blocks is spec.blocks(transformer) for index in range(len(blocks))}
    linear = {name: module for name, module in transformer.named_modules() if type(module) is torch.nn.Linear}
    expected = {name for name, module in linear.items()
                if any(name.startswith(block + ".") for block in in_blocks) and ".lora_" not in name
                and module.in_features % 16 == 0 and module.out_features % 16 == 0}
    assert expected and any(name.endswith(".base_layer") for name in expected)  # the LoRA's frozen layers too
    converted = quantize.enable_fp8_compute(transformer, spec.blocks(transformer))
    from torchao.float8.float8_linear import Float8Linear

    assert set(converted) == expected
    assert {name for name, module in transformer.named_modules() if isinstance(module, Float8Linear)} == expected
    for name, parameter in transformer.named_parameters():  # the LoRA: trained, in fp32, unconverted
        assert parameter.requires_grad == ("lora_" in name)
        if "lora_" in name:
            assert parameter.dtype == torch.float32


@pytest.mark.parametrize("name", list(CONTRACT))
def test_the_first_loss_under_fp8_compute_is_within_the_stated_tolerance_of_bf16(models, name):
    variant, settings = CONTRACT[name]
    transformer, spec = training_transformer(models[variant], settings, precision="bf16")
    bf16, _ = transformer_loss(transformer, spec, backward=False, dtype=torch.bfloat16)
    quantize.enable_fp8_compute(transformer, spec.blocks(transformer))
    fp8, gradients = transformer_loss(transformer, spec, backward=True, dtype=torch.bfloat16)
    assert fp8 != bf16  # the FP8 matmuls ran
    assert abs(fp8 - bf16) <= TOLERANCE * bf16
    assert all(torch.isfinite(g).all() for g in gradients.values()) and any(g.abs().sum() > 0 for g in gradients.values())


def test_fp8_compute_is_refused_without_fp8_tensor_cores_and_beside_what_it_replaces():
    with pytest.raises(CogtuneError, match="no(ne)? on the cpu"):
        quantize.require_fp8_compute(torch.device("cpu"))
    base = ["--pretrained_model_name_or_path", "m", "--fp8_compute"]
    with pytest.raises(CogtuneError, match="needs --mixed_precision bf16"):
        load_config("train", [*base, "--mixed_precision", "fp16"])
    with pytest.raises(CogtuneError, match="pick one"):
        load_config("train", [*base, "--quant_backend", "torchao"])
    with pytest.raises(CogtuneError, match="without --layerwise_casting_storage_dtype"):
        load_config("train", [*base, "--layerwise_casting_storage_dtype", "float8_e4m3fn"])


def test_the_estimate_counts_the_weights_as_fp8_compute_stores_them(models):
    """Float8Linear keeps each weight as it was stored (bf16) and casts it to fp8 for each matmul: the
    estimate's weights are bf16's."""
    from cogtune.families import ModelConfigs
    from cogtune.train.memory import memory_estimate

    argv = ["--pretrained_model_name_or_path", str(models["5b"]), "--mixed_precision", "bf16",
            "--gradient_checkpointing"]
    plain = load_config("train", argv)
    configs = ModelConfigs.of(plain)
    shape = [16, 3, 4, 8]
    assert memory_estimate(load_config("train", [*argv, "--fp8_compute"]), configs, shape).weights == \
        memory_estimate(plain, configs, shape).weights
