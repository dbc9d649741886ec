"""The transformer as training uses it, on a device or on PyTorch's meta device (for the memory estimate)."""

from __future__ import annotations

import torch

from cogtune import quantize
from cogtune.config import TrainConfig
from cogtune.config.training import LoraArgs
from cogtune.errors import CogtuneError
from cogtune.families import ModelConfigs, ModelFamily
from cogtune.families.attention import (INEXACT_BACKWARD, RING_BACKENDS, check_attention_backend,
                                       check_ring_attention)
from cogtune.train.swap import BlockSwap, OffloadedCheckpointing
from cogtune.util.devices import precision_dtype


def target_modules(config: LoraArgs, spec: ModelFamily) -> list[str]:
    """The modules the LoRA adapts: --lora_target_modules, or the family's --lora_target_preset."""
    if config.lora_target_preset:
        return list(spec.target_presets[config.lora_target_preset])
    return list(config.lora_target_modules)


def build_transformer(config: TrainConfig, models: ModelConfigs, spec: ModelFamily, device, meta: bool = False):
    """The transformer as training uses it: frozen in the --mixed_precision dtype (linear weights in
    fp8 with --layerwise_casting_storage_dtype, or quantized with --quant_backend; the last
    --blocks_to_swap blocks' weights in CPU memory), with fp32 LoRA adapters. meta: built on the
    meta device from the config alone (shapes, no weights), for the memory estimate."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    weight_dtype = precision_dtype(config.mixed_precision)
    if meta:
        transformer = spec.meta_transformer(models, weight_dtype)
    else:
        check_attention_backend(config.attention_backend, torch.device(device), weight_dtype, training=True,
                                allow_inexact=config.allow_inexact_attention_backward)
        if config.fp8_compute:
            quantize.require_fp8_compute(torch.device(device))
        if config.quant_backend != "none":
            quantize.require(config.quant_backend, torch.device(device))
        quantization = quantize.diffusers_config(config.quant_backend, config.quant_type, weight_dtype)
        transformer = spec.load_transformer(models, weight_dtype,
                                            **({"quantization_config": quantization} if quantization else {}))
    if config.attention_backend and not meta:
        spec.use_attention_backend(transformer, config.attention_backend)
    if spec.ignores_learned_positions(config.ignore_learned_positional_embeddings):
        spec.drop_learned_positional_embeddings(transformer)
    transformer.requires_grad_(False)
    if config.blocks_to_swap and not meta:  # before the move: the swapped blocks' weights stay in CPU memory
        transformer._cogtune_block_swap = BlockSwap(spec.blocks(transformer), config.blocks_to_swap,
                                                    torch.device(device))
    if config.quant_backend not in quantize.CUDA_ONLY:  # (bitsandbytes put the weights on the GPU as they loaded)
        transformer.to(device)
    if config.gradient_checkpointing and not meta:
        transformer.enable_gradient_checkpointing(
            OffloadedCheckpointing(torch.device(device), spec.block_state_arguments) if config.gradient_checkpointing_cpu_offload else None)
    torch.manual_seed(config.seed)  # LoRA init
    transformer.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, init_lora_weights=True,
                                       target_modules=target_modules(config, spec), use_dora=config.use_dora,
                                       use_rslora=config.use_rslora))
    cast_training_params([transformer], dtype=torch.float32)  # only the LoRA is trained: only it is fp32
    if config.fp8_compute and not meta:  # after the LoRA, whose own layers it leaves as they are
        quantize.enable_fp8_compute(transformer, spec.blocks(transformer))
    if config.layerwise_casting_storage_dtype != "none":  # after the LoRA, which it leaves in fp32
        transformer.enable_layerwise_casting(storage_dtype=getattr(torch, config.layerwise_casting_storage_dtype),
                                             compute_dtype=weight_dtype)
    if config.compile and not meta:  # regional compilation: one compiled graph serves every block
        for block in spec.blocks(transformer):
            block.compile()
    return transformer


def context_parallel_groups(processes: int, process_index: int, degree: int) -> tuple[int, int]:
    """(data-parallel groups, this process's group) for --context_parallel_degree: consecutive processes
    form a group that splits one sample's tokens among them."""
    if processes % degree:
        raise CogtuneError(f"--context_parallel_degree {degree} must divide the number of processes ({processes}): "
                           f"launch {degree} x N processes.")
    return processes // degree, process_index // degree


def context_parallel_layout(degree: int, heads: int, attention_backend: str | None,
                            device: torch.device) -> tuple[int, int]:
    """(Ulysses degree, ring degree): Ulysses where the degree divides the attention heads, else ring
    attention, which needs a backend of RING_BACKENDS that runs on this device."""
    if heads % degree == 0:
        return degree, 1
    if (attention_backend or "native") not in RING_BACKENDS:
        raise CogtuneError(
            f"--context_parallel_degree {degree} does not divide the model's {heads} attention heads, so it needs ring "
            "attention, which merges each share's attention by its log-sum-exp: add --attention_backend "
            f"{', '.join(b for b in RING_BACKENDS if b not in INEXACT_BACKWARD)} (a GPU's kernels), or use a "
            f"degree that divides {heads}.")
    check_ring_attention(attention_backend, device)
    return 1, degree


def enable_context_parallel(transformer, spec: ModelFamily, layout: tuple[int, int], device: torch.device,
                            attention_backend: str | None = None) -> None:
    """Split each sample's tokens over groups of consecutive processes with diffusers' context parallelism, as
    context_parallel_layout laid them out: (Ulysses degree, ring degree). The mesh is (data-parallel groups,
    ring, ulysses). Each process of a group then computes the whole loss from the gathered output and the
    LoRA gradients of its own tokens: their sum over the group is the sample's gradient (the training step
    scales its loss by the degree, so that DDP's mean over every process is the mean over the groups)."""
    from diffusers import ContextParallelConfig

    plan = spec.context_parallel_plan(transformer)
    ulysses, ring = layout
    if attention_backend is None:  # processors that dispatch (CogVideoX's); build_transformer set an asked backend
        spec.use_attention_backend(transformer, "native")
    processes = torch.distributed.get_world_size()
    mesh = torch.distributed.device_mesh.init_device_mesh(
        device.type, (processes // (ring * ulysses), ring, ulysses), mesh_dim_names=("dp", "ring", "ulysses"))
    config = ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring, mesh=mesh)
    with _one_device_on_cpu(device):
        transformer.enable_parallelism(config=config, cp_plan=plan)


class _one_device_on_cpu:
    """diffusers picks each rank's device as rank % torch.accelerator.device_count(), which is 0 on a machine
    without accelerators (the CPU runs of several processes, gloo): there, it is told of one device while
    it sets up, and the mesh it is given is on the CPU."""

    def __init__(self, device: torch.device):
        self.patch = device.type == "cpu" and torch.accelerator.device_count() == 0

    def __enter__(self):
        if self.patch:
            self.saved = torch.accelerator.device_count
            torch.accelerator.device_count = lambda: 1

    def __exit__(self, *exc):
        if self.patch:
            torch.accelerator.device_count = self.saved
