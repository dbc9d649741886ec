"""Block swap (--blocks_to_swap): the swapped blocks' weights are on the device only around their
own forward, recomputation and backward pass, training gives exactly the LoRA it gives without
swapping, and the estimate follows the measured peak. On a CPU the "device copy" is a second CPU
tensor, and a block that is away holds empty tensors, so any use of it fails."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from cogtune.config import load_config
from cogtune.errors import CogtuneError
from cogtune.families import ModelConfigs
from cogtune.train.memory import memory_estimate
from cogtune.train.swap import BlockSwap, in_backward

from conftest import write_config
from test_memory import MAX_OVER, MAX_UNDER, measured_peak, train_lora

LAYERS = 6


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory) -> Path:
    """The tiny 2b pipeline with a transformer of LAYERS blocks."""
    from diffusers import CogVideoXTransformer3DModel

    from cogtune.dev.tiny import make_tiny_pipeline

    pipeline = make_tiny_pipeline("2b")
    config = dict(pipeline.transformer.config, num_layers=LAYERS)
    torch.manual_seed(0)
    pipeline.transformer = CogVideoXTransformer3DModel.from_config(config)
    folder = tmp_path_factory.mktemp("deep") / "model"
    pipeline.save_pretrained(folder)
    return folder


def test_swapping_trains_exactly_the_same_lora(tmp_path, tiny_model, demo_data):
    plain = train_lora(tmp_path, tiny_model, demo_data, "plain", "--gradient_checkpointing")
    swapped = train_lora(tmp_path, tiny_model, demo_data, "swapped", "--gradient_checkpointing", "--blocks_to_swap", "1")
    assert plain.keys() == swapped.keys()
    for key in plain:
        assert torch.equal(plain[key], swapped[key]), key


def test_swapped_blocks_are_resident_only_around_their_own_work(deep_model):
    from cogtune.train.model import build_transformer

    models = ModelConfigs.load(str(deep_model))
    config = load_config("train", ["--pretrained_model_name_or_path", str(deep_model), "--mixed_precision", "no",
                                   "--gradient_checkpointing", "--rank", "4"])
    reference = build_transformer(config, models, models.spec(), torch.device("cpu"))
    swapped = copy.deepcopy(reference)  # (a copy before any pass)
    swap = BlockSwap(swapped.transformer_blocks, 4, torch.device("cpu"))  # blocks 2..5 swapped
    assert swap.first == 2 and not swap.resident
    seen = []
    for i, block in enumerate(swapped.transformer_blocks):
        block.register_forward_pre_hook(lambda module, args, i=i: seen.append((i, in_backward(), set(swap.resident))))
    torch.manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 3, 4, 4, 8), encoder_hidden_states=torch.randn(1, 32, 32),
                  timestep=torch.tensor([500]))
    grads = []
    # The first pass of a process differs in the last bits from later ones (the CPU kernels' first
    # call), so an unswapped copy's second pass is what the swapped one must equal, exactly.
    for model in (reference, copy.deepcopy(reference), swapped):
        model(**inputs, return_dict=False)[0].pow(2).mean().backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    assert grads[1].keys() == grads[2].keys()
    for name in grads[1]:
        assert torch.equal(grads[1][name], grads[2][name]), name
    forward = [(i, resident) for i, backward, resident in seen if not backward]
    backward = [(i, resident) for i, backward, resident in seen if backward]
    assert [i for i, _ in forward] == list(range(LAYERS)) and [i for i, _ in backward] == list(reversed(range(LAYERS)))
    # As block i starts (after the swap's own hook): i itself, and the next block in the pass's
    # direction, being prefetched; the block whose backward pass is done has gone.
    for i, resident in forward:
        assert resident <= {i, i + 1} and (i < 2 or i in resident) and (i + 1 in (1, LAYERS) or i + 1 in resident), (i, resident)
    for i, resident in backward:
        assert resident <= {i, i - 1} and (i < 2 or i in resident) and (i - 1 < 2 or i - 1 in resident), (i, resident)
    assert swap.loads == 8  # each swapped block: once for the forward pass, once for the backward pass
    assert len(swap.resident) <= 1  # what the backward pass left: block 2, sent away by the next step


def test_the_estimate_with_swapped_blocks_follows_the_measured_peak(deep_model):
    models = ModelConfigs.load(str(deep_model))

    def config(*flags):
        return load_config("train", ["--pretrained_model_name_or_path", str(deep_model), "--mixed_precision", "no",
                                     "--rank", "8", "--gradient_checkpointing", *flags])

    shape = [4, 3, 16, 24]
    swapped, plain = memory_estimate(config("--blocks_to_swap", "4"), models, shape), memory_estimate(config(), models, shape)
    assert swapped.weights < plain.weights and swapped.activations == plain.activations
    measured = measured_peak(config("--blocks_to_swap", "4"), models, shape)
    assert measured * (1 - MAX_UNDER) <= swapped.total <= measured * (1 + MAX_OVER), (swapped, measured)


def test_swapping_needs_checkpointing_and_a_block_count_within_the_model(tmp_path, tiny_model, demo_data):
    config = write_config(tmp_path / "c.toml", tiny_model, demo_data, tmp_path / "cache", tmp_path / "out")
    with pytest.raises(CogtuneError, match="needs --gradient_checkpointing"):
        load_config("train", ["--config", str(config), "--blocks_to_swap", "1"])
    with pytest.raises(CogtuneError, match="--compile"):
        load_config("train", ["--config", str(config), "--blocks_to_swap", "1", "--gradient_checkpointing", "--compile"])
    with pytest.raises(CogtuneError, match="swap 1 to 1 of them"):
        BlockSwap(torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)]), 2, torch.device("cpu"))


def test_offloaded_checkpoints_train_the_same_lora_and_the_estimate_drops_what_was_offloaded(
        tmp_path, tiny_model, demo_data, deep_model):
    from cogtune.train.model import build_transformer
    from cogtune.train.swap import OffloadedCheckpointing

    plain = train_lora(tmp_path, tiny_model, demo_data, "plain", "--gradient_checkpointing")
    offloaded = train_lora(tmp_path, tiny_model, demo_data, "offloaded", "--gradient_checkpointing",
                           "--gradient_checkpointing_cpu_offload")
    for key in plain:
        assert torch.equal(plain[key], offloaded[key]), key
    # The estimate's saving is what a real pass sends to CPU memory, less the one block's states that
    # are back on the device during its recomputation.
    models = ModelConfigs.load(str(deep_model))
    flags = ["--pretrained_model_name_or_path", str(deep_model), "--mixed_precision", "no", "--gradient_checkpointing"]
    shape = [4, 3, 16, 24]
    kept = memory_estimate(load_config("train", flags), models, shape)
    config = load_config("train", flags + ["--gradient_checkpointing_cpu_offload"])
    sent = memory_estimate(config, models, shape)
    transformer = build_transformer(config, models, models.spec(), torch.device("cpu"))
    (function,) = {block._gradient_checkpointing_func for block in [transformer]}  # (set by diffusers)
    assert isinstance(function, OffloadedCheckpointing)
    import gc
    import weakref

    inputs = []  # every block's hidden states as it got them: none may stay alive for the backward pass
    for block in transformer.transformer_blocks:
        block.register_forward_pre_hook(lambda module, args: inputs.append(weakref.ref(args[0])))
    torch.manual_seed(0)
    out = transformer(hidden_states=torch.randn(1, 3, 4, 16, 24), encoder_hidden_states=torch.randn(1, 32, 32),
                      timestep=torch.tensor([500]), return_dict=False)[0]
    gc.collect()
    assert len(inputs) == LAYERS and sum(ref() is not None for ref in inputs) == 0
    out.mean().backward()
    assert function.bytes > 0
    assert kept.activations - sent.activations == function.bytes * (LAYERS - 1) // LAYERS
