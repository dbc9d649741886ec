"""Quantized frozen weights through diffusers' quantization configs (QLoRA-style training, and
smaller models for `cogtune infer`). The backends and their types keep diffusers' names:

    --quant_backend torchao            --quant_type int8wo | float8wo | int4wo
    --quant_backend bitsandbytes_4bit  --quant_type nf4 | fp4
    --quant_backend bitsandbytes_8bit  --quant_type int8
    --quant_backend quanto             --quant_type int8 | float8 | int4

Every nn.Linear of the model is quantized as it loads (its weight becomes the backend's tensor or
layer); norms, embeddings, convolutions and biases keep their dtype. A LoRA trained on top stays in
fp32 and has the names it has on an unquantized model, so it loads into any pipeline.
"""

from __future__ import annotations

import importlib.util
import math
from typing import TYPE_CHECKING

from cogtune.errors import CogtuneError

if TYPE_CHECKING:  # torch is imported where it is used: the config checks its flags without it
    import torch

BACKENDS = {
    "torchao": ("int8wo", "float8wo", "int4wo"),
    "bitsandbytes_4bit": ("nf4", "fp4"),
    "bitsandbytes_8bit": ("int8",),
    "quanto": ("int8", "float8", "int4"),
}
PACKAGES = {"torchao": ("torchao", "torchao"), "bitsandbytes_4bit": ("bitsandbytes", "bitsandbytes"),
            "bitsandbytes_8bit": ("bitsandbytes", "bitsandbytes"), "quanto": ("optimum.quanto", "optimum-quanto")}
CUDA_ONLY = ("bitsandbytes_4bit", "bitsandbytes_8bit")  # diffusers quantizes with bitsandbytes on a GPU only
GROUP = {"int4wo": 128, "nf4": 64, "fp4": 64, "int4": 128}  # weights per scale of the grouped types


def quant_type(backend: str, chosen: str | None) -> str:
    """The type to use: the one given, or the backend's first (its most accurate)."""
    return chosen or BACKENDS[backend][0]


def check(backend: str, chosen: str | None, flag: str = "--quant_backend", type_flag: str = "--quant_type") -> None:
    """Refuse a type that is not the backend's (with the config, before anything else)."""
    if backend == "none":
        if chosen:
            raise CogtuneError(f"{type_flag} {chosen} needs {flag} (one of {', '.join(BACKENDS)}).")
    elif chosen and chosen not in BACKENDS[backend]:
        raise CogtuneError(f"{type_flag} {chosen} is not a type of {flag} {backend}: use one of "
                           f"{', '.join(BACKENDS[backend])}.")


def require(backend: str, device: torch.device, flag: str = "--quant_backend") -> None:
    """Refuse a backend whose package is missing, or that cannot quantize on this device, before any
    weights load (the --dry_run estimate needs neither)."""
    if backend in CUDA_ONLY and device.type != "cuda":
        raise CogtuneError(f"{flag} {backend} quantizes on a CUDA GPU only (diffusers' bitsandbytes support); on "
                           f"{device.type} use --quant_backend torchao or quanto.")
    module, package = PACKAGES[backend]
    if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
        raise CogtuneError(f"{flag} {backend} needs the {package} package: pip install {package} "
                           "(or pip install 'cogtune[quant]').")


def diffusers_config(backend: str, chosen: str | None, compute_dtype: torch.dtype):
    """The diffusers quantization config of a backend and type (None for 'none')."""
    if backend == "none":
        return None
    kind = quant_type(backend, chosen)
    if backend == "torchao":
        from diffusers import TorchAoConfig
        from torchao import quantization

        configs = {"int8wo": quantization.Int8WeightOnlyConfig, "float8wo": quantization.Float8WeightOnlyConfig,
                   "int4wo": quantization.Int4WeightOnlyConfig}
        return TorchAoConfig(configs[kind]())
    if backend == "bitsandbytes_4bit":
        from diffusers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=compute_dtype)
    if backend == "bitsandbytes_8bit":
        from diffusers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_8bit=True)
    from diffusers import QuantoConfig

    return QuantoConfig(weights_dtype=kind)


def transformers_config(backend: str, chosen: str | None, compute_dtype: torch.dtype):
    """The same quantization as a transformers config, for T5."""
    kind = quant_type(backend, chosen)
    import transformers

    if backend == "torchao":
        return transformers.TorchAoConfig(diffusers_config(backend, chosen, compute_dtype).quant_type)
    if backend == "bitsandbytes_4bit":
        return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind,
                                               bnb_4bit_compute_dtype=compute_dtype)
    if backend == "bitsandbytes_8bit":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.QuantoConfig(weights=kind)


def pipeline_config(backend: str, chosen: str | None, components: list[str], compute_dtype: torch.dtype):
    """A diffusers PipelineQuantizationConfig quantizing these parts of a pipeline (None for 'none')."""
    if backend == "none" or not components:
        return None
    from diffusers import PipelineQuantizationConfig

    return PipelineQuantizationConfig(quant_mapping={
        part: (transformers_config if part == "text_encoder" else diffusers_config)(backend, chosen, compute_dtype)
        for part in components})


