"""The transformer as training uses it, on a device or on PyTorch's meta device (for the memory estimate)."""

from __future__ import annotations

import torch

from cogtune import quantize
from cogtune.config import TrainConfig, precision_dtype
from cogtune.families import FamilySpec, ModelConfigs, built_on_meta, drop_learned_positional_embeddings
from cogtune.train.lora import TARGET_PRESETS
from cogtune.train.swap import BlockSwap, OffloadedCheckpointing


def target_modules(config: TrainConfig) -> list[str]:
    return list(TARGET_PRESETS[config.lora_target_preset] if config.lora_target_preset else config.lora_target_modules)


def build_transformer(config: TrainConfig, models: ModelConfigs, spec: FamilySpec, device, meta: bool = False):
    """The transformer as training uses it: frozen in the --mixed_precision dtype (linear weights in
    fp8 with --layerwise_casting_storage_dtype, or quantized with --quant_backend; the last
    --blocks_to_swap blocks' weights in CPU memory), with fp32 LoRA adapters. meta: built on the
    meta device from the config alone (shapes, no weights), for the memory estimate."""
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    weight_dtype = precision_dtype(config.mixed_precision)
    if meta:
        transformer = built_on_meta(lambda: CogVideoXTransformer3DModel.from_config(models.transformer), weight_dtype)
    else:
        if config.quant_backend != "none":
            quantize.require(config.quant_backend, torch.device(device))
        quantization = quantize.diffusers_config(config.quant_backend, config.quant_type, weight_dtype)
        transformer = models.load_part(CogVideoXTransformer3DModel, "transformer", dtype=weight_dtype,
                                       **({"quantization_config": quantization} if quantization else {}))
    if spec.ignores_learned_positions(config.ignore_learned_positional_embeddings):
        drop_learned_positional_embeddings(transformer)
    transformer.requires_grad_(False)
    if config.blocks_to_swap and not meta:  # before the move: the swapped blocks' weights stay in CPU memory
        transformer._cogtune_block_swap = BlockSwap(transformer.transformer_blocks, config.blocks_to_swap,
                                                    torch.device(device))
    if config.quant_backend not in quantize.CUDA_ONLY:  # (bitsandbytes put the weights on the GPU as they loaded)
        transformer.to(device)
    if config.gradient_checkpointing and not meta:
        transformer.enable_gradient_checkpointing(
            OffloadedCheckpointing(torch.device(device)) if config.gradient_checkpointing_cpu_offload else None)
    torch.manual_seed(config.seed)  # LoRA init
    transformer.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, init_lora_weights=True,
                                       target_modules=target_modules(config), use_dora=config.use_dora,
                                       use_rslora=config.use_rslora))
    cast_training_params([transformer], dtype=torch.float32)  # only the LoRA is trained: only it is fp32
    if config.layerwise_casting_storage_dtype != "none":  # after the LoRA, which it leaves in fp32
        transformer.enable_layerwise_casting(storage_dtype=getattr(torch, config.layerwise_casting_storage_dtype),
                                             compute_dtype=weight_dtype)
    if config.compile and not meta:  # regional compilation: one compiled graph serves every block
        for block in transformer.transformer_blocks:
            block.compile()
    return transformer