def linear_weight_bytes(backend: str, chosen: str | None, shape: tuple[int, ...], dtype_bytes: int = 2) -> int:
    """Bytes a quantized nn.Linear weight of `shape` (out, in) takes: its values and their scales
    (per output row for the 8-bit types, per group of GROUP weights for the 4-bit ones), as
    tests/e2e/test_quantize.py finds them stored for the backends a CPU runs."""
    kind = quant_type(backend, chosen)
    numel, rows = math.prod(shape), shape[0]
    if kind in GROUP:  # 4-bit values; a scale (and a zero point, but for nf4/fp4's absmax) per group
        # bitsandbytes: an fp32 absmax; torchao: bf16 scale and zero; quanto: scale and shift in the
        # model's dtype, in groups no longer than a row.
        per_group = {"nf4": 4, "fp4": 4, "int4wo": 2 * 2, "int4": 2 * dtype_bytes}[kind]
        group = min(GROUP[kind], shape[1]) if kind == "int4" else GROUP[kind]
        return numel // 2 + math.ceil(numel / group) * per_group
    zero_point = rows if kind == "int8wo" else 0  # torchao's int8 keeps an int8 zero point per row too
    return numel + 4 * rows + zero_point  # 8-bit values and an fp32 scale per row


def weight_bytes(model: torch.nn.Module, backend: str, chosen: str | None) -> int:
    """Bytes of the frozen weights and buffers of `model` (any device, meta included) once its
    linear layers are quantized; the LoRA's parameters (trainable) are left out."""
    import torch

    quantized, total = set(), 0
    for module in model.modules():  # (a LoRA's own linear layers are trainable: not quantized)
        if isinstance(module, torch.nn.Linear) and backend != "none" and not module.weight.requires_grad:
            quantized.add(id(module.weight))
            total += linear_weight_bytes(backend, chosen, tuple(module.weight.shape), module.weight.element_size())
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in quantized and not tensor.requires_grad:
            total += tensor.numel() * tensor.element_size()
    return total


def dequantized_saved_bytes(model: torch.nn.Module, blocks, backend: str, compute_bytes: int) -> tuple[int, int]:
    """Bytes of the dequantized weights autograd keeps for the backward pass (without, with gradient
    checkpointing). quanto's linear layers save the weight they dequantized, in the compute dtype
    (as fp8 layerwise casting does): all of them without checkpointing, one block's with it. torchao
    and bitsandbytes save the quantized weight, which is counted already."""
    if backend != "quanto":
        return 0, 0
    import torch

    def linear_bytes(module: torch.nn.Module) -> int:
        return sum(m.weight.numel() * compute_bytes for m in module.modules()
                   if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad)

    per_block = [linear_bytes(block) for block in blocks]
    outside = linear_bytes(model) - sum(per_block)
    return outside + sum(per_block), outside + max(per_block, default=0)


# --- --fp8_compute: FP8 matmuls for the frozen linear layers (torchao float8 training) ------------

FP8_COMPUTE_CAPABILITY = (8, 9)  # Ada, Hopper and newer have FP8 tensor cores


def fp8_compute_layers(transformer: torch.nn.Module, blocks) -> list[str]:
    """The names of the layers --fp8_compute converts: every frozen nn.Linear inside the blocks (a LoRA's
    base layer included, its lora_A and lora_B not), whose sizes are multiples of 16 (FP8 matmuls need it)."""
    import torch

    inside = {id(module) for block in blocks for module in block.modules()}
    return [name for name, module in transformer.named_modules()
            if type(module) is torch.nn.Linear and id(module) in inside and not module.weight.requires_grad
            and ".lora_" not in name and module.in_features % 16 == 0 and module.out_features % 16 == 0]


def require_fp8_compute(device: torch.device) -> None:
    """Refuse --fp8_compute where it cannot run: torchao missing, no GPU, or a GPU without FP8 tensor cores."""
    import torch

    if importlib.util.find_spec("torchao") is None:
        raise CogtuneError("--fp8_compute needs torchao: pip install 'cogtune[quant]' (or torchao).")
    if device.type != "cuda":
        raise CogtuneError(f"--fp8_compute runs FP8 matmuls on GPU tensor cores; there is none on the {device.type}. "
                           "Leave the flag out here.")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_COMPUTE_CAPABILITY:
        raise CogtuneError(f"--fp8_compute needs FP8 tensor cores (compute capability 8.9 or newer: Ada, Hopper, "
                           f"Blackwell); this GPU is {capability[0]}.{capability[1]}. Leave the flag out, or use "
                           "--layerwise_casting_storage_dtype float8_e4m3fn to store the weights in fp8.")


def enable_fp8_compute(transformer: torch.nn.Module, blocks) -> list[str]:
    """Swap the fp8_compute_layers for torchao's Float8Linear (dynamic tensorwise scaling: inputs and weights
    in e4m3, gradients in e5m2); returns their names. The weights stay stored as they were."""
    from torchao.float8 import convert_to_float8_training

    names = set(fp8_compute_layers(transformer, blocks))
    convert_to_float8_training(transformer, module_filter_fn=lambda module, name: name in names)
    return sorted(names)
